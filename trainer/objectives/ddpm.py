"""DDPM-family objective: x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps, predict eps or v.

Time stays discrete here (steps i = 0 .. T-1 indexing abar, as in diffusers); the
network is fed the float time i / T in [0, 1), the same kind of input the flow
objectives give it. Targets (Ho et al. 2020; Salimans & Ho 2022 for v):

* eps-prediction: target eps;
* v-prediction:   target v = sqrt(abar) eps - sqrt(1 - abar) x0.

Shapes: B batch, D... data dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from configlib import option
from models.autoencoders import AutoencoderSection
from trainer.objectives.base import sample_seed
from trainer.objectives.conditioning import ConditioningConfig
from trainer.objectives.latent import LatentObjective
from trainer.objectives.schedules import (
    DiscreteSchedule,
    min_snr_weight,
    snr,
    timestep_bin_losses,
)
from trainer.samplers.ddpm import SAMPLERS


@dataclass(kw_only=True)
class DDPMConfig:
    name: str = option("ddpm", "Training objective.")
    prediction: Literal["eps", "v"] = option(
        "eps", "Network target: the noise eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0."
    )
    schedule: Literal["linear", "scaled_linear", "cosine"] = option(
        "scaled_linear", "Beta schedule: DDPM linear, Stable Diffusion scaled_linear, or cosine."
    )
    num_train_steps: int = option(1000, "Number T of discrete diffusion steps.", ge=2)
    zero_terminal_snr: bool = option(
        False, "Rescale the schedule so the last step is pure noise (Lin et al. 2024)."
    )
    loss_weighting: Literal["none", "min_snr"] = option(
        "none", "Per-timestep loss weighting: none, or Min-SNR-gamma (Hang et al. 2023)."
    )
    min_snr_gamma: float = option(5.0, "Clip gamma of the Min-SNR weighting.", gt=0)
    sampler: Literal["ddim", "dpmpp_2m"] = option(
        "ddim", "Sampler used for evaluation samples: DDIM (eta 0) or DPM-Solver++(2M)."
    )
    sample_spacing: Literal["trailing", "leading", "linspace"] = option(
        "trailing", "Which discrete steps the evaluation sampler visits."
    )
    timestep_bins: int = option(
        5, "Log the loss in this many equal bins of t = i / T; 0 disables.", ge=0
    )
    autoencoder: AutoencoderSection | None = option(
        None, "Autoencoder between images and latents; null for data already in the training space."
    )
    conditioning: ConditioningConfig | None = option(
        None, "Text conditioning (CLIP / T5); null is unconditional."
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        problems = []
        if self.loss_weighting != "min_snr" and "min_snr_gamma" in given:
            problems.append(("min_snr_gamma", "has no effect unless loss_weighting is 'min_snr'"))
        if self.zero_terminal_snr and self.prediction == "eps":
            problems.append(
                (
                    "zero_terminal_snr",
                    "needs prediction 'v': at the terminal step abar = 0, x_T is the noise "
                    "itself and an eps-prediction says nothing about x0",
                )
            )
        return problems


class DDPM(LatentObjective):
    def __init__(self, cfg: DDPMConfig, *, seed: int, rank: int, device: torch.device):
        super().__init__(cfg, seed=seed, device=device)
        self.schedule = DiscreteSchedule.build(
            cfg.schedule, cfg.num_train_steps, zero_terminal_snr=cfg.zero_terminal_snr
        )
        # Same scheme as RectifiedFlow: a per-rank generator whose state is checkpointed,
        # and per-sample draws from (seed, step, index) when the batch carries indices.
        self.generator = torch.Generator(device="cpu").manual_seed(seed * 1000 + 17 + rank)

    def draw_noise(
        self, x0: torch.Tensor, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise eps (like x0, CPU) and integer steps i (B,) in [0, T), CPU.

        With global sample indices in the batch, each sample's draw depends only on
        (seed, step, index), whatever the number of ranks (see RectifiedFlow.draw_noise).
        """
        num_steps = self.cfg.num_train_steps
        if "index" not in batch:
            steps = torch.randint(num_steps, (x0.shape[0],), generator=self.generator)
            return torch.randn(x0.shape, generator=self.generator), steps
        eps, steps = [], []
        saved = self.generator.get_state()
        for index in batch["index"].tolist():
            self.generator.manual_seed(sample_seed(self.seed, step, index))
            steps.append(torch.randint(num_steps, (1,), generator=self.generator))
            eps.append(torch.randn(x0.shape[1:], generator=self.generator))
        self.generator.set_state(saved)
        return torch.stack(eps), torch.cat(steps)

    def loss(
        self, phase: str, modules: dict[str, nn.Module], batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = self.to_latents(batch)
        eps, steps_B = self.draw_noise(x0, batch, step)
        eps = eps.to(self.device, x0.dtype)
        abar_B = self.schedule.alphas_cumprod[steps_B]  # float64, CPU
        shape = (-1, *([1] * (x0.dim() - 1)))
        alpha = abar_B.sqrt().to(self.device, torch.float32).view(shape)
        sigma = (1 - abar_B).sqrt().to(self.device, torch.float32).view(shape)
        x_t = alpha * x0 + sigma * eps
        t_B = self.schedule.network_time(steps_B).to(self.device)
        cond = self.condition(modules, batch, training=True, step=step)
        pred = self.call_model(modules["model"], x_t, t_B, cond)
        if self.cfg.prediction == "v":
            target = alpha * eps.float() - sigma * x0.float()
        else:
            target = eps.float()
        per_sample = (pred.float() - target).pow(2).flatten(1).mean(dim=1)  # (B,)
        if self.cfg.loss_weighting == "min_snr":
            weight = min_snr_weight(snr(abar_B), self.cfg.min_snr_gamma, self.cfg.prediction)
            loss = (weight.to(self.device, torch.float32) * per_sample).mean()
        else:
            loss = per_sample.mean()
        logs: dict[str, float] = {}
        if self.cfg.timestep_bins:
            # unweighted MSE per bin: comparable across weightings and runs
            logs.update(timestep_bin_losses(t_B, per_sample, self.cfg.timestep_bins))
        return loss, logs

    def integrate(
        self, model_fn, noise: torch.Tensor, steps: int, sampler: str | None
    ) -> torch.Tensor:
        name = sampler or self.cfg.sampler
        if name not in SAMPLERS:
            raise ValueError(f"unknown DDPM sampler {name!r}; one of {sorted(SAMPLERS)}")
        return SAMPLERS[name](
            model_fn,
            noise,
            self.schedule,
            steps=steps,
            prediction=self.cfg.prediction,
            spacing=self.cfg.sample_spacing,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
