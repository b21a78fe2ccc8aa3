"""Flow samplers on a problem with a known answer.

For data x0 ~ N(mu, s^2) and noise eps ~ N(0, 1), the rectified-flow velocity is
analytic: with x_t = (1-t) x0 + t eps, E[eps - x0 | x_t] is linear in x_t. Integrating it
from t=1 to t=0 maps noise to data exactly, so the sampler error is pure discretisation.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.samplers.flow import SAMPLERS, shifted_timesteps, with_guidance

MU, S = 1.5, 0.5


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.to(torch.float64).view(-1, *([1] * (x.dim() - 1)))
    var = (1 - t) ** 2 * S**2 + t**2  # Var[x_t]
    cov = t - (1 - t) * S**2  # Cov[eps - x0, x_t]
    mean_xt = (1 - t) * MU
    return -MU + cov / var * (x - mean_xt)


def exact_map(noise: torch.Tensor) -> torch.Tensor:
    """The flow's endpoint: the ODE is linear, each noise value lands on MU + S * eps."""
    return MU + S * noise


def sample_error(name: str, steps: int, shift: float = 1.0) -> float:
    noise = torch.linspace(-2, 2, 64, dtype=torch.float64).view(-1, 1)
    ts = shifted_timesteps(steps, shift).to(torch.float64)
    out = SAMPLERS[name](exact_velocity, noise, ts)
    return float((out - exact_map(noise)).abs().max())


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_error_falls_as_steps_grow(name):
    errors = [sample_error(name, n) for n in (4, 8, 16, 32)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


def test_euler_is_first_order_and_heun_second_order():
    """Doubling the steps halves Euler's error and quarters Heun's (the last Heun step is Euler,
    which only matters at very few steps, so measure between 16 and 64 steps)."""
    euler = [sample_error("euler", n) for n in (16, 32, 64)]
    heun = [sample_error("heun", n) for n in (16, 32, 64)]
    euler_order = math.log2(euler[1] / euler[2])
    heun_order = math.log2(heun[1] / heun[2])
    assert 0.8 < euler_order < 1.3, euler
    assert heun_order > 1.6, heun
    assert heun[-1] < euler[-1] / 10


def test_shift_keeps_endpoints_and_pushes_time_toward_noise():
    ts = shifted_timesteps(10, shift=3.0)
    assert ts[0] == pytest.approx(1.0) and ts[-1] == pytest.approx(0.0)
    assert (ts[1:-1] > shifted_timesteps(10, 1.0)[1:-1]).all()
    assert sample_error("heun", 64, shift=3.0) < 1e-2  # bigger final (Euler) step near t = 0


def test_guidance_combines_conditional_and_unconditional():
    cond = lambda x, t: torch.ones_like(x)  # noqa: E731
    uncond = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x, t = torch.zeros(2, 1), torch.zeros(2)
    assert torch.equal(with_guidance(cond, uncond, 4.0)(x, t), torch.full((2, 1), 4.0))
    assert with_guidance(cond, uncond, 1.0) is cond
