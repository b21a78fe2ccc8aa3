"""The DDPM objective against slow reference computations, and its samplers on a problem
with a known answer.

For data x0 ~ N(mu, s^2) and x_i = alpha x0 + sigma eps (alpha^2 = abar, sigma^2 = 1 - abar)
the posterior means are linear in x_i:

    E[eps | x_i] = sigma (x_i - alpha mu) / (abar s^2 + 1 - abar)
    E[x0  | x_i] = mu + alpha s^2 (x_i - alpha mu) / (abar s^2 + 1 - abar)

and v = alpha eps - sigma x0. The probability-flow ODE keeps the standardised value
(x - alpha mu) / sd(x_i) fixed, so it maps a start x at step i to mu + s (x - alpha mu) / sd.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from configlib import ConfigError, from_dict
from models.flow_mlp import FlowMLP, FlowMLPConfig
from trainer.objectives.base import EvalContext, sample_seed
from trainer.objectives.ddpm import DDPM, DDPMConfig
from trainer.objectives.schedules import (
    DiscreteSchedule,
    spaced_timesteps,
    timestep_bin_losses,
)
from trainer.samplers.ddpm import SAMPLERS, ddim, dpmpp_2m, guided

MU, S = 1.5, 0.5
CPU = torch.device("cpu")


# ------------------------------------------------------------------ analytic model


def exact_prediction(schedule: DiscreteSchedule, prediction: str, mu: float = MU):
    """The exact eps- or v-prediction for Gaussian data, as a sampler's model_fn."""
    num = schedule.num_train_steps

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # samplers call with one time for the whole batch
        abar = float(schedule.alphas_cumprod[round(float(t[0]) * num)])
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        var = abar * S**2 + 1 - abar
        eps = sigma * (x - alpha * mu) / var
        if prediction == "eps":
            return eps
        x0 = mu + alpha * S**2 * (x - alpha * mu) / var
        return alpha * eps - sigma * x0

    return fn


def flow_from(schedule: DiscreteSchedule, noise: torch.Tensor, first: int, last: int | None):
    """Exact probability-flow map from step ``first`` to data.

    With ``last``, the exact flow runs to step ``last`` and then takes the samplers' own
    final step x0 = E[x0 | x_last]; only the ODE discretisation between the two steps
    then counts as error.
    """
    a1 = float(schedule.alphas_cumprod[first])
    z = (noise - math.sqrt(a1) * MU) / math.sqrt(a1 * S**2 + 1 - a1)
    if last is None:
        return MU + S * z
    a2 = float(schedule.alphas_cumprod[last])
    var2 = a2 * S**2 + 1 - a2
    x_last = math.sqrt(a2) * MU + math.sqrt(var2) * z
    return MU + math.sqrt(a2) * S**2 * (x_last - math.sqrt(a2) * MU) / var2


NOISE = torch.linspace(-2, 2, 64, dtype=torch.float64).view(-1, 1)


def sampler_error(
    name: str,
    schedule: DiscreteSchedule,
    prediction: str,
    steps: int,
    spacing: str = "trailing",
    shared_final_step: bool = False,
    model_prediction: str | None = None,
) -> float:
    visited = spaced_timesteps(schedule.num_train_steps, steps, spacing)
    model = exact_prediction(schedule, model_prediction or prediction)
    out = SAMPLERS[name](
        model, NOISE, schedule, steps=steps, prediction=prediction, spacing=spacing
    )
    ref = flow_from(schedule, NOISE, visited[0], visited[-1] if shared_final_step else None)
    return float((out - ref).abs().max())


SCHEDULES = {
    "scaled_linear/eps": (DiscreteSchedule.build("scaled_linear", 1000), "eps"),
    "scaled_linear+ztsnr/v": (
        DiscreteSchedule.build("scaled_linear", 1000, zero_terminal_snr=True),
        "v",
    ),
    "cosine/eps": (DiscreteSchedule.build("cosine", 1000), "eps"),
    "cosine+ztsnr/v": (DiscreteSchedule.build("cosine", 1000, zero_terminal_snr=True), "v"),
}


