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

import numpy as np
import torch
from torch import nn

from models.autoencoder import IdentityAutoencoderConfig, build_autoencoder
from trainer.configlib import option
from trainer.objectives.base import EvalContext, ExtraModule, Objective
from trainer.objectives.conditioning import ConditioningConfig, TextConditioner
from trainer.samplers.flow import SAMPLERS, shifted_timesteps, with_guidance


def sample_seed(seed: int, step: int, index: int) -> int:
    """A per-(step, sample) seed; distinct streams for distinct arguments."""
    return (seed * 0x9E3779B1 + step * 0x85EBCA77 + index * 0xC2B2AE3D) % (2**63 - 1)


@dataclass(kw_only=True)
class RectifiedFlowConfig:
    name: str = option("rectified_flow", "Training objective.")
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = option(
        "uniform", "Distribution of training times t (SD3: logit_normal with m=0, s=1)."
    )
    logit_mean: float = option(0.0, "Mean m of logit-normal t sampling.")
    logit_std: float = option(1.0, "Std s of logit-normal t sampling.", gt=0)
    mode_scale: float = option(1.29, "Scale s of mode sampling (SD3 paper).", ge=-1, le=2)
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
    sampler: Literal["euler", "heun"] = option("euler", "ODE sampler used for evaluation samples.")
    autoencoder: IdentityAutoencoderConfig | None = option(
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


class RectifiedFlow(Objective):
    def __init__(self, cfg: RectifiedFlowConfig, *, seed: int, rank: int, device: torch.device):
        from trainer.objectives import schedules

        self.schedules = schedules
        self.cfg = cfg
        self.device = device
        self.seed = seed
        # Without sample indices in the batch, noise comes from a per-rank generator
        # whose state is checkpointed, so a resumed run draws what it would have drawn.
        self.generator = torch.Generator(device="cpu").manual_seed(seed * 1000 + 17 + rank)
        self.autoencoder = (
            build_autoencoder(cfg.autoencoder) if cfg.autoencoder is not None else None
        )
        self.conditioner = (
            TextConditioner(cfg.conditioning, seed) if cfg.conditioning is not None else None
        )

    def extra_modules(self) -> dict[str, ExtraModule]:
        if self.conditioner is None:
            return {}
        return {"conditioner": ExtraModule(self.conditioner, trainable=False)}

    # --------------------------------------------------------------------- time
    def shift_for(self, x0: torch.Tensor) -> float:
        if not self.cfg.resolution_shift:
            return self.cfg.shift
        tokens = math.prod(x0.shape[2:]) // 4 if x0.dim() == 4 else x0[0].numel()  # 2x2 patches
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
    def to_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["x"].to(self.device)
        if self.autoencoder is not None:
            x = self.autoencoder.to(self.device).encode(x)
        return x

    def loss(self, phase: str, modules: dict[str, nn.Module], batch: dict[str, Any], step: int):
        x0 = self.to_latents(batch)
        shift = self.shift_for(x0)
        eps, t_B = self.draw_noise(x0, batch, step, shift)
        eps = eps.to(self.device, x0.dtype)
        t_B = t_B.to(self.device)
        t = t_B.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - t) * x0 + t * eps
        cond = self.condition(modules, batch, training=True, step=step)
        pred = modules["model"](x_t, t_B, cond) if cond is not None else modules["model"](x_t, t_B)
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

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        modules: dict[str, nn.Module],
        noise: torch.Tensor,
        *,
        steps: int,
        prompts: list[str] | None = None,
        guidance: float = 1.0,
        sampler: str | None = None,
        drop_t5: bool = False,
    ) -> torch.Tensor:
        """Noise (B, ...) -> samples in data space (decoded by the autoencoder), with CFG."""
        model = modules["model"]
        shift = self.shift_for(noise)
        timesteps = shifted_timesteps(steps, shift, device=noise.device)
        if self.conditioner is not None:
            if prompts is None or len(prompts) != noise.shape[0]:
                raise ValueError("a text-conditioned model needs one prompt per sample")
            cond, uncond = self.conditioner.for_prompts(prompts, noise.device, drop_t5=drop_t5)
            velocity = with_guidance(
                lambda x, t: model(x, t, cond).float(),
                lambda x, t: model(x, t, uncond).float(),
                guidance,
            )
        else:
            velocity = lambda x, t: model(x, t).float()  # noqa: E731
        samples = SAMPLERS[sampler or self.cfg.sampler](velocity, noise, timesteps)
        if self.autoencoder is not None:
            samples = self.autoencoder.to(noise.device).decode(samples)
        return samples

    @torch.no_grad()
    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        gen = torch.Generator(device="cpu").manual_seed(1234)
        shape = ctx.data.sample_shape()
        if self.autoencoder is not None and len(shape) == 3:
            shape = self.autoencoder.latent_shape(*shape)
        noise = torch.randn((ctx.num_samples, *shape), generator=gen).to(ctx.device)
        prompts = ctx.data.eval_prompts(ctx.num_samples) if self.conditioner is not None else None
        samples = self.generate(
            ctx.modules, noise, steps=ctx.sample_steps, prompts=prompts, guidance=ctx.guidance
        )
        if ctx.rank != 0:
            return {}
        return ctx.data.evaluate_samples(
            samples.cpu().numpy().astype(np.float32), ctx.out_dir, ctx.step
        )

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
