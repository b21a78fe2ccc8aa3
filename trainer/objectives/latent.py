"""What every image diffusion/flow objective shares, whatever its maths: the autoencoder
between images and latents, the frozen text conditioner, classifier-free-guided
generation and evaluation. Subclasses supply ``integrate`` (their sampler) and ``loss``."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from models.autoencoders import build_autoencoder
from trainer.objectives.base import EvalContext, ExtraModule, Objective
from trainer.objectives.conditioning import TextConditioner
from trainer.samplers.flow import with_guidance

TIMING = ("seconds_start", "seconds_total")  # audio windows' timing condition (Stable Audio)

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LatentObjective(Objective):
    def __init__(self, cfg: Any, *, seed: int, device: torch.device):
        self.cfg = cfg
        self.seed = seed
        self.device = device
        ae_cfg = getattr(cfg, "autoencoder", None)
        cond_cfg = getattr(cfg, "conditioning", None)
        self.autoencoder = build_autoencoder(ae_cfg) if ae_cfg is not None else None
        self.conditioner = TextConditioner(cond_cfg, seed) if cond_cfg is not None else None

    def extra_modules(self) -> dict[str, ExtraModule]:
        if self.conditioner is None:
            return {}
        return {"conditioner": ExtraModule(self.conditioner, trainable=False)}

    def model_problems(self, model_cfg: Any) -> list[str]:
        have = getattr(model_cfg, "in_channels", None)
        ae = self.autoencoder
        if ae is None or have is None or have == ae.latent_channels:
            return []
        name = getattr(getattr(self.cfg, "autoencoder", None), "name", "autoencoder")
        return [
            f"model.in_channels is {have} but the {name} autoencoder gives "
            f"{ae.latent_channels}-channel latents: set model.in_channels: {ae.latent_channels}"
        ]

    def to_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["x"].to(self.device)
        if self.autoencoder is not None:
            x = self.autoencoder.to(self.device).encode(x)
        return x

    def condition(
        self, modules: dict[str, nn.Module], batch: dict[str, Any], *, training: bool, step: int = 0
    ) -> dict[str, torch.Tensor] | None:
        """The text condition (see :meth:`Objective.condition`) plus the batch's timing
        (``seconds_start`` / ``seconds_total`` of audio windows), which is never dropped."""
        cond = super().condition(modules, batch, training=training, step=step)
        timing = {k: batch[k].to(self.device).float() for k in TIMING if k in batch}
        return {**(cond or {}), **timing} or None

    @staticmethod
    def call_model(
        model: nn.Module, x: torch.Tensor, t_B: torch.Tensor, cond: dict | None
    ) -> torch.Tensor:
        return model(x, t_B, cond) if cond is not None else model(x, t_B)

    @abstractmethod
    def integrate(
        self, model_fn: ModelFn, noise: torch.Tensor, steps: int, sampler: str | None
    ) -> torch.Tensor:
        """Run the objective's sampler from ``noise`` (B, ...) to data space."""

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
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Noise (B, ...) -> samples in data space (decoded by the autoencoder), with CFG.

        ``extra``: conditions guidance keeps in both branches (audio timing, (B,) each)."""
        model = modules["model"]
        extra = {k: v.to(noise.device) for k, v in (extra or {}).items()}
        if self.conditioner is not None:
            if prompts is None or len(prompts) != noise.shape[0]:
                raise ValueError("a text-conditioned model needs one prompt per sample")
            cond, uncond = self.conditioner.for_prompts(prompts, noise.device, drop_t5=drop_t5)
            cond, uncond = {**cond, **extra}, {**uncond, **extra}
            model_fn = with_guidance(
                lambda x, t: model(x, t, cond).float(),
                lambda x, t: model(x, t, uncond).float(),
                guidance,
            )
        else:
            if prompts is not None:
                raise ValueError("this model has no text conditioning: sample without prompts")
            if extra:
                model_fn = lambda x, t: model(x, t, extra).float()  # noqa: E731
            else:
                model_fn = lambda x, t: model(x, t).float()  # noqa: E731
        samples = self.integrate(model_fn, noise, steps, sampler)
        if self.autoencoder is not None:
            samples = self.autoencoder.to(noise.device).decode(samples)
        return samples

    @torch.no_grad()
    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        gen = torch.Generator(device="cpu").manual_seed(1234)
        shape = ctx.data.sample_shape()
        if self.autoencoder is not None and len(shape) == self.autoencoder.signal_axes + 1:
            shape = self.autoencoder.latent_shape(*shape)
        noise = torch.randn((ctx.num_samples, *shape), generator=gen).to(ctx.device)
        # what the data asks samples to be generated for: prompts (text-conditioned models)
        # and, for audio, the timing of each requested clip
        conditions = ctx.data.eval_conditions(ctx.num_samples, prompts=self.conditioner is not None)
        extra = {k: v for k, v in conditions.items() if k in TIMING}
        samples = self.generate(
            ctx.modules, noise, steps=ctx.sample_steps, prompts=conditions.get("prompts"),
            guidance=ctx.guidance, extra=extra,
        )  # fmt: skip
        if ctx.rank != 0:
            return {}
        return ctx.data.evaluate_samples(
            samples.cpu().numpy().astype(np.float32), ctx.out_dir, ctx.step, conditions
        )
