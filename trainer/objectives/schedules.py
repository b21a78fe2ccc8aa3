"""Noise schedules, timestep distributions and loss weightings, as pure functions.

Two time conventions meet here, and each function says which one it uses:

* **Continuous (rectified flow)**: t in [0, 1], t = 0 data, t = 1 noise,
  x_t = (1 - t) x0 + t eps (the house convention, see ``trainer.samplers.flow``).
* **Discrete (DDPM)**: integer steps i = 0 .. T-1 indexing ``alphas_cumprod`` (the
  diffusers convention; step i is Ho et al.'s t = i + 1), x_i = sqrt(abar_i) x0 +
  sqrt(1 - abar_i) eps. The network is always fed the float time i / T in [0, 1), so a
  network sees the same time input whichever objective trains it.

Shapes: B batch, T number of DDPM training steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

TimestepSampling = Literal["uniform", "logit_normal", "mode"]
RFLossWeighting = Literal["none", "lognorm", "cosmap"]
BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
Prediction = Literal["eps", "v"]
Spacing = Literal["trailing", "leading", "linspace"]

# Largest |s| for which the mode map below stays monotone (Esser et al. 2024, eq. 20).
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)


# ------------------------------------------------------------- rectified-flow times


def sample_timesteps(
    kind: TimestepSampling,
    count: int,
    generator: torch.Generator | None = None,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Training times t (count,) in [0, 1] for rectified flow (Esser et al. 2024, SD3, §3.1).

    * ``uniform``: t ~ U(0, 1).
    * ``logit_normal``: t = sigmoid(m + s n), n ~ N(0, 1), i.e. logit(t) ~ N(m, s^2);
      density pi_ln(t; m, s) = 1 / (s sqrt(2 pi)) * 1 / (t (1 - t)) * exp(-(logit t - m)^2 / (2 s^2)).
    * ``mode``: u ~ U(0, 1), t = f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u)
      (SD3 eq. 20). s = 0 gives t = 1 - u (uniform); s > 0 favours the middle, s < 0 the
      ends. f_mode is a monotone bijection of [0, 1] only for -1 <= s <= 2 / (pi - 2).

    Draws come from ``generator`` (CPU), so a seeded generator reproduces them exactly.
    """
    if kind == "uniform":
        return torch.rand(count, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(count, generator=generator) * logit_std + logit_mean)
    if kind == "mode":
        if not -1.0 <= mode_scale <= MODE_SCALE_MAX:
            raise ValueError(
                f"mode_scale {mode_scale} is outside [-1, {MODE_SCALE_MAX:.4f}], where the "
                "mode map stops being monotone"
            )
        u = torch.rand(count, generator=generator).double()  # the uniform draws, mirrored
        t = 1 - u - mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        return t.clamp(0.0, 1.0).float()
    raise ValueError(f"unknown timestep sampling {kind!r}; one of uniform, logit_normal, mode")


