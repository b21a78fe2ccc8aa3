"""Samplers of the token language models: MDLM ancestral, SEDD Euler / analytic,
confidence-ordered unmasking with an optional remasking corrector (MDLM and SEDD), BD3-LM
semi-autoregressive and AR decoding. Plain functions; all randomness comes from the
``generator`` passed in.

Every masked-diffusion step has one shape: each [MASK]ed position is revealed with a
probability pi (from the schedule and, for SEDD, the network's total score), and a
revealed position takes a token from q, the network's distribution over real ids,
optionally cut to its top-p nucleus. A step draws two uniforms per position (whether
or not it is masked) and picks tokens by inverse CDF in float64, so a run is a fixed
function of the generator and the network's outputs: BD3-LM's and AR's KV-cache paths
give the same tokens as their recompute-everything references.

The confidence sampler keeps the step's draws (two uniforms per position, inverse CDF)
but chooses which positions to reveal by the network's confidence instead of by chance,
as many per step as the schedule's mask ratio prescribes.

Time runs from t = 1 (all [MASK]) to 0 on ``steps`` equal steps.

Shapes: B batch, L sequence (or block) length, V vocabulary ([MASK] included), N rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainer.objectives.absorbing import NoiseSchedule, as_times, block_causal_mask, real_logits

# (x_t (B, L), t) -> p_theta(x_0 | x_t) over all V ids (B, L, V), no mass on [MASK]
ProbsFn = Callable[[torch.Tensor, float], torch.Tensor]
# (x_t (B, L), t) -> raw network logits (B, L, V)
LogitsFn = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class MaskedSteps:
    """The part of the signature every masked-diffusion sampler shares: ``steps`` equal
    steps of ``schedule`` from t = 1, the [MASK] id, the generator every draw comes from,
    and the nucleus (top-p) a revealed token is drawn from."""

    schedule: NoiseSchedule
    steps: int
    mask_id: int
    generator: torch.Generator
    top_p: float = 1.0


def top_p_filter(probs_NV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus: keep the most likely ids until their mass reaches top_p, renormalise."""
    if top_p >= 1.0:
        return probs_NV
    sorted_p, order = probs_NV.sort(-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the top id is always kept
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    filtered = probs_NV * keep
    return filtered / filtered.sum(-1, keepdim=True)


def categorical(probs_NV: torch.Tensor, u_N: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw (float64) with one uniform per row; ids of zero mass never come."""
    cdf = probs_NV.double().cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    index = torch.searchsorted(cdf, u_N.double()[..., None], right=True)[..., 0]
    return index.clamp_max(probs_NV.shape[-1] - 1)


def _uniforms(generator: torch.Generator, shape: tuple[int, ...], device) -> torch.Tensor:
    draw = torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device)
    return draw.to(device)


def reveal(
    x_BL: torch.Tensor,
    probs_BLV: torch.Tensor,
    reveal_prob: float | torch.Tensor,
    how: MaskedSteps,
) -> torch.Tensor:
    """One step: each masked position is revealed with ``reveal_prob`` (scalar or (B, L))
    and takes a token from its row of ``probs_BLV`` (cut to the top-p nucleus)."""
    u = _uniforms(how.generator, (2, *x_BL.shape), x_BL.device)
    chosen = (x_BL == how.mask_id) & (u[0] < reveal_prob)
    if not bool(chosen.any()):
        return x_BL
    q_NV = top_p_filter(probs_BLV[chosen].double(), how.top_p)
    out = x_BL.clone()
    out[chosen] = categorical(q_NV, u[1][chosen])
    return out


def _time_grid(steps: int, end: float = 0.0) -> list[float]:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, end, steps + 1, dtype=torch.float64).tolist()


@torch.no_grad()
def masked_ancestral(
    probs_fn: ProbsFn, x_BL: torch.Tensor, how: MaskedSteps, *, reuse_unchanged: bool = False
) -> torch.Tensor:
    """MDLM's ancestral sampler (Sahoo et al. 2024, eq. 7) from t = 1 to 0.

    From t to s < t a masked position is revealed with probability
    (alpha_s - alpha_t) / (1 - alpha_t) and takes its token from p_theta(x_0 | x_t);
    clean positions stay. The last step reveals every position still masked.
    ``reuse_unchanged``: when a step changed no token, the next one reuses the previous
    probabilities instead of calling the network (MDLM's cache); valid only when the
    network ignores t (no time conditioning).
    """
    times = _time_grid(how.steps)
    probs = None
    for i in range(how.steps):
        if not bool((x_BL == how.mask_id).any()):
            break
        t, s = times[i], times[i + 1]
        if probs is None:
            probs = probs_fn(x_BL, t)
        if i == how.steps - 1:
            pi = 1.0
        else:
            alpha_t, alpha_s = how.schedule.alpha(as_times(t)), how.schedule.alpha(as_times(s))
            pi = float((alpha_s - alpha_t) / (1 - alpha_t))
        new = reveal(x_BL, probs, pi, how)
        if not (reuse_unchanged and torch.equal(new, x_BL)):
            probs = None
        x_BL = new
    return x_BL


def _ranks(key_BL: torch.Tensor, u_BL: torch.Tensor) -> torch.Tensor:
    """Each position's rank in its row by ``key`` descending (0 = largest); ties go by the
    uniforms, so equal keys (e.g. two certain predictions) are ordered at random."""
    by_u = u_BL.argsort(-1, descending=True)
    by_key = key_BL.gather(-1, by_u).argsort(dim=-1, descending=True, stable=True)
    order = by_u.gather(-1, by_key)
    positions = torch.arange(key_BL.shape[-1], device=key_BL.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def commit_most_confident(
    x_BL: torch.Tensor,
    probs_BLV: torch.Tensor,
    count_B: torch.Tensor,
    how: MaskedSteps,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One confidence step: every masked position draws a candidate from its row of
    ``probs_BLV`` (sharpened by 1 / temperature, cut to top_p; temperature 0 = argmax) and
    the ``count_B`` candidates of each row with the largest probability of their drawn
    token are committed. Returns (x, confidence (B, L): that probability where committed,
    +inf elsewhere)."""
    u = _uniforms(how.generator, (2, *x_BL.shape), x_BL.device)
    masked = x_BL == how.mask_id
    q_NV = probs_BLV[masked].double()
    if temperature == 0:
        token_N = q_NV.argmax(-1)
    else:
        if temperature != 1:
            q_NV = (q_NV.log() / temperature).softmax(-1)
        q_NV = top_p_filter(q_NV, how.top_p)
        token_N = categorical(q_NV, u[1][masked])
    conf_BL = torch.full(x_BL.shape, -math.inf, dtype=torch.float64, device=x_BL.device)
    conf_BL[masked] = q_NV.gather(-1, token_N[:, None])[:, 0]
    chosen = masked & (_ranks(conf_BL, u[0]) < count_B[:, None])
    out, tokens_BL = x_BL.clone(), x_BL.clone()
    tokens_BL[masked] = token_N
    out[chosen] = tokens_BL[chosen]
    return out, torch.where(chosen, conf_BL, math.inf)


@torch.no_grad()
def masked_confidence(
    probs_fn: ProbsFn,
    x_BL: torch.Tensor,
    how: MaskedSteps,
    *,
    temperature: float = 1.0,
    remask: float = 0.0,
    t_end: float = 0.0,
) -> torch.Tensor:
    """Confidence-ordered unmasking (MaskGIT, Chang et al. 2022; LLaDA's low-confidence
    remasking, Nie et al. 2025), optionally with a remasking corrector, t = 1 -> t_end.

    Predictor, from t to s: each masked position draws a candidate token from
    p_theta(x_0 | x_t) (see ``commit_most_confident``) and the k most confident
    candidates of the row are committed, confidence being the probability of the drawn
    token. k leaves round(M (1 - alpha_s - c) / (1 - alpha_1 - c)) positions masked,
    M the row's masked count at the start and c = 1 - alpha_{t_end}: the schedule's mask
    ratio (linear in t for the log-linear schedule), none after the last step.

    Corrector (``remask`` > 0), after each predictor step: ReMDM's confidence remasking
    (Wang et al. 2025, "Remasking Discrete Diffusion Models with Inference-Time Scaling",
    ReMDM-conf) in top-k form. ReMDM-conf remasks each decoded token with a probability
    shared out by softmax(-psi), psi the probability the token had when it was decoded;
    here the r = round(remask R) decoded tokens of lowest psi are remasked (R: how many
    this sampler has decoded so far; positions clean in the input never are), and one
    predictor step at s commits r tokens again, so the masked count stays on the
    schedule. The last step's corrector thus re-predicts the r weakest tokens with all
    others visible. Network calls: ``steps`` (skipping steps that commit nothing), twice
    that with the corrector.
    """
    if remask < 0 or remask > 1:
        raise ValueError(f"remask must be in [0, 1], got {remask}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    schedule, steps, mask_id = how.schedule, how.steps, how.mask_id
    times = _time_grid(steps, t_end)
    ends = schedule.mask_prob(as_times([1.0, t_end]))
    masked_at_start_B = (x_BL == mask_id).sum(-1)
    decoded_BL = torch.zeros_like(x_BL, dtype=torch.bool)
    psi_BL = torch.full(x_BL.shape, math.inf, dtype=torch.float64, device=x_BL.device)
    for i in range(steps):
        t, s = times[i], times[i + 1]
        left = float((schedule.mask_prob(as_times(s)) - ends[1]) / (ends[0] - ends[1]))
        target_B = torch.round(masked_at_start_B * (left if i < steps - 1 else 0.0)).long()
        count_B = ((x_BL == mask_id).sum(-1) - target_B).clamp_min(0)
        if bool((count_B > 0).any()):
            x_BL, psi = commit_most_confident(x_BL, probs_fn(x_BL, t), count_B, how, temperature)
            decoded_BL |= psi < math.inf
            psi_BL = torch.where(psi < math.inf, psi, psi_BL)
        redo_B = torch.round(remask * decoded_BL.sum(-1)).long()
        if not bool((redo_B > 0).any()):
            continue
        u = _uniforms(how.generator, x_BL.shape, x_BL.device)
        key_BL = torch.where(decoded_BL, -psi_BL, -math.inf)
        weakest = decoded_BL & (_ranks(key_BL, u) < redo_B[:, None])
        x_BL = x_BL.masked_fill(weakest, mask_id)
        decoded_BL &= ~weakest
        x_BL, psi = commit_most_confident(x_BL, probs_fn(x_BL, s), redo_B, how, temperature)
        decoded_BL |= psi < math.inf
        psi_BL = torch.where(psi < math.inf, psi, psi_BL)
    return x_BL


@torch.no_grad()
def score_sampler(
    logits_fn: LogitsFn,
    x_BL: torch.Tensor,
    how: MaskedSteps,
    *,
    method: str = "analytic",
    t_end: float = 1e-5,
) -> torch.Tensor:
    """SEDD's samplers for the absorbing graph (Lou et al. 2024), t = 1 -> t_end, then
    a final denoising step.

    The network's logits l give the log-scores (ratios p_t(y) / p_t([MASK])) of a masked
    position: log s_y = l_y - log(V - 1) - log expm1(sigma_bar(t)) for y != [MASK]
    (SEDD's scale-by-sigma). With S = sum_y exp(l_y) / (V - 1) the total score is
    S / expm1(sigma_bar), and a revealed position takes y with probability
    s_y / sum s = softmax(l) over the real ids (cut to top_p).

    * ``euler``: tau-leaping with the reverse rate [MASK] -> y = dsigma(t) s_y: over
      dt = t - s reveal with probability dt dsigma(t) S / expm1(sigma_bar(t)).
    * ``analytic``: Tweedie tau-leaping (SEDD's analytic sampler): reveal with
      probability expm1(sigma_bar(t) - sigma_bar(s)) S / expm1(sigma_bar(t)), the exact
      reverse step when the scores are exact (= MDLM's step for normalised scores).

    Probabilities are clamped to 1. The final step reveals every remaining [MASK] from
    the scores at t_end (SEDD's denoiser).
    """
    if method not in ("analytic", "euler"):
        raise ValueError(f"unknown SEDD sampler {method!r}; one of ['analytic', 'euler']")
    schedule, mask_id = how.schedule, how.mask_id
    times = _time_grid(how.steps, t_end)
    for i in range(how.steps):
        if not bool((x_BL == mask_id).any()):
            return x_BL
        t, s = times[i], times[i + 1]
        logits = real_logits(logits_fn(x_BL, t), mask_id)
        mass_BL = torch.exp(logits.double().logsumexp(-1) - math.log(logits.shape[-1] - 1))
        t_now, t_next = as_times(t), as_times(s)
        if method == "analytic":
            total_t = schedule.total(t_now)
            factor = torch.expm1(total_t - schedule.total(t_next)) / torch.expm1(total_t)
        else:
            factor = (t - s) * schedule.weight(t_now)
        pi = (float(factor) * mass_BL).clamp(max=1.0)
        x_BL = reveal(x_BL, logits.softmax(-1), pi, how)
    if bool((x_BL == mask_id).any()):
        probs = real_logits(logits_fn(x_BL, times[-1]), mask_id).softmax(-1)
        x_BL = reveal(x_BL, probs, 1.0, how)
    return x_BL


@torch.no_grad()
def semi_autoregressive(
    model: nn.Module,
    num: int,
    length: int,
    how: MaskedSteps,
    *,
    block_size: int,
    reuse_unchanged: bool = False,
    kv_cache: bool = True,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """BD3-LM's sampler (Arriola et al. 2025): blocks left to right, each denoised from
    all-[MASK] by ``steps`` MDLM ancestral steps (SUBS) while attending to the clean
    blocks before it, then appended.

    With ``kv_cache`` the clean prefix lives in the model's KV cache: denoising passes
    run with ``cache.frozen = True`` and one pass with ``frozen = False`` commits each
    finished block (noise level 0). Without, every pass recomputes the whole prefix under
    the block-causal mask, the reference the cache must reproduce. A last block shorter
    than ``block_size`` takes the remaining length.
    """
    schedule, mask_id = how.schedule, how.mask_id
    x_BL = torch.empty(num, 0, dtype=torch.long, device=device)
    cache = model.new_kv_cache() if kv_cache else None
    for start in range(0, length, block_size):
        size = min(block_size, length - start)

        def probs_fn(block: torch.Tensor, t: float, prefix: torch.Tensor = x_BL) -> torch.Tensor:
            sigma = float(schedule.total(as_times(t)))
            if cache is not None:
                cache.frozen = True
                logits = model(block, torch.full((num,), sigma, device=device), kv_cache=cache)
            else:
                tokens = torch.cat([prefix, block], dim=1)
                sigma_BL = torch.zeros(tokens.shape, device=device)
                sigma_BL[:, prefix.shape[1] :] = sigma
                mask = block_causal_mask(tokens.shape[1], block_size, device=device)
                logits = model(tokens, sigma_BL, attn_mask=mask)[:, prefix.shape[1] :]
            return real_logits(logits, mask_id).softmax(-1)

        block = torch.full((num, size), mask_id, dtype=torch.long, device=device)
        block = masked_ancestral(probs_fn, block, how, reuse_unchanged=reuse_unchanged)
        if cache is not None and start + size < length:
            cache.frozen = False
            model(block, torch.zeros(num, device=device), kv_cache=cache)
        x_BL = torch.cat([x_BL, block], dim=1)
    return x_BL


@torch.no_grad()
def autoregressive(
    model: nn.Module,
    num: int,
    length: int,
    *,
    bos_id: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_p: float = 1.0,
    kv_cache: bool = True,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Left-to-right decoding after BOS: softmax(logits / temperature) cut to top_p
    (temperature 0 = greedy). With ``kv_cache`` each step feeds one token and the cache
    grows (``frozen = False``); without, every step recomputes the prefix causally."""
    seq = torch.full((num, 1), bos_id, dtype=torch.long, device=device)
    cache = model.new_kv_cache() if kv_cache else None
    if cache is not None:
        cache.frozen = False
    for _ in range(length):
        if cache is not None:
            logits = model(seq[:, -1:], kv_cache=cache)[:, -1]
        else:
            causal = torch.ones(seq.shape[1], seq.shape[1], dtype=torch.bool, device=device)
            logits = model(seq, attn_mask=causal.tril())[:, -1]
        u = _uniforms(generator, (num,), device)
        if temperature == 0:
            token = logits.argmax(-1)
        else:
            probs = top_p_filter((logits.double() / temperature).softmax(-1), top_p)
            token = categorical(probs, u)
        seq = torch.cat([seq, token[:, None]], dim=1)
    return seq[:, 1:]
