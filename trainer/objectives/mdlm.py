"""MDLM (Sahoo et al. 2024): masked diffusion trained by its continuous-time NELBO.

SUBS parameterisation: the network's logits over all V ids become p_theta(x_0 | x_t)
with no mass on [MASK] (log-softmax after setting its logit to -inf), and clean
positions of x_t are carried over, so only masked positions carry loss:

    loss = mean over tokens of  w(t) 1[x_t^l = MASK] (-log p_theta(x_0^l | x_t)),

w(t) = -alpha'_t / (1 - alpha_t) (1 / t for the log-linear schedule); one time per
sequence, spread over the global batch (see trainer/objectives/discrete.py). The loss is
the per-token NELBO in nats. Samples come from the ancestral sampler with MDLM's cache
(a step that changes no token reuses the network's output; only without time
conditioning), or from confidence-ordered unmasking with or without a remasking
corrector (``sampler``), optionally with nucleus (top_p) sampling.

Shapes: B batch, L sequence length, V vocabulary, N time draws per sequence (1 here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from configlib import option
from trainer.objectives.discrete import (
    MaskedDiffusionConfig,
    MaskedDiffusionObjective,
    ReverseRun,
    masked_cross_entropy,
    real_logits,
)
from trainer.samplers.discrete import masked_ancestral


@dataclass(kw_only=True)
class MDLMConfig(MaskedDiffusionConfig):
    name: str = option("mdlm", "Training objective.")
    sampler: Literal["ancestral", "confidence", "pc"] = option(
        "ancestral",
        "Evaluation sampler: ancestral, confidence-ordered unmasking, or that with the "
        "remasking corrector (pc).",
    )


class MDLM(MaskedDiffusionObjective):
    def nelbo_terms(
        self, model: nn.Module, x0_BL: torch.Tensor, t_BN: torch.Tensor, u_mask_BL: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t_BL, x_t, masked = self.corrupt_blocks(x0_BL, t_BN, u_mask_BL, x0_BL.shape[1])
        sigma_B = self.sequence_sigma(t_BN)
        ce = masked_cross_entropy(model(x_t, sigma_B), x0_BL, self.mask_id)
        return self.masked_weight(t_BL, masked) * ce, masked

    def reverse_sample(self, run: ReverseRun) -> torch.Tensor:
        """MDLM's ancestral sampler (the only non-confidence choice)."""
        return masked_ancestral(
            lambda x_BL, t: real_logits(run.logits_fn(x_BL, t), self.mask_id).softmax(-1),
            run.start_BL,
            run.how,
            reuse_unchanged=run.reuse_unchanged,
        )
