"""ODE samplers for flow models in the house time convention.

t = 0 is data, t = 1 is noise; the network predicts the velocity v = eps - x0, so
dx/dt = v and sampling integrates from t = 1 down to t = 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def shifted_timesteps(num_steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """num_steps + 1 times from 1 to 0, warped by the resolution shift s: t' = s t / (1 + (s - 1) t)."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, device=device, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def with_guidance(cond_fn: VelocityFn, uncond_fn: VelocityFn | None, scale: float) -> VelocityFn:
    """Classifier-free guidance: v = v_u + w (v_c - v_u); w = 1 or no uncond_fn is plain conditional."""
    if uncond_fn is None or scale == 1.0:
        return cond_fn

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_u = uncond_fn(x, t)
        return v_u + scale * (cond_fn(x, t) - v_u)

    return guided


@torch.no_grad()
def euler(velocity: VelocityFn, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """First-order Euler from timesteps[0] (noise) to timesteps[-1] (data)."""
    x = noise
    for t_now, t_next in zip(timesteps[:-1], timesteps[1:]):
        t_B = torch.full((x.shape[0],), float(t_now), device=x.device)
        x = x + (t_next - t_now) * velocity(x, t_B)
    return x


@torch.no_grad()
def heun(velocity: VelocityFn, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Second-order Heun (trapezoidal corrector); the last step to t = 0 is plain Euler."""
    x = noise
    for t_now, t_next in zip(timesteps[:-1], timesteps[1:]):
        dt = t_next - t_now
        t_B = torch.full((x.shape[0],), float(t_now), device=x.device)
        v = velocity(x, t_B)
        x_pred = x + dt * v
        if float(t_next) > 0:
            v_next = velocity(x_pred, torch.full_like(t_B, float(t_next)))
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x_pred
    return x


SAMPLERS = {"euler": euler, "heun": heun}