def shift_timesteps(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Time shift t' = s t / (1 + (s - 1) t) (SD3 §5.3.2); keeps 0 and 1, monotone in t.

    s > 1 moves times toward noise (t = 1), which higher resolutions need because their
    many correlated pixels keep more signal at a given noise level.
    """
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(
    num_tokens: float,
    base_tokens: float = 256,
    max_tokens: float = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The resolution-dependent shift s = exp(mu), mu linear in the token count (Flux, SD3.5).

    mu = base_shift + (max_shift - base_shift) (n - base_tokens) / (max_tokens - base_tokens),
    so ``base_tokens`` gives exp(base_shift) and ``max_tokens`` gives exp(max_shift); other
    counts are interpolated (and extrapolated) linearly in mu, as Flux does. Feeding
    s = exp(mu) to :func:`shift_timesteps` equals Flux's exp(mu) / (exp(mu) + (1/t - 1)).
    """
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return math.exp(base_shift + slope * (num_tokens - base_tokens))


def rf_loss_weight(
    kind: RFLossWeighting,
    t: torch.Tensor,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Per-sample weight w(t) (B,) of the rectified-flow loss (SD3 §3.1, names from Tab. 1).

    Weighting the loss by a density pi(t) while sampling t uniformly trains, in
    expectation, the same objective as sampling t ~ pi with weight 1:

    * ``none``: w = 1.
    * ``lognorm``: w = pi_ln(t; m, s), the logit-normal density (see :func:`sample_timesteps`).
    * ``cosmap``: w = pi_cosmap(t) = 2 / (pi - 2 pi t + 2 pi t^2), the density of
      t = 1 - 1 / (tan(pi u / 2) + 1), u ~ U(0, 1).

    Both densities integrate to 1 over [0, 1], so the loss scale stays comparable.
    """
    if kind == "none":
        return torch.ones_like(t)
    if kind == "lognorm":
        # pi_ln -> 0 at both ends; clamping keeps 0 * inf from turning into NaN there
        t64 = t.double().clamp(1e-12, 1 - 1e-12)
        logit = torch.log(t64) - torch.log1p(-t64)
        density = torch.exp(-((logit - logit_mean) ** 2) / (2 * logit_std**2)) / (
            logit_std * math.sqrt(2 * math.pi) * t64 * (1 - t64)
        )
        return density.to(t.dtype)
    if kind == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    raise ValueError(f"unknown RF loss weighting {kind!r}; one of none, lognorm, cosmap")


# ----------------------------------------------------------------- DDPM schedules


def ddpm_betas(
    kind: BetaSchedule,
    num_steps: int,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
) -> torch.Tensor:
    """Per-step variances beta_i (T,) float64 for i = 0 .. T-1.

    * ``linear`` (Ho et al. 2020): beta linear from 1e-4 to 0.02 at T = 1000, both scaled
      by 1000 / T as in Nichol & Dhariwal's improved-diffusion, so other T keep the same
      total noise.
    * ``scaled_linear`` (Stable Diffusion / LDM, Rombach et al. 2022): sqrt(beta) linear
      from sqrt(0.00085) to sqrt(0.012), i.e. beta_i = (sqrt(b0) + i/(T-1) (sqrt(b1) - sqrt(b0)))^2.
    * ``cosine`` (Nichol & Dhariwal 2021, eq. 17): abar(t) = f(t) / f(0),
      f(t) = cos^2(((t / T) + 0.008) / 1.008 * pi / 2), beta_i = min(1 - abar(i+1) / abar(i), 0.999).

    ``beta_start`` / ``beta_end`` override the linear schedules' end points (unscaled).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("beta_start / beta_end have no effect on the cosine schedule")
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    if kind == "linear":
        scale = 1000.0 / num_steps
        start = beta_start if beta_start is not None else 1e-4 * scale
        end = beta_end if beta_end is not None else 0.02 * scale
        return torch.linspace(start, end, num_steps, dtype=torch.float64)
    if kind == "scaled_linear":
        start = beta_start if beta_start is not None else 0.00085
        end = beta_end if beta_end is not None else 0.012
        return torch.linspace(start**0.5, end**0.5, num_steps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown beta schedule {kind!r}; one of linear, scaled_linear, cosine")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_i = prod_{j <= i} (1 - beta_j) (T,), the signal fraction at step i."""
    return torch.cumprod(1 - betas.double(), dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas (T,) so the last step is pure noise (Lin et al. 2024, Algorithm 1).

    sqrt(abar) is shifted so its last value is 0 and scaled so its first value is
    unchanged: sqrt(abar)' = (sqrt(abar) - sqrt(abar_T)) * sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_T)).
    Then abar_T = 0 (SNR 0, beta_T = 1), abar_0 and so the first SNR are unchanged, and
    the betas stay in (0, 1]. Pair it with v-prediction: at SNR 0 an eps-prediction
    says nothing about x0.
    """
    sqrt_abar = alphas_cumprod(betas).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def snr(abar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR = abar / (1 - abar); 0 where abar = 0."""
    return abar / (1 - abar)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 10 and §3.4) per sample (B,).

    The x0-loss weight min(SNR, gamma) expressed for the network's own target:

    * eps-prediction: w = min(SNR, gamma) / SNR = min(1, gamma / SNR) (1 also at SNR = 0);
    * v-prediction:   w = min(SNR, gamma) / (SNR + 1).
    """
    if prediction == "eps":
        return torch.where(snr_t > gamma, gamma / snr_t, torch.ones_like(snr_t))
    if prediction == "v":
        return snr_t.clamp(max=gamma) / (snr_t + 1)
    raise ValueError(f"unknown prediction {prediction!r}; one of eps, v")


@dataclass(frozen=True)
class DiscreteSchedule:
    """A DDPM noise schedule: abar_i for the T training steps i = 0 .. T-1 (float64, CPU)."""

    alphas_cumprod: torch.Tensor  # (T,)

    @property
    def num_train_steps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def build(
        cls, kind: BetaSchedule, num_train_steps: int, *, zero_terminal_snr: bool = False
    ) -> DiscreteSchedule:
        betas = ddpm_betas(kind, num_train_steps)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(alphas_cumprod(betas))

    def network_time(self, step: torch.Tensor | int) -> torch.Tensor | float:
        """The network's float time input i / T in [0, 1) for discrete step(s) i."""
        if isinstance(step, torch.Tensor):
            return step.float() / self.num_train_steps
        return step / self.num_train_steps


def spaced_timesteps(num_train_steps: int, steps: int, spacing: Spacing = "trailing") -> list[int]:
    """The ``steps`` discrete steps a sampler visits, from most to least noisy.

    With T = num_train_steps and n = steps (as in diffusers, and Lin et al. 2024 Tab. 2):

    * ``trailing`` (default): round(T - k T / n) - 1 for k = 0 .. n-1, e.g. T = 1000,
      n = 10: 999, 899, ..., 99. It always starts at the noisiest step T - 1, which a
      zero-terminal-SNR schedule needs to start from pure noise.
    * ``leading``: k (T // n) for k = n-1 .. 0, e.g. 900, 800, ..., 0. Never visits the
      last 1 / n of the steps, so sampling starts from a less noisy level than training.
    * ``linspace``: round(linspace(T - 1, 0, n)), e.g. 999, 888, ..., 0: both ends.

    The samplers then take one more step from the last of these to clean data (abar = 1).
    """
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be in [1, {num_train_steps}], got {steps}")
    if spacing == "trailing":
        return [round(num_train_steps - k * num_train_steps / steps) - 1 for k in range(steps)]
    if spacing == "leading":
        ratio = num_train_steps // steps
        return [k * ratio for k in range(steps - 1, -1, -1)]
    if spacing == "linspace":
        grid = torch.linspace(num_train_steps - 1, 0, steps, dtype=torch.float64)
        return [int(v) for v in grid.round().tolist()]
    raise ValueError(f"unknown timestep spacing {spacing!r}; one of trailing, leading, linspace")


# ------------------------------------------------------------------------ logging


def timestep_bin_losses(
    t: torch.Tensor, per_sample_loss: torch.Tensor, num_bins: int
) -> dict[str, float]:
    """Mean loss per time bin: {"loss_bin/0.0-0.2": mean, ...} for t (B,) in [0, 1].

    Bin k holds k / n <= t < (k + 1) / n (the last also t = 1). Every bin is always
    present, so all ranks log the same keys (the loop all-reduces key by key); a bin
    without samples reports NaN ("no data"), not a made-up number. Labels carry enough
    decimals to stay distinct for any n. For DDPM pass t = i / T.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    t = t.detach().float().flatten()
    loss = per_sample_loss.detach().float().flatten()
    index = (t * num_bins).floor().long().clamp(0, num_bins - 1)
    sums = torch.zeros(num_bins, device=loss.device).index_add_(0, index, loss)
    counts = torch.bincount(index, minlength=num_bins).to(sums.dtype)
    means = (sums / counts).tolist()  # 0 / 0 = NaN for empty bins; one device sync
    decimals = max(1, math.ceil(math.log10(num_bins)))
    return {
        f"loss_bin/{k / num_bins:.{decimals}f}-{(k + 1) / num_bins:.{decimals}f}": mean
        for k, mean in enumerate(means)
    }