# ------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("case", ["scaled_linear/eps", "scaled_linear+ztsnr/v", "cosine/eps"])
def test_samplers_converge_to_the_flow_endpoint_and_dpmpp_beats_ddim(case):
    """Default (trailing) spacing, error against the exact endpoint of the flow."""
    schedule, prediction = SCHEDULES[case]
    errors = {
        name: [sampler_error(name, schedule, prediction, n) for n in (10, 20, 40)]
        for name in ("ddim", "dpmpp_2m")
    }
    for name, errs in errors.items():
        assert all(b < a for a, b in zip(errs, errs[1:])), (name, errs)
    assert all(p < d for p, d in zip(errors["dpmpp_2m"], errors["ddim"])), errors
    assert errors["dpmpp_2m"][-1] < 0.05


@pytest.mark.parametrize("case", ["cosine/eps", "cosine+ztsnr/v"])
def test_ddim_is_first_order_and_dpmpp_2m_second_order(case):
    """Between fixed end steps (linspace spacing: T-1 .. 0) DDIM's error halves and
    DPM-Solver++(2M)'s quarters when the steps double.

    The final jump to abar = 1 is a first-order step (x0 = D(x) from the last visited
    step) in both samplers, so the reference takes that same step from the exact flow.
    Against the raw endpoint with trailing spacing it would dominate: the last visited
    step then sits at noise level ~1/N and both samplers look first order.
    """
    schedule, prediction = SCHEDULES[case]

    def errors(name):
        return [
            sampler_error(name, schedule, prediction, n, "linspace", shared_final_step=True)
            for n in (20, 40, 80)
        ]

    ddim_errors, dpm_errors = errors("ddim"), errors("dpmpp_2m")
    ddim_orders = [math.log2(a / b) for a, b in zip(ddim_errors, ddim_errors[1:])]
    dpm_orders = [math.log2(a / b) for a, b in zip(dpm_errors, dpm_errors[1:])]
    assert all(0.8 < order < 1.2 for order in ddim_orders), ddim_errors
    assert all(order > 1.8 for order in dpm_orders), dpm_errors
    assert dpm_errors[-1] < ddim_errors[-1] / 2


def test_sampling_with_the_wrong_parameterisation_does_not_converge():
    """Broken baseline: an eps-model read as v fails the accuracy the tests above demand."""
    schedule, _ = SCHEDULES["cosine/eps"]
    for name in ("ddim", "dpmpp_2m"):
        error = sampler_error(name, schedule, "v", 80, model_prediction="eps")
        assert error > 0.5


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_eps_and_v_parameterisations_give_the_same_samples(name):
    schedule = DiscreteSchedule.build("scaled_linear", 1000)
    outs = [
        SAMPLERS[name](exact_prediction(schedule, p), NOISE, schedule, steps=15, prediction=p)
        for p in ("eps", "v")
    ]
    assert torch.allclose(outs[0], outs[1], atol=1e-10)


def test_guidance_combination_is_exact_in_eps_and_v():
    cond = lambda x, t: torch.ones_like(x)  # noqa: E731
    uncond = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x, t = torch.zeros(2, 1), torch.zeros(2)
    assert torch.equal(guided(cond, uncond, 4.0)(x, t), torch.full((2, 1), 4.0))
    assert guided(cond, uncond, 1.0) is cond
    # guiding eps and guiding v are the same sampler (v is affine in eps at fixed x, t)
    schedule = DiscreteSchedule.build("cosine", 1000)
    outs = {}
    for prediction in ("eps", "v"):
        fn = guided(
            exact_prediction(schedule, prediction, mu=MU),
            exact_prediction(schedule, prediction, mu=0.0),
            3.0,
        )
        outs[prediction] = dpmpp_2m(fn, NOISE, schedule, steps=12, prediction=prediction)
    assert torch.allclose(outs["eps"], outs["v"], atol=1e-10)
    plain = dpmpp_2m(exact_prediction(schedule, "eps"), NOISE, schedule, steps=12)
    assert float((outs["eps"] - plain).mean()) > 1.0  # guidance pushes past the class mean


