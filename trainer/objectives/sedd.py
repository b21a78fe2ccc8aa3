"""SEDD (Lou et al. 2024) with the absorbing graph: score entropy on masked tokens.

The network's logits l give log-scores, the concrete score s_y = p_t(y) / p_t([MASK])
of replacing a masked position by y != [MASK] (SEDD's scale-by-sigma output):

    log s_y = l_y - log(V - 1) - log expm1(sigma_bar(t)).

The score of staying masked is not modelled (it is the fixed 1 of SEDD's convention and
drops out), and clean positions carry no loss: nothing moves into a clean token under
the absorbing forward process. At a masked position the denoising score entropy is

    dsigma sum_{y != MASK} [ s_y - r_y log s_y + r_y (log r_y - 1) ],
    r_y = p_t(y | x_0) / p_t(MASK | x_0) = 1[y = x_0] / expm1(sigma_bar),

which, with S = sum_{y != MASK} exp(l_y) / (V - 1), is exactly

    w(t) (S - 1 - (l_{x_0} - log(V - 1))),   w(t) = dsigma / expm1(sigma_bar).

This form has no large terms that cancel: at sigma_bar = 1e-4, r = 1e4 and the direct
sum cancels terms of size r log r (fatal in float32); the bracket stays O(1) and is
evaluated in float64. It is >= -log softmax(l)_{x_0} (MDLM's term) with equality when
S = 1. Training and NELBO estimates integrate it over t like MDLM (discrete.py). The
network must be time-conditioned (the score depends on sigma_bar through the data).

Shapes: B batch, L sequence length, V vocabulary, N time draws per sequence (1 here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from configlib import option
from trainer.objectives.discrete import (
    MaskedDiffusionConfig,
    MaskedDiffusionObjective,
    ReverseRun,
    real_logits,
    time_conditioning,
)
from trainer.samplers.discrete import score_sampler


@dataclass(kw_only=True)
class SEDDConfig(MaskedDiffusionConfig):
    name: str = option("sedd", "Training objective.")
    sampler: Literal["analytic", "euler", "confidence", "pc"] = option(
        "analytic",
        "Evaluation sampler: Tweedie tau-leaping (analytic), Euler tau-leaping, "
        "confidence-ordered unmasking, or that with the remasking corrector (pc).",
    )


def score_entropy(
    logits_BLV: torch.Tensor,
    x_t_BL: torch.Tensor,
    x0_BL: torch.Tensor,
    sigma_bar: torch.Tensor,
    dsigma: torch.Tensor,
    mask_id: int,
) -> torch.Tensor:
    """Per-token denoising score entropy (B, L), float32; 0 at clean positions.

    ``sigma_bar`` and ``dsigma`` (total noise and its rate) broadcast to (B, L).
    """
    logits = real_logits(logits_BLV, mask_id)
    log_num_real = math.log(logits.shape[-1] - 1)
    log_mass = logits.logsumexp(-1).double() - log_num_real
    log_ratio_x0 = logits.gather(-1, x0_BL[..., None])[..., 0].double() - log_num_real
    bracket = torch.exp(log_mass) - 1 - log_ratio_x0  # = (score entropy) / w(t)
    sigma_bar = torch.as_tensor(sigma_bar, dtype=torch.float64).to(bracket.device)
    dsigma = torch.as_tensor(dsigma, dtype=torch.float64).to(bracket.device)
    weight = (dsigma / torch.expm1(sigma_bar)).expand_as(bracket)
    masked = x_t_BL == mask_id
    weight = torch.where(masked, weight, torch.zeros_like(weight))
    return (weight * bracket).float()


class SEDD(MaskedDiffusionObjective):
    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        if time_conditioning(model) is not True:
            raise ValueError(
                "SEDD needs a time-conditioned model (its scores depend on the noise "
                "level): set model.time_conditioning: true"
            )

    def nelbo_terms(
        self, model: nn.Module, x0_BL: torch.Tensor, t_BN: torch.Tensor, u_mask_BL: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t_BL, x_t, masked = self.corrupt_blocks(x0_BL, t_BN, u_mask_BL, x0_BL.shape[1])
        sigma_B = self.sequence_sigma(t_BN)
        terms = score_entropy(
            model(x_t, sigma_B),
            x_t,
            x0_BL,
            self.schedule.total(t_BL),
            self.schedule.rate(t_BL),
            self.mask_id,
        )
        return terms, masked

    def sample_t_end(self) -> float:
        return self.cfg.time_min or 1e-5

    def reverse_sample(self, run: ReverseRun) -> torch.Tensor:
        """Tweedie (``analytic``) or ``euler`` tau-leaping reverse steps and a final
        denoising step (``reuse_unchanged`` does not apply: SEDD is time-conditioned)."""
        return score_sampler(
            run.logits_fn,
            run.start_BL,
            run.how,
            method=run.sampler,
            t_end=self.sample_t_end(),
        )
