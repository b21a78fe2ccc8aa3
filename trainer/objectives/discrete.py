"""What the token language-model objectives share: MDLM, SEDD, BD3-LM (masked, or
"absorbing", discrete diffusion) and the autoregressive baseline.

Forward process, per token and independently: x_t = x_0 with probability
alpha_t = exp(-sigma_bar(t)), else [MASK]. Time as everywhere in the framework: t = 0
data, t = 1 noise. sigma_bar is the total noise and dsigma = d sigma_bar / dt its rate;
a time-conditioned network is fed sigma_bar (as MDLM, SEDD and BD3-LM do).

Continuous-time NELBO of masked diffusion (Sahoo et al. 2024, eq. 10; Shi et al. 2024):

    NELBO(x_0) = int_0^1 E_{x_t} [ w(t) sum_{l masked in x_t} -log p_theta(x_0^l | x_t) ] dt,
    w(t) = -alpha'_t / (1 - alpha_t) = dsigma(t) / expm1(sigma_bar(t)).

It does not depend on the schedule (substitute s = 1 - alpha_t); the log-linear schedule
alpha_t = 1 - (1 - eps) t has w(t) = 1 / t exactly. A single draw's variance diverges
(logarithmically) as t -> 0, so, as in MDLM, times are drawn on [time_min, 1] and the
estimator averages there: it estimates 1 / (1 - time_min) int_{time_min}^1 (...) dt,
within O(time_min + eps) of the NELBO; with time_min -> 0 and eps -> 0 it is the exact
bound, which an exact denoiser attains (NELBO = -log p(x_0)).

Per-sample randomness depends only on (seed, step, global sequence index), so training
is the same function of the data on any number of ranks: times follow a Weyl
(golden-ratio) sequence over the global keys index * num_blocks + block shifted by a
per-step offset, which spreads the times of consecutive sequences (a global batch)
evenly over the range (the low-discrepancy / antithetic sampling of MDLM and BD3-LM);
masking uniforms come from a generator seeded with ``sample_seed(seed, step, index)``.

Shapes: B batch, L sequence length, V vocabulary ([MASK] included), N time draws per
sequence (blocks: 1 for MDLM / SEDD, L / block_size for BD3-LM).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_type_hints

import torch
from torch import nn
from torch.nn import functional as F

from configlib import option
from data_pipeline.tokenizer import Tokenizer
from trainer.objectives.absorbing import (  # noqa: F401  (LogLinearSchedule, GeometricSchedule: re-exported)
    GeometricSchedule,
    LogLinearSchedule,
    NoiseSchedule,
    as_times,
    real_logits,
)
from trainer.objectives.base import EvalContext, Objective, sample_seed
from trainer.samplers.discrete import MaskedSteps, masked_confidence

MASK_PIECE = "[MASK]"
_GOLDEN_64 = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: the Weyl step with the best spread
_STEP_KEY = 2**62  # sample_seed index of the per-step time offset; no sequence index is this big


# ------------------------------------------------------------------------ time draws


def weyl_uniforms(keys: Sequence[int], offset: float | torch.Tensor = 0.0) -> torch.Tensor:
    """frac(offset + key / phi) for integer keys (float64): evenly spread for any run of
    consecutive keys; computed exactly in 64-bit integers however large the key."""
    fracs = torch.tensor([((k * _GOLDEN_64) % 2**64) / 2**64 for k in keys], dtype=torch.float64)
    return (torch.as_tensor(offset, dtype=torch.float64) + fracs) % 1.0


def step_offset(seed: int, step: int) -> float:
    """The per-step shift of the Weyl sequence of training times, shared by all ranks."""
    gen = torch.Generator().manual_seed(sample_seed(seed, step, _STEP_KEY))
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def per_token(values_BN: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Per-block values (B, N) -> per-token (B, L): block j covers tokens
    [j block_size, (j + 1) block_size)."""
    return values_BN.repeat_interleave(block_size, dim=1)[:, :length]


# ------------------------------------------------------------- parameterisations


