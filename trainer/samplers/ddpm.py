"""Samplers for discrete-time eps / v diffusion models (DDIM, DPM-Solver++(2M)).

All share one signature ``sampler(model_fn, noise, schedule, *, steps, prediction, ...)``:

* ``model_fn(x, t_B)`` returns the network's prediction (eps or v) for x at the float
  time t_B = i / T in [0, 1) (the time input every network of this framework takes);
* ``noise`` is the start x at the first visited step (standard normal noise);
* ``schedule`` is a :class:`~trainer.objectives.schedules.DiscreteSchedule`.

They visit ``steps`` discrete steps chosen by :func:`spaced_timesteps` (``trailing`` by
default) and take one last step to clean data (abar = 1). With alpha = sqrt(abar) and
sigma = sqrt(1 - abar), x_i = alpha x0 + sigma eps, and the predictions convert as

* eps: x0 = (x - sigma eps) / alpha,
* v = alpha eps - sigma x0: x0 = alpha x - sigma v, eps = sigma x + alpha v.

Classifier-free guidance combines predictions linearly, which is exact for eps and v
alike (v is affine in eps at fixed x and t): wrap the conditional and unconditional
functions with :func:`guided` (the flow samplers' ``with_guidance``).

Shapes: B batch, D... data dims.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from trainer.objectives.schedules import DiscreteSchedule, Prediction, Spacing, spaced_timesteps
from trainer.samplers.flow import with_guidance

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

guided = with_guidance  # out = uncond + scale (cond - uncond); scale 1 is plain conditional


def _plan(
    schedule: DiscreteSchedule, steps: int, spacing: Spacing, prediction: Prediction
) -> tuple[list[int], list[float]]:
    """Visited steps and their abar, plus abar = 1 appended for the final step to x0."""
    if prediction not in ("eps", "v"):
        raise ValueError(f"unknown prediction {prediction!r}; one of eps, v")
    visited = spaced_timesteps(schedule.num_train_steps, steps, spacing)
    abar = [float(schedule.alphas_cumprod[i]) for i in visited]
    if prediction == "eps" and min(abar) <= 0.0:
        raise ValueError(
            "eps-prediction cannot be sampled from a step with abar = 0 (zero terminal SNR): "
            "x0 = (x - sigma eps) / alpha divides by 0; use v-prediction"
        )
    return visited, [*abar, 1.0]


def _to_x0_eps(
    out: torch.Tensor, x: torch.Tensor, abar: float, prediction: Prediction
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) predicted from the network output at a step with signal fraction abar."""
    alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
    if prediction == "v":
        return alpha * x - sigma * out, sigma * x + alpha * out
    return (x - sigma * out) / alpha, out


def _time(x: torch.Tensor, step: int, schedule: DiscreteSchedule) -> torch.Tensor:
    return torch.full((x.shape[0],), step / schedule.num_train_steps, device=x.device)


@torch.no_grad()
def ddim(
    model_fn: ModelFn,
    noise: torch.Tensor,
    schedule: DiscreteSchedule,
    *,
    steps: int,
    eta: float = 0.0,
    prediction: Prediction = "eps",
    spacing: Spacing = "trailing",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) from ``noise`` to data in ``steps`` model calls.

    From step t to the next s (abar_s > abar_t), with x0, eps predicted at t:

        sigma_eta = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)
        x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma_eta^2) eps + sigma_eta z,  z ~ N(0, 1)

    eta = 0 is deterministic: Euler on the probability-flow ODE in (x / alpha, sigma / alpha),
    a first-order method. eta = 1 is ancestral DDPM sampling. The last step (abar_s = 1)
    returns x0. ``generator`` seeds z for eta > 0.
    """
    visited, abar = _plan(schedule, steps, spacing, prediction)
    x = noise
    for k, step in enumerate(visited):
        abar_t, abar_s = abar[k], abar[k + 1]
        x0, eps = _to_x0_eps(model_fn(x, _time(x, step, schedule)), x, abar_t, prediction)
        sigma_eta = 0.0
        if eta > 0 and abar_s < 1.0:
            sigma_eta = eta * math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
        x = math.sqrt(abar_s) * x0 + math.sqrt(max(1 - abar_s - sigma_eta**2, 0.0)) * eps
        if sigma_eta > 0:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = x + sigma_eta * z
    return x


def _log_snr(abar: float) -> float:
    """lambda = log(alpha / sigma) = 0.5 log(abar / (1 - abar)); -inf at abar = 0, inf at 1."""
    if abar <= 0.0:
        return -math.inf
    if abar >= 1.0:
        return math.inf
    return 0.5 * (math.log(abar) - math.log1p(-abar))


@torch.no_grad()
def dpmpp_2m(
    model_fn: ModelFn,
    noise: torch.Tensor,
    schedule: DiscreteSchedule,
    *,
    steps: int,
    prediction: Prediction = "eps",
    spacing: Spacing = "trailing",
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, second order, data prediction.

    With lambda = log(alpha / sigma), h = lambda_s - lambda_t and D the x0-prediction, a
    step from t to s is

        x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D

    where D = D_t on the first step (first order) and on the final step to x0 (there
    sigma_s = 0, h = inf and x_s = D_t), and otherwise the multistep estimate
    D = (1 + 1 / (2 r)) D_t - 1 / (2 r) D_prev with r = h_prev / h. One model call per step.
    """
    visited, abar = _plan(schedule, steps, spacing, prediction)
    x = noise
    d_prev: torch.Tensor | None = None
    h_prev = math.nan
    for k, step in enumerate(visited):
        abar_t, abar_s = abar[k], abar[k + 1]
        d_now, _ = _to_x0_eps(model_fn(x, _time(x, step, schedule)), x, abar_t, prediction)
        if abar_s >= 1.0:  # final step to clean data: sigma_s = 0, exp(-h) = 0
            x = d_now
            break
        h = _log_snr(abar_s) - _log_snr(abar_t)
        d = d_now
        # second order needs a finite previous step: not after a start at abar = 0
        if d_prev is not None and math.isfinite(h_prev):
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * d_now - (1 / (2 * r)) * d_prev
        sigma_ratio = math.sqrt((1 - abar_s) / (1 - abar_t))
        x = sigma_ratio * x - math.sqrt(abar_s) * math.expm1(-h) * d
        d_prev, h_prev = d_now, h
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": ddim, "dpmpp_2m": dpmpp_2m}
