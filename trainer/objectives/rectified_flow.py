"""Rectified flow: x_t = (1 - t) x0 + t eps, the network regresses v = eps - x0.

House time convention: t = 0 data, t = 1 noise. Images are mapped to latents by the
configured autoencoder (identity = pixel space) unless the shards already hold latents.
With a conditioning section the objective owns the frozen text conditioner and trains
for classifier-free guidance by dropping conditions (see conditioning.py).

Shapes: B batch, D... data dims (C, H, W for images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from configlib import option
from models.autoencoders import AutoencoderSection
from trainer.objectives.base import sample_seed
from trainer.objectives.conditioning import ConditioningConfig
from trainer.objectives.latent import LatentObjective
from trainer.samplers.flow import SAMPLERS, shifted_timesteps


@dataclass(kw_only=True)
class RectifiedFlowConfig:
    name: str = option("rectified_flow", "Training objective.")
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = option(
        "uniform", "Distribution of training times t (SD3: logit_normal with m=0, s=1)."
    )
    logit_mean: float = option(0.0, "Mean m of logit-normal t sampling.")
    logit_std: float = option(1.0, "Std s of logit-normal t sampling.", gt=0)
    mode_scale: float = option(
        1.29, "Scale s of mode sampling (SD3 paper); monotone up to 2/(pi-2).", ge=-1, le=1.752
    )
    shift: float = option(
        1.0, "Time shift s (t' = s t / (1 + (s-1) t)) for training and sampling.", gt=0
    )
    resolution_shift: bool = option(
        False,
        "Derive the shift from the number of image tokens (larger images: more noise) instead of 'shift'.",
    )
    loss_weighting: Literal["none", "lognorm", "cosmap"] = option(
        "none", "Per-timestep loss weight (SD3 paper names)."
    )
    timestep_bins: int = option(
        0, "Also log the loss in this many equal bins of t; 0 disables.", ge=0, le=20
    )
    prediction: Literal["velocity", "data"] = option(
        "velocity",
        "What the network outputs: the velocity v = eps - x0, or the clean data x0 (JiT's "
        "x-prediction, v = (x_t - x0) / t in the loss and the sampler): for pixel space with "
        "large patches, where a small network cannot carry the noise through.",
    )
    min_t: float = option(
        0.05,
        "x-prediction: the t under which v = (x_t - x0) / t divides by this instead.",
        gt=0,
        lt=1,
    )
    sampler: Literal["euler", "heun"] = option("euler", "ODE sampler used for evaluation samples.")
    autoencoder: AutoencoderSection | None = option(
        None,
        "Autoencoder between images and latents; null for data that is already the training space.",
    )
    conditioning: ConditioningConfig | None = option(
        None, "Text conditioning (CLIP / T5); null is unconditional."
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = []
        if self.timestep_sampling != "logit_normal":
            out += [
                (k, "has no effect unless timestep_sampling is 'logit_normal'")
                for k in ("logit_mean", "logit_std")
                if k in given
            ]
        if self.timestep_sampling != "mode" and "mode_scale" in given:
            out.append(("mode_scale", "has no effect unless timestep_sampling is 'mode'"))
        if self.resolution_shift and "shift" in given:
            out.append(("shift", "has no effect when resolution_shift is true"))
        return out


class RectifiedFlow(LatentObjective):
    def __init__(self, cfg: RectifiedFlowConfig, *, seed: int, rank: int, device: torch.device):
        from trainer.objectives import schedules

        super().__init__(cfg, seed=seed, device=device)
        self.schedules = schedules
        # Without sample indices in the batch, noise comes from a per-rank generator
        # whose state is checkpointed, so a resumed run draws what it would have drawn.
        self.generator = torch.Generator(device="cpu").manual_seed(seed * 1000 + 17 + rank)

    # --------------------------------------------------------------------- time
    def shift_for(self, x0: torch.Tensor) -> float:
        if not self.cfg.resolution_shift:
            return self.cfg.shift
        if x0.dim() in (4, 5):  # images, videos: 2x2 patches per frame (length counts)
            tokens = math.prod(x0.shape[2:]) // 4
        else:  # 1-D latent sequences: a token per frame; flat points: their size
            tokens = x0.shape[-1] if x0.dim() == 3 else x0[0].numel()
        return self.schedules.resolution_shift(tokens)

    def sample_t(self, count: int, shift: float | None = None) -> torch.Tensor:
        t = self.schedules.sample_timesteps(
            self.cfg.timestep_sampling,
            count,
            self.generator,
            logit_mean=self.cfg.logit_mean,
            logit_std=self.cfg.logit_std,
            mode_scale=self.cfg.mode_scale,
        )
        return self.schedules.shift_timesteps(t, self.cfg.shift if shift is None else shift)

    def draw_noise(
        self, x0: torch.Tensor, batch: dict[str, Any], step: int, shift: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise eps (like x0) and times t (B,).

        With global sample indices in the batch, each sample's draw depends only on
        (seed, step, index): training is then the same function of the data whatever
        the number of ranks, also across a resume on a different number of ranks.
        """
        if "index" not in batch:
            return torch.randn(x0.shape, generator=self.generator), self.sample_t(
                x0.shape[0], shift
            )
        eps, times = [], []
        saved = self.generator.get_state()
        for index in batch["index"].tolist():
            self.generator.manual_seed(sample_seed(self.seed, step, index))
            times.append(self.sample_t(1, shift))
            eps.append(torch.randn(x0.shape[1:], generator=self.generator))
        self.generator.set_state(saved)
        return torch.stack(eps), torch.cat(times)

    # --------------------------------------------------------------------- loss
    def loss(self, phase: str, modules: dict[str, nn.Module], batch: dict[str, Any], step: int):
        x0 = self.to_latents(batch)
        shift = self.shift_for(x0)
        eps, t_B = self.draw_noise(x0, batch, step, shift)
        eps = eps.to(self.device, x0.dtype)
        t_B = t_B.to(self.device)
        t = t_B.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - t) * x0 + t * eps
        cond = self.condition(modules, batch, training=True, step=step)
        pred = self.velocity(x_t, t_B, self.call_model(modules["model"], x_t, t_B, cond))
        per_sample = (pred.float() - (eps - x0).float()).pow(2).flatten(1).mean(1)
        if self.cfg.loss_weighting != "none":
            per_sample = per_sample * self.schedules.rf_loss_weight(
                self.cfg.loss_weighting, t_B
            ).to(per_sample)
        logs: dict[str, float] = {}
        if self.cfg.timestep_bins:
            logs = self.schedules.timestep_bin_losses(
                t_B.detach().cpu(), per_sample.detach().cpu(), self.cfg.timestep_bins
            )
        return per_sample.mean(), logs

    def velocity(self, x_t: torch.Tensor, t_B: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The network's output as a velocity: itself, or from its x0 (x-prediction)."""
        if self.cfg.prediction == "velocity":
            return out
        t = t_B.clamp_min(self.cfg.min_t).view(-1, *([1] * (x_t.dim() - 1)))
        return (x_t.to(out.dtype) - out) / t.to(out.dtype)

    # ------------------------------------------------------------------ sampling
    def integrate(
        self, model_fn, noise: torch.Tensor, steps: int, sampler: str | None
    ) -> torch.Tensor:
        timesteps = shifted_timesteps(steps, self.shift_for(noise), device=noise.device)
        if self.cfg.prediction == "velocity":
            velocity = model_fn
        else:  # guidance mixes x0 predictions, the same as mixing their velocities
            velocity = lambda x, t: self.velocity(x, t, model_fn(x, t))  # noqa: E731
        return SAMPLERS[sampler or self.cfg.sampler](velocity, noise, timesteps)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
