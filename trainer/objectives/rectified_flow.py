"""Rectified flow: x_t = (1 - t) x0 + t eps, the network regresses v = eps - x0.

Shapes: B batch, D... data dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from trainer.configlib import option
from trainer.objectives.base import EvalContext, Objective
from trainer.samplers.flow import SAMPLERS, shifted_timesteps


@dataclass
class RectifiedFlowConfig:
    name: str = option("rectified_flow", "Training objective.")
    timestep_sampling: Literal["uniform", "logit_normal"] = option(
        "uniform", "Distribution of training times t."
    )
    logit_mean: float = option(0.0, "Mean m of logit-normal t sampling.")
    logit_std: float = option(1.0, "Std s of logit-normal t sampling.", gt=0)
    shift: float = option(
        1.0, "Time shift s (t' = s t / (1 + (s-1) t)) for training and sampling.", gt=0
    )
    sampler: Literal["euler", "heun"] = option("euler", "ODE sampler used for evaluation samples.")

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        if self.timestep_sampling != "logit_normal":
            return [
                (k, "has no effect unless timestep_sampling is 'logit_normal'")
                for k in ("logit_mean", "logit_std")
                if k in given
            ]
        return []


def sample_seed(seed: int, step: int, index: int) -> int:
    """A per-(step, sample) seed; distinct streams for distinct arguments."""
    return (seed * 0x9E3779B1 + step * 0x85EBCA77 + index * 0xC2B2AE3D) % (2**63 - 1)


class RectifiedFlow(Objective):
    def __init__(self, cfg: RectifiedFlowConfig, *, seed: int, rank: int, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.seed = seed
        # Noise and times come from a per-rank generator whose state is checkpointed, so
        # a resumed run draws exactly what an uninterrupted one would have.
        self.generator = torch.Generator(device="cpu").manual_seed(seed * 1000 + 17 + rank)

    def sample_t(self, count: int) -> torch.Tensor:
        if self.cfg.timestep_sampling == "uniform":
            t = torch.rand(count, generator=self.generator)
        else:
            u = (
                torch.randn(count, generator=self.generator) * self.cfg.logit_std
                + self.cfg.logit_mean
            )
            t = torch.sigmoid(u)
        s = self.cfg.shift
        return s * t / (1 + (s - 1) * t)

    def draw_noise(
        self, x0: torch.Tensor, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise eps (like x0) and times t (B,).

        With global sample indices in the batch, each sample's draw depends only on
        (seed, step, index): training is then the same function of the data whatever
        the number of ranks, also across a resume on a different number of ranks.
        """
        if "index" not in batch:
            return torch.randn(x0.shape, generator=self.generator), self.sample_t(x0.shape[0])
        eps, times = [], []
        saved = self.generator.get_state()
        for index in batch["index"].tolist():
            self.generator.manual_seed(sample_seed(self.seed, step, index))
            times.append(self.sample_t(1))
            eps.append(torch.randn(x0.shape[1:], generator=self.generator))
        self.generator.set_state(saved)
        return torch.stack(eps), torch.cat(times)

    def loss(self, phase: str, modules: dict[str, nn.Module], batch: dict[str, Any], step: int):
        x0 = batch["x"].to(self.device)
        eps, t_B = self.draw_noise(x0, batch, step)
        eps = eps.to(self.device, x0.dtype)
        t_B = t_B.to(self.device)
        t = t_B.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - t) * x0 + t * eps
        pred = modules["model"](x_t, t_B)
        loss = (pred.float() - (eps - x0).float()).pow(2).mean()
        return loss, {}

    @torch.no_grad()
    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        model = ctx.modules["model"]
        gen = torch.Generator(device="cpu").manual_seed(1234)
        noise = torch.randn((ctx.num_samples, *ctx.data.sample_shape()), generator=gen).to(
            ctx.device
        )
        timesteps = shifted_timesteps(ctx.sample_steps, self.cfg.shift, device=ctx.device)
        samples = SAMPLERS[self.cfg.sampler](lambda x, t: model(x, t).float(), noise, timesteps)
        if ctx.rank != 0:
            return {}
        return ctx.data.evaluate_samples(
            samples.cpu().numpy().astype(np.float32), ctx.out_dir, ctx.step
        )

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
