"""Timestep distributions, shifts, loss weightings and DDPM schedules against their formulas.

Reference values are recomputed here with plain ``math`` loops (diffusers is not a
dependency); published numbers are cited where they exist.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.objectives.schedules import (
    MODE_SCALE_MAX,
    DiscreteSchedule,
    alphas_cumprod,
    ddpm_betas,
    min_snr_weight,
    rescale_zero_terminal_snr,
    resolution_shift,
    rf_loss_weight,
    sample_timesteps,
    shift_timesteps,
    snr,
    spaced_timesteps,
    timestep_bin_losses,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def integrate(fn, num: int = 200_001) -> float:
    """Trapezoid rule over [0, 1] in float64."""
    t = torch.linspace(0, 1, num, dtype=torch.float64)
    return float(torch.trapezoid(fn(t), t))


# --------------------------------------------------------------- timestep sampling


def test_uniform_and_mode_with_scale_zero_agree():
    """f_mode(u; 0) = 1 - u: the same uniform draws, mirrored."""
    uniform = sample_timesteps("uniform", 1000, gen(3)).double()
    mode = sample_timesteps("mode", 1000, gen(3), mode_scale=0.0).double()
    assert torch.allclose(mode, 1 - uniform, atol=1e-6)


def test_mode_sampling_follows_its_map():
    """P(t <= f_mode(u0)) = 1 - u0, since f_mode is decreasing; s > 0 concentrates mid-range."""
    s = 1.29
    t = sample_timesteps("mode", 200_000, gen(1), mode_scale=s)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    for u0 in (0.1, 0.3, 0.5, 0.8):
        f = 1 - u0 - s * (math.cos(math.pi * u0 / 2) ** 2 - 1 + u0)
        assert float((t <= f).double().mean()) == pytest.approx(1 - u0, abs=5e-3)
    middle = ((t > 0.25) & (t < 0.75)).double().mean()
    assert float(middle) > 0.6  # uniform would give 0.5


@pytest.mark.parametrize("scale", [-1.01, MODE_SCALE_MAX + 1e-3])
def test_mode_scale_outside_monotone_range_is_rejected(scale):
    with pytest.raises(ValueError, match="monotone"):
        sample_timesteps("mode", 4, gen(), mode_scale=scale)


def test_logit_normal_has_requested_logit_moments():
    t = sample_timesteps("logit_normal", 200_000, gen(7), logit_mean=0.5, logit_std=1.5).double()
    logit = torch.log(t) - torch.log1p(-t)
    assert float(logit.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(logit.std()) == pytest.approx(1.5, abs=0.02)


def test_unknown_sampling_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_timesteps("lognormal", 4, gen())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- shift


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
def test_shift_keeps_endpoints_and_is_monotone(shift):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    shifted = shift_timesteps(t, shift)
    assert float(shifted[0]) == 0.0 and float(shifted[-1]) == pytest.approx(1.0, abs=1e-15)
    assert (shifted[1:] > shifted[:-1]).all()
    if shift > 1:
        assert (shifted[1:-1] > t[1:-1]).all()  # toward noise
    if shift == 1.0:
        assert torch.equal(shifted, t)


def test_resolution_shift_interpolates_mu_between_base_and_max():
    assert resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert resolution_shift(4096) == pytest.approx(math.exp(1.15))
    assert resolution_shift((256 + 4096) / 2) == pytest.approx(math.exp((0.5 + 1.15) / 2))
    assert resolution_shift(1024) > resolution_shift(512)
    # Flux's time_shift(mu, 1, t) = e^mu / (e^mu + (1/t - 1)) is the same warp
    mu = math.log(resolution_shift(1024))
    for t in (0.1, 0.5, 0.9):
        flux = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        assert shift_timesteps(t, resolution_shift(1024)) == pytest.approx(flux)


# ------------------------------------------------------------------- RF weightings


def test_rf_weightings_match_their_densities():
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    assert torch.equal(rf_loss_weight("none", t), torch.ones_like(t))
    m, s = 0.3, 0.8
    lognorm = rf_loss_weight("lognorm", t, logit_mean=m, logit_std=s)
    cosmap = rf_loss_weight("cosmap", t)
    for k, tk in enumerate(t.tolist()):
        logit = math.log(tk / (1 - tk))
        expected = math.exp(-((logit - m) ** 2) / (2 * s * s)) / (
            s * math.sqrt(2 * math.pi) * tk * (1 - tk)
        )
        assert float(lognorm[k]) == pytest.approx(expected, rel=1e-12)
        # cosmap is |du/dt| of t = 1 - 1 / (tan(pi u / 2) + 1), u = (2 / pi) atan(t / (1 - t))
        u = lambda x: 2 / math.pi * math.atan(x / (1 - x))  # noqa: E731
        derivative = (u(tk + 1e-6) - u(tk - 1e-6)) / 2e-6
        assert float(cosmap[k]) == pytest.approx(derivative, rel=1e-6)


@pytest.mark.parametrize("kind", ["lognorm", "cosmap"])
def test_rf_weightings_are_densities_and_finite_at_the_ends(kind):
    assert integrate(lambda t: rf_loss_weight(kind, t)) == pytest.approx(1.0, abs=1e-4)
    ends = rf_loss_weight(kind, torch.tensor([0.0, 1.0]))
    assert torch.isfinite(ends).all()


# ------------------------------------------------------------------ DDPM schedules


def test_scaled_linear_matches_stable_diffusion():
    betas = ddpm_betas("scaled_linear", 1000)
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    for i in (0, 1, 500, 998, 999):
        assert float(betas[i]) == pytest.approx((lo + i / 999 * (hi - lo)) ** 2, rel=1e-12)
    abar = alphas_cumprod(betas)
    # Lin et al. 2024, Table 1: Stable Diffusion's terminal sqrt(abar_T) = 0.068265
    assert math.sqrt(float(abar[-1])) == pytest.approx(0.068265, abs=2e-6)


def test_linear_matches_ho_et_al_and_scales_with_steps():
    betas = ddpm_betas("linear", 1000)
    for i in (0, 250, 999):
        assert float(betas[i]) == pytest.approx(1e-4 + i / 999 * (0.02 - 1e-4), rel=1e-12)
    half = ddpm_betas("linear", 500)  # improved-diffusion: end points scaled by 1000 / T
    assert float(half[0]) == pytest.approx(2e-4) and float(half[-1]) == pytest.approx(0.04)


def test_cosine_matches_nichol_dhariwal():
    num = 1000
    betas = ddpm_betas("cosine", num)
    abar = alphas_cumprod(betas)

    def f(step: int) -> float:
        return math.cos((step / num + 0.008) / 1.008 * math.pi / 2) ** 2

    for i in (0, 1, 400, 900, 998):
        assert float(betas[i]) == pytest.approx(min(1 - f(i + 1) / f(i), 0.999), rel=1e-10)
        assert float(abar[i]) == pytest.approx(f(i + 1) / f(0), rel=1e-9)  # unclipped steps
    assert float(betas[-1]) == pytest.approx(0.999)  # clipped: f(T) = cos^2(pi / 2) = 0


def test_alphas_cumprod_and_snr_match_loops():
    betas = ddpm_betas("scaled_linear", 50)
    product, expected = 1.0, []
    for beta in betas.tolist():
        product *= 1 - beta
        expected.append(product)
    abar = alphas_cumprod(betas)
    assert torch.allclose(abar, torch.tensor(expected, dtype=torch.float64), rtol=1e-13)
    assert float(snr(torch.tensor(0.5))) == 1.0 and float(snr(torch.tensor(0.0))) == 0.0


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_rescaling(kind):
    betas = ddpm_betas(kind, 1000)
    rescaled = rescale_zero_terminal_snr(betas)
    old, new = alphas_cumprod(betas), alphas_cumprod(rescaled)
    assert float(new[-1]) == 0.0 and float(rescaled[-1]) == 1.0
    assert (rescaled > 0).all() and (rescaled <= 1).all()
    assert float(snr(new[:1])) == pytest.approx(float(snr(old[:1])), rel=1e-10)
    # sqrt(abar) is moved by an affine map: its increments are scaled by one constant
    ratio = new.sqrt().diff() / old.sqrt().diff()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-8)
    assert float(snr(old[-1])) > 0  # the original does not end in pure noise


def test_discrete_schedule_build_and_network_time():
    schedule = DiscreteSchedule.build("cosine", 200, zero_terminal_snr=True)
    assert schedule.num_train_steps == 200 and float(schedule.alphas_cumprod[-1]) == 0.0
    assert schedule.network_time(50) == 0.25
    assert torch.equal(schedule.network_time(torch.tensor([0, 199])), torch.tensor([0.0, 0.995]))


# ------------------------------------------------------------------------- Min-SNR


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weight_matches_hang_et_al(prediction):
    gamma = 5.0
    values = [0.01, 0.5, 1.0, 4.99, 5.0, 20.0, 1000.0]
    weights = min_snr_weight(torch.tensor(values, dtype=torch.float64), gamma, prediction)
    for value, weight in zip(values, weights.tolist()):
        denominator = value if prediction == "eps" else value + 1
        assert weight == pytest.approx(min(value, gamma) / denominator, rel=1e-12)
    at_zero = min_snr_weight(torch.zeros(1, dtype=torch.float64), gamma, prediction)
    assert float(at_zero) == (1.0 if prediction == "eps" else 0.0)  # the SNR -> 0 limits


# ------------------------------------------------------------------ sampler spacing


def test_spaced_timesteps():
    assert spaced_timesteps(1000, 10, "trailing") == list(range(999, 0, -100))
    assert spaced_timesteps(1000, 10, "leading") == list(range(900, -1, -100))
    assert spaced_timesteps(1000, 10, "linspace") == list(range(999, -1, -111))
    assert spaced_timesteps(1000, 1000, "trailing") == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps must be"):
        spaced_timesteps(100, 101)


# ------------------------------------------------------------------- bin logging


def test_timestep_bin_losses_average_per_bin():
    t = torch.tensor([0.05, 0.1, 0.25, 0.39, 0.99, 1.0])
    loss = torch.tensor([1.0, 3.0, 5.0, 6.0, 7.0, 9.0])
    logs = timestep_bin_losses(t, loss, 5)
    assert list(logs) == [
        "loss_bin/0.0-0.2",
        "loss_bin/0.2-0.4",
        "loss_bin/0.4-0.6",
        "loss_bin/0.6-0.8",
        "loss_bin/0.8-1.0",
    ]
    assert logs["loss_bin/0.0-0.2"] == 2.0
    assert logs["loss_bin/0.2-0.4"] == 5.5
    assert logs["loss_bin/0.8-1.0"] == 8.0  # t = 1 falls in the last bin
    assert math.isnan(logs["loss_bin/0.4-0.6"]) and math.isnan(logs["loss_bin/0.6-0.8"])


@pytest.mark.parametrize("num_bins", [1, 3, 11, 20, 100])
def test_timestep_bin_labels_stay_distinct(num_bins):
    t = torch.rand(4096, generator=gen(0))
    logs = timestep_bin_losses(t, torch.ones_like(t), num_bins)
    assert len(logs) == num_bins
    assert all(v == 1.0 for v in logs.values())