def subs_log_probs(logits_BLV: torch.Tensor, x_t_BL: torch.Tensor, mask_id: int) -> torch.Tensor:
    """MDLM's SUBS parameterisation: log p_theta(x_0 | x_t) (B, L, V).

    Zero mass on [MASK]; positions that are clean in x_t carry their token over
    (log-prob 0 for it, -inf for every other id), so they never contribute to the loss.
    """
    logp = real_logits(logits_BLV, mask_id).log_softmax(-1)
    carry = torch.full_like(logp, float("-inf")).scatter(-1, x_t_BL[..., None], 0.0)
    return torch.where((x_t_BL != mask_id)[..., None], carry, logp)


def masked_cross_entropy(
    logits_BLV: torch.Tensor, x0_BL: torch.Tensor, mask_id: int
) -> torch.Tensor:
    """-log p_theta(x_0 | x_t) under SUBS at every position (B, L) (meaningful where
    x_t is masked; the caller keeps those)."""
    logits = real_logits(logits_BLV, mask_id)
    ce = F.cross_entropy(logits.flatten(0, 1), x0_BL.flatten(), reduction="none")
    return ce.view(x0_BL.shape)


def time_conditioning(model: nn.Module) -> bool | None:
    """The model's ``time_conditioning`` flag; None for a module that does not say."""
    flag = getattr(model, "time_conditioning", None)
    return None if flag is None else bool(flag)


# -------------------------------------------------------------------------- configs


@dataclass(kw_only=True)
class TokenLMConfig:
    name: str = option("", "Training objective.")
    tokenizer: str = option(
        doc="SentencePiece .model (path or s3:// URL): [MASK] / BOS ids, vocabulary, decoding."
    )
    top_p: float = option(
        1.0, "Nucleus mass of evaluation samples (1 = the full distribution).", gt=0, le=1
    )