def test_ancestral_ddim_approaches_the_data_distribution():
    """eta = 1 (ancestral DDPM) from exact pure noise (zero terminal SNR) tends to N(mu, s^2).

    Each ancestral step ignores Var[x0 | x_t], so few steps under-disperse the samples
    (Bao et al. 2022); the shortfall in std shrinks as the steps grow.
    """
    schedule, _ = SCHEDULES["scaled_linear+ztsnr/v"]
    noise = torch.randn(10_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = exact_prediction(schedule, "v")

    def sample(steps):
        gen = torch.Generator().manual_seed(1)
        return ddim(model, noise, schedule, steps=steps, eta=1.0, prediction="v", generator=gen)

    few, many = sample(50), sample(200)
    assert float(many.mean()) == pytest.approx(MU, abs=0.03)
    assert float(many.std()) == pytest.approx(S, abs=0.03)
    assert S - float(many.std()) < (S - float(few.std())) / 2
    assert torch.equal(many, sample(200))  # the generator makes it reproducible


def test_eps_prediction_cannot_start_from_zero_terminal_snr():
    schedule, _ = SCHEDULES["scaled_linear+ztsnr/v"]
    for sampler in (ddim, dpmpp_2m):
        with pytest.raises(ValueError, match="use v-prediction"):
            sampler(exact_prediction(schedule, "eps"), NOISE, schedule, steps=4)


# ----------------------------------------------------------------------- objective


class Recorder(nn.Module):
    """A fixed elementwise 'network' out = 0.3 x + 0.7 t - 0.1 that records its inputs."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.3))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict | None]] = []

    def forward(self, x, t_B, cond=None):
        self.calls.append((x.detach().clone(), t_B.detach().clone(), cond))
        return self.scale * x + 0.7 * t_B.view(-1, *([1] * (x.dim() - 1))) - 0.1


def scaled_linear_abar_by_hand(num_steps: int) -> list[float]:
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    abar, product = [], 1.0
    for i in range(num_steps):
        product *= 1 - (lo + i / (num_steps - 1) * (hi - lo)) ** 2
        abar.append(product)
    return abar


def reference_loss(cfg: DDPMConfig, seed: int, step: int, batch: dict, abar: list[float]):
    """The DDPM loss with explicit loops over samples and elements."""
    x0 = batch["x"]
    num = cfg.num_train_steps
    per_sample, times, weighted = [], [], []
    for b, index in enumerate(batch["index"].tolist()):
        gen = torch.Generator().manual_seed(sample_seed(seed, step, index))
        i = int(torch.randint(num, (1,), generator=gen))
        eps = torch.randn(x0.shape[1:], generator=gen).flatten().tolist()
        data = x0[b].flatten().tolist()
        alpha, sigma, t = math.sqrt(abar[i]), math.sqrt(1 - abar[i]), i / num
        total = 0.0
        for e, d in zip(eps, data):
            x_t = alpha * d + sigma * e
            out = 0.3 * x_t + 0.7 * t - 0.1
            target = e if cfg.prediction == "eps" else alpha * e - sigma * d
            total += (out - target) ** 2
        mse = total / len(data)
        weight = 1.0
        if cfg.loss_weighting == "min_snr":
            ratio = abar[i] / (1 - abar[i])
            gamma = cfg.min_snr_gamma
            if cfg.prediction == "eps":
                weight = 1.0 if ratio == 0 else min(ratio, gamma) / ratio
            else:
                weight = min(ratio, gamma) / (ratio + 1)
        per_sample.append(mse)
        times.append(t)
        weighted.append(weight * mse)
    return sum(weighted) / len(weighted), per_sample, times


def make_batch(size: int = 6, start: int = 40) -> dict:
    x = torch.randn(size, 2, 3, generator=torch.Generator().manual_seed(5))
    return {"x": x, "index": torch.arange(start, start + size)}


CONFIGS = [
    DDPMConfig(num_train_steps=20),
    DDPMConfig(num_train_steps=20, prediction="v"),
    DDPMConfig(num_train_steps=20, loss_weighting="min_snr", min_snr_gamma=2.0),
    DDPMConfig(num_train_steps=20, prediction="v", loss_weighting="min_snr"),
    DDPMConfig(
        num_train_steps=20,
        prediction="v",
        schedule="cosine",
        zero_terminal_snr=True,
        loss_weighting="min_snr",
    ),
]


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"{c.schedule}-{c.prediction}-{c.loss_weighting}"
)
def test_loss_matches_slow_reference(cfg):
    seed, step = 3, 11
    batch = make_batch(size=24)
    objective = DDPM(cfg, seed=seed, rank=0, device=CPU)
    if cfg.schedule == "scaled_linear":
        abar = scaled_linear_abar_by_hand(cfg.num_train_steps)
    else:
        abar = objective.schedule.alphas_cumprod.tolist()  # checked in test_schedules
    model = Recorder()
    loss, logs = objective.loss("model", {"model": model}, batch, step)
    expected, per_sample, times = reference_loss(cfg, seed, step, batch, abar)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    # the network saw t = i / T in [0, 1) and no conditioning
    _, t_seen, cond = model.calls[0]
    assert torch.allclose(t_seen.double(), torch.tensor(times, dtype=torch.float64))
    assert cond is None
    assert len(set(times)) > 5  # the batch really covers several steps
    expected_logs = timestep_bin_losses(torch.tensor(times), torch.tensor(per_sample), 5)
    assert logs.keys() == expected_logs.keys()
    for key, value in expected_logs.items():
        assert (math.isnan(value) and math.isnan(logs[key])) or logs[key] == pytest.approx(
            value, rel=1e-5
        )


def test_draws_depend_only_on_seed_step_and_index():
    objective = DDPM(DDPMConfig(), seed=0, rank=0, device=CPU)
    other_rank = DDPM(DDPMConfig(), seed=0, rank=3, device=CPU)
    batch = make_batch(size=6)
    eps, steps = objective.draw_noise(batch["x"], batch, step=2)
    halves = [
        other_rank.draw_noise(batch["x"][sl], {"index": batch["index"][sl]}, step=2)
        for sl in (slice(0, 2), slice(2, 6))
    ]
    assert torch.equal(eps, torch.cat([h[0] for h in halves]))
    assert torch.equal(steps, torch.cat([h[1] for h in halves]))
    assert steps.dtype == torch.int64 and int(steps.min()) >= 0 and int(steps.max()) < 1000
    later, _ = objective.draw_noise(batch["x"], batch, step=3)
    assert not torch.equal(eps, later)


def test_without_indices_the_generator_advances_and_its_state_round_trips():
    objective = DDPM(DDPMConfig(), seed=0, rank=0, device=CPU)
    x = torch.zeros(4, 2)
    state = objective.state_dict()
    first = objective.draw_noise(x, {"x": x}, 0)
    second = objective.draw_noise(x, {"x": x}, 0)
    assert not torch.equal(first[0], second[0])
    objective.load_state_dict(state)
    assert torch.equal(objective.draw_noise(x, {"x": x}, 0)[0], first[0])


def test_conditioning_comes_from_the_conditioner_with_training_dropout():
    class Conditioner(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls: list[tuple[bool, int]] = []

        def forward(self, batch, *, training, step):
            self.calls.append((training, step))
            return {"text": batch["caption_embedding"]}

    conditioner, model = Conditioner(), Recorder()
    batch = {**make_batch(4), "caption_embedding": torch.ones(4, 8)}
    objective = DDPM(DDPMConfig(timestep_bins=0), seed=0, rank=0, device=CPU)
    loss, logs = objective.loss("model", {"model": model, "conditioner": conditioner}, batch, 7)
    assert conditioner.calls == [(True, 7)]
    assert model.calls[0][2]["text"] is batch["caption_embedding"]
    assert logs == {} and torch.isfinite(loss)


def test_config_rejects_options_without_effect_and_eps_with_zero_terminal_snr():
    with pytest.raises(ConfigError) as info:
        from_dict(DDPMConfig, {"name": "ddpm", "min_snr_gamma": 3.0, "zero_terminal_snr": True})
    text = str(info.value)
    assert "min_snr_gamma: has no effect unless loss_weighting is 'min_snr'" in text
    assert "zero_terminal_snr: needs prediction 'v'" in text
    with pytest.raises(ConfigError, match="schedule"):
        from_dict(DDPMConfig, {"name": "ddpm", "schedule": "squaredcos"})
    cfg = from_dict(
        DDPMConfig,
        {
            "name": "ddpm",
            "prediction": "v",
            "zero_terminal_snr": True,
            "loss_weighting": "min_snr",
            "min_snr_gamma": 3.0,
            "sampler": "dpmpp_2m",
        },
    )
    assert cfg.min_snr_gamma == 3.0 and cfg.sampler == "dpmpp_2m"


class GaussianData:
    """A stand-in data source: 2-D N(mu, s^2) samples; evaluation reports their moments."""

    def sample_shape(self):
        return (2,)

    def eval_conditions(self, count, *, prompts):
        return {}

    def evaluate_samples(self, samples, out_dir, step, conditions=None):
        return {"eval/mean": float(samples.mean()), "eval/std": float(samples.std())}


class ExactModule(nn.Module):
    def __init__(self, schedule, prediction):
        super().__init__()
        self.fn = exact_prediction(schedule, prediction)

    def forward(self, x, t, cond=None):
        return self.fn(x.double(), t).float()


def eval_context(model, num_samples=4000, steps=25):
    return EvalContext(
        modules={"model": model},
        data=GaussianData(),
        out_dir=None,
        step=0,
        num_samples=num_samples,
        sample_steps=steps,
        device=CPU,
        rank=0,
        world_size=1,
    )


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_evaluate_samples_with_the_configured_sampler(sampler):
    cfg = DDPMConfig(prediction="v", zero_terminal_snr=True, sampler=sampler)
    objective = DDPM(cfg, seed=0, rank=0, device=CPU)
    metrics = objective.evaluate(eval_context(ExactModule(objective.schedule, "v"), 2000, 100))
    assert metrics["eval/mean"] == pytest.approx(MU, abs=0.05)
    assert metrics["eval/std"] == pytest.approx(S, abs=0.05)
    # baseline: an untrained network fails the same check
    untrained = FlowMLP(FlowMLPConfig())
    untrained.init_weights(0)
    metrics = objective.evaluate(eval_context(untrained, 256, 10))
    assert abs(metrics["eval/mean"] - MU) > 0.05 or abs(metrics["eval/std"] - S) > 0.05


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from intra-op threads, and they crawl on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_few_optimizer_steps_lower_the_loss_of_a_small_model(prediction):
    torch.manual_seed(0)
    model = FlowMLP(FlowMLPConfig())
    model.init_weights(0)
    cfg = DDPMConfig(prediction=prediction, schedule="cosine", num_train_steps=100)
    objective = DDPM(cfg, seed=0, rank=0, device=CPU)
    data = torch.Generator().manual_seed(0)

    def batch(size=64):
        return {"x": MU + S * torch.randn(size, 2, generator=data), "index": torch.arange(size)}

    held_out = batch(256)

    def held_out_loss():
        with torch.no_grad():  # fixed samples, noise and steps: comparable across updates
            return float(objective.loss("model", {"model": model}, held_out, 10**6)[0])

    before = held_out_loss()
    assert math.isfinite(before)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(30):
        loss, _ = objective.loss("model", {"model": model}, batch(), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    assert after < 0.7 * before, (before, after)
