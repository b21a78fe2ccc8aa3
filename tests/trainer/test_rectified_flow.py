"""Rectified flow's x-prediction (``prediction: data``): the network outputs x0 and the
loss and the samplers see the velocity v = (x_t - x0) / t it implies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from configlib import ConfigError, from_dict
from trainer.objectives.rectified_flow import RectifiedFlow, RectifiedFlowConfig

X0 = torch.linspace(-1, 1, 2 * 3 * 4).view(2, 3, 4)


class Constant(nn.Module):
    """Outputs the same tensor whatever the input: the exact x0 of one-point data."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.value.expand_as(x).clone()


def objective(**cfg) -> RectifiedFlow:
    config = from_dict(RectifiedFlowConfig, {"name": "rectified_flow", **cfg})
    return RectifiedFlow(config, seed=0, rank=0, device=torch.device("cpu"))


def test_the_true_data_as_x_prediction_has_zero_loss_and_as_velocity_does_not():
    batch = {"x": X0[:1].repeat(64, 1, 1)}  # one-point data
    exact = {"model": Constant(batch["x"][0])}
    loss, _ = objective(prediction="data", min_t=1e-6).loss("train", exact, batch, step=0)
    assert float(loss) < 1e-8
    wrong, _ = objective().loss("train", exact, batch, step=0)  # read as a velocity
    assert float(wrong) > 0.1


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 4])
def test_samplers_land_on_the_predicted_data_at_any_step_count(sampler, steps):
    # v = (x - x0) / t is the straight path to x0: every Euler or Heun step is exact
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    obj = objective(prediction="data", sampler=sampler)
    out = obj.generate({"model": Constant(X0)}, noise, steps=steps)
    assert torch.allclose(out, X0, atol=1e-5)
    as_velocity = objective(sampler=sampler).generate({"model": Constant(X0)}, noise, steps=steps)
    assert not torch.allclose(as_velocity, X0, atol=1e-2)


def test_below_min_t_the_velocity_divides_by_min_t():
    obj = objective(prediction="data", min_t=0.1)
    x_t, x0 = torch.ones(2, 3), torch.zeros(2, 3)
    v = obj.velocity(x_t, torch.tensor([0.5, 0.01]), x0)
    assert torch.allclose(v[0], torch.full((3,), 2.0)) and torch.allclose(
        v[1], torch.full((3,), 10.0)
    )
    assert torch.equal(objective().velocity(x_t, torch.tensor([0.5, 0.01]), x0), x0)


def test_bad_prediction_settings_are_one_line_each():
    with pytest.raises(ConfigError, match="prediction"):
        from_dict(RectifiedFlowConfig, {"prediction": "noise"})
    with pytest.raises(ConfigError, match="min_t"):
        from_dict(RectifiedFlowConfig, {"prediction": "data", "min_t": 0.0})