@dataclass(kw_only=True)
class MaskedDiffusionConfig(TokenLMConfig):
    noise: Literal["loglinear", "geometric"] = option(
        "loglinear", "Noise schedule: alpha_t = 1 - (1 - eps) t, or SEDD's geometric sigma."
    )
    noise_eps: float = option(
        1e-3, "Log-linear schedule: fraction of tokens still clean at t = 1.", gt=0, lt=1
    )
    sigma_min: float = option(1e-4, "Geometric schedule: total noise at t = 0.", gt=0)
    sigma_max: float = option(20.0, "Geometric schedule: total noise at t = 1.", gt=0)
    time_min: float = option(
        1e-3,
        "Smallest time drawn for training and NELBO estimates (the 1/t weight's variance).",
        ge=0,
        lt=1,
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = []
        if self.noise == "loglinear":
            out += [
                (k, "has no effect unless noise is 'geometric'")
                for k in ("sigma_min", "sigma_max")
                if k in given
            ]
        else:
            if "noise_eps" in given:
                out.append(("noise_eps", "has no effect unless noise is 'loglinear'"))
            if self.sigma_min >= self.sigma_max:
                out.append(("sigma_max", f"must be larger than sigma_min ({self.sigma_min})"))
        return out

    def schedule(self) -> NoiseSchedule:
        if self.noise == "geometric":
            return GeometricSchedule(self.sigma_min, self.sigma_max)
        return LogLinearSchedule(self.noise_eps)


# ------------------------------------------------------------------------ objectives


def load_tokenizer(url: str, *, need_mask: bool) -> tuple[Tokenizer, int | None]:
    """The tokenizer and its [MASK] id; one clear error line for a bad file."""
    tokenizer = Tokenizer.load(url)  # TokenizerError (a ValueError) names the file
    if not need_mask:
        return tokenizer, None
    try:
        return tokenizer, tokenizer.token_id(MASK_PIECE)
    except KeyError:
        raise ValueError(
            f"objective.tokenizer: {url} has no {MASK_PIECE} piece; train it with "
            f"--user-symbols '{MASK_PIECE}' (the default of data_pipeline.tokenizer train)"
        ) from None


@dataclass(frozen=True)
class TokenRequest:
    """What ``TokenObjective.generate`` hands the family's ``sample_tokens``: ``num``
    sequences of ``length`` tokens from the (checked) ``model``, ``steps`` (None: the
    family's default, if it has one), every draw from ``generator``, the resolved top-p."""

    model: nn.Module
    num: int
    length: int
    steps: int | None
    generator: torch.Generator
    top_p: float


class TokenObjective(Objective):
    """Tokenizer, vocabulary checks and the checkpointed per-rank generator."""

    needs_mask = True
    exact_likelihood = False  # nelbo() is a bound (diffusion), not the exact NLL

    def __init__(self, cfg: Any, *, seed: int, rank: int, device: torch.device):
        self.cfg = cfg
        self.seed = seed
        self.device = torch.device(device)
        self.tokenizer, self.mask_id = load_tokenizer(cfg.tokenizer, need_mask=self.needs_mask)
        self.vocab_size = self.tokenizer.vocab_size
        # Used only for batches without global indices (as in RectifiedFlow).
        self.generator = torch.Generator().manual_seed(seed * 1000 + 17 + rank)

    def model_problems(self, model_cfg: Any) -> list[str]:
        vocab = getattr(model_cfg, "vocab_size", None)
        if vocab == self.vocab_size:
            return []
        return [
            f"model.vocab_size is {vocab} but the tokenizer {self.cfg.tokenizer} has "
            f"{self.vocab_size} ids ([MASK] included): set model.vocab_size: {self.vocab_size}"
        ]

    def check_model(self, model: nn.Module) -> None:
        """ValueError when the model cannot serve this objective."""
        problems = self.model_problems(model)
        if problems:
            raise ValueError(problems[0])

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        num: int,
        length: int,
        *,
        steps: int | None = None,
        generator: torch.Generator,
        top_p: float | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """``num`` sequences of ``length`` tokens from ``model`` (checked first), every draw
        from ``generator``, revealed tokens cut to the ``top_p`` nucleus (default: the
        recipe's); ``steps`` and ``options`` as the family's ``sample_tokens`` takes them."""
        self.check_model(model)
        top_p = self.cfg.top_p if top_p is None else top_p
        return self.sample_tokens(
            TokenRequest(model, num, length, steps, generator, top_p), **options
        )

    @abstractmethod
    def sample_tokens(self, req: TokenRequest, **options: Any) -> torch.Tensor:
        """The family's sampler for ``generate``; its keyword options are the family's own."""

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """Held-out NELBO / perplexity and decoded samples (trainer/objectives/text_eval.py)."""
        from trainer.objectives.text_eval import evaluate_lm

        return evaluate_lm(self, ctx)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


# The confidence samplers of MDLM and SEDD: name -> share of the decoded tokens that the
# corrector remasks after each step (trainer/samplers/discrete.py, masked_confidence).
# 0.25 is not tuned: the tiny runs measured so far get ~0 sums right with every sampler.
CONFIDENCE_SAMPLERS = {"confidence": 0.0, "pc": 0.25}


@dataclass(frozen=True)
class ReverseRun:
    """What a family's reverse sampler gets from ``generate``: the network as
    ``logits_fn(x_t, t)`` (fed sigma_bar(t) as in training), the all-[MASK] start, and
    the shared sampler arguments."""

    sampler: str
    logits_fn: Callable[[torch.Tensor, float], torch.Tensor]
    start_BL: torch.Tensor
    how: MaskedSteps
    reuse_unchanged: bool


class MaskedDiffusionObjective(TokenObjective):
    """Masking, time draws and the NELBO estimator; subclasses give ``nelbo_terms``."""

    def __init__(self, cfg: MaskedDiffusionConfig, *, seed: int, rank: int, device: torch.device):
        super().__init__(cfg, seed=seed, rank=rank, device=device)
        self.schedule = cfg.schedule()

    # ------------------------------------------------------------------- sampling
    def sampler_name(self, override: str | None, temperature: float = 1.0) -> str:
        """``override`` or the recipe's ``sampler``; ValueError naming the choices."""
        name = override or self.cfg.sampler
        choices = list(get_args(get_type_hints(type(self.cfg))["sampler"]))
        if name not in choices:
            raise ValueError(f"unknown {type(self).__name__} sampler {name!r}; one of {choices}")
        if temperature != 1.0 and name not in CONFIDENCE_SAMPLERS:
            raise ValueError(
                f"temperature applies to the samplers {list(CONFIDENCE_SAMPLERS)}, not {name!r}"
            )
        return name

    def masked_steps(self, req: TokenRequest) -> MaskedSteps:
        """The shared sampler arguments of a request; ValueError without ``steps``."""
        if req.steps is None:
            raise ValueError(f"{type(self).__name__} sampling needs a step count (steps)")
        return MaskedSteps(self.schedule, req.steps, self.mask_id, req.generator, req.top_p)

    def sample_tokens(
        self,
        req: TokenRequest,
        *,
        sampler: str | None = None,
        temperature: float = 1.0,
        cache: bool = True,
    ) -> torch.Tensor:
        """``num`` sequences of ``length`` tokens from all-[MASK] by ``steps`` steps of
        ``sampler`` (default: the recipe's): the family's reverse process
        (``reverse_sample``) or a confidence sampler on the real-token softmax
        (``temperature``: its candidates). ``cache``: a reverse step may reuse the
        network's output after a step that changed nothing (no time conditioning only)."""
        sampler = self.sampler_name(sampler, temperature)
        how = self.masked_steps(req)

        def logits_fn(x_BL: torch.Tensor, t: float) -> torch.Tensor:
            sigma = float(self.schedule.total(torch.tensor(t, dtype=torch.float64)))
            return req.model(x_BL, torch.full((req.num,), sigma, device=self.device))

        shape = (req.num, req.length)
        start = torch.full(shape, self.mask_id, dtype=torch.long, device=self.device)
        if sampler in CONFIDENCE_SAMPLERS:
            return masked_confidence(
                lambda x_BL, t: real_logits(logits_fn(x_BL, t), self.mask_id).softmax(-1),
                start,
                how,
                temperature=temperature,
                remask=CONFIDENCE_SAMPLERS[sampler],
                t_end=self.sample_t_end(),
            )
        reuse = cache and time_conditioning(req.model) is False
        return self.reverse_sample(ReverseRun(sampler, logits_fn, start, how, reuse))

    def sample_t_end(self) -> float:
        """Where the confidence samplers stop (0: the clean data)."""
        return 0.0

    def reverse_sample(self, run: ReverseRun) -> torch.Tensor:
        """The family's own reverse process ``run.sampler`` from ``run.start_BL``."""
        raise NotImplementedError(f"{type(self).__name__} has no reverse sampler {run.sampler!r}")

    # ------------------------------------------------------------------ time draws
    def num_blocks(self, length: int) -> int:
        """Independent times per sequence (BD3-LM: one per block)."""
        return 1

    def train_range(self) -> tuple[float, float]:
        return self.cfg.time_min, 1.0

    def eval_range(self) -> tuple[float, float]:
        return self.cfg.time_min, 1.0

    def draw_uniforms(
        self, batch: dict[str, Any], step: int, batch_size: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(time uniforms (B, N) float64, masking uniforms (B, L) float32), on the CPU.

        With global indices in the batch the draws of a sequence depend only on
        (seed, step, index); without, they come from the checkpointed per-rank generator.
        """
        blocks = self.num_blocks(length)
        if "index" not in batch:
            offset = float(torch.rand((), generator=self.generator, dtype=torch.float64))
            keys = range(batch_size * blocks)
            u_time = weyl_uniforms(keys, offset).view(batch_size, blocks)
            return u_time, torch.rand(batch_size, length, generator=self.generator)
        indices = [int(i) for i in batch["index"].tolist()]
        keys = [index * blocks + j for index in indices for j in range(blocks)]
        u_time = weyl_uniforms(keys, step_offset(self.seed, step)).view(len(indices), blocks)
        gen = torch.Generator()
        u_mask = []
        for index in indices:
            gen.manual_seed(sample_seed(self.seed, step, index))
            u_mask.append(torch.rand(length, generator=gen))
        return u_time, torch.stack(u_mask)

    @staticmethod
    def to_times(u: torch.Tensor, time_range: tuple[float, float]) -> torch.Tensor:
        lo, hi = time_range
        return lo + (hi - lo) * u

    def corrupt(
        self, x0_BL: torch.Tensor, t_BL: torch.Tensor, u_mask_BL: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, masked): position l is masked when its uniform < 1 - alpha_t."""
        masked = u_mask_BL.to(torch.float64) < self.schedule.mask_prob(t_BL)
        masked = masked.to(x0_BL.device)
        return torch.where(masked, torch.full_like(x0_BL, self.mask_id), x0_BL), masked

    def corrupt_blocks(
        self, x0_BL: torch.Tensor, t_BN: torch.Tensor, u_mask_BL: torch.Tensor, block_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t_BL, x_t, masked): each block of ``block_size`` tokens at its own time of
        t_BN (one block per sequence for MDLM / SEDD), then :meth:`corrupt`."""
        t_BL = per_token(t_BN, x0_BL.shape[1], block_size)
        return (t_BL, *self.corrupt(x0_BL, t_BL, u_mask_BL))

    def sequence_sigma(self, t_BN: torch.Tensor) -> torch.Tensor:
        """The total noise (B,) at each sequence's time: the time-conditioned input."""
        return self.schedule.total(t_BN[:, 0]).to(self.device, torch.float32)

    def masked_weight(self, t_BL: torch.Tensor, masked_BL: torch.Tensor) -> torch.Tensor:
        """w(t) where masked, exactly 0 elsewhere (no 0 * inf in the backward at t = 0)."""
        weight = self.schedule.weight(t_BL).to(masked_BL.device, torch.float32)
        return torch.where(masked_BL, weight, torch.zeros_like(weight))

    # -------------------------------------------------------------------- losses
    @abstractmethod
    def nelbo_terms(
        self, model: nn.Module, x0_BL: torch.Tensor, t_BN: torch.Tensor, u_mask_BL: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token NELBO integrand (B, L) float, masked (B, L) bool) at the given
        times (B, N) and masking uniforms: one single-draw estimate per sequence."""

    def loss(
        self, phase: str, modules: dict[str, nn.Module], batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        model = modules["model"]
        self.check_model(model)
        x0_BL = batch["tokens"].to(self.device)
        u_time, u_mask = self.draw_uniforms(batch, step, *x0_BL.shape)
        t_BN = self.to_times(u_time, self.train_range())
        terms_BL, masked_BL = self.nelbo_terms(model, x0_BL, t_BN, u_mask)
        # per-token NELBO in nats (bits/token = loss / ln 2)
        return terms_BL.mean().float(), {"masked_frac": float(masked_BL.float().mean())}

    @torch.no_grad()
    def nelbo(
        self,
        model: nn.Module,
        tokens_BL: torch.Tensor,
        *,
        generator: torch.Generator,
        num_t: int = 1,
    ) -> torch.Tensor:
        """Per-sequence NELBO in nats (B,), summed over the L tokens: the mean of ``num_t``
        draws per sequence, their times spread by a Weyl sequence from a random offset.

        Times cover [time_min, 1] (never the training clip); bits/token = nelbo / L / ln 2
        and exp(nelbo / L) bounds the perplexity (up to the O(time_min) cut above).
        """
        if num_t < 1:
            raise ValueError(f"num_t must be >= 1, got {num_t}")
        self.check_model(model)
        x0_BL = tokens_BL.to(self.device)
        batch, length = x0_BL.shape
        blocks = self.num_blocks(length)
        offset_B = torch.rand(
            batch, generator=generator, dtype=torch.float64, device=generator.device
        )
        total = torch.zeros(batch, dtype=torch.float64, device=self.device)
        for k in range(num_t):
            u_time = (
                weyl_uniforms(range(k * blocks, (k + 1) * blocks))[None] + offset_B.cpu()[:, None]
            )
            u_mask = torch.rand(batch, length, generator=generator, device=generator.device)
            t_BN = self.to_times(u_time % 1.0, self.eval_range())
            terms_BL, _ = self.nelbo_terms(model, x0_BL, t_BN, u_mask.cpu())
            total += terms_BL.sum(1).double()
        return (total / num_t).float()
