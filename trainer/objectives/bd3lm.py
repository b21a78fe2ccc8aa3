"""BD3-LM (Arriola et al. 2025): block diffusion, autoregressive over blocks of
``block_size`` tokens and masked diffusion (MDLM's SUBS NELBO) within each block.

Training runs ONE forward pass over x_t ++ x_0 (length 2L, rotary positions arange(L)
twice) under :func:`block_diffusion_mask`: noisy block b sees itself (bidirectionally)
and the clean blocks before it; clean block b sees the clean blocks up to itself; no
clean token ever sees a noisy one. Every block has its own time t (spread like MDLM's,
over the global (sequence, block) keys), optionally clipped to [lo, hi] for training
(``noise_clip``, the paper's variance-reducing clipped schedule; NELBO estimates always
use the full range). A time-conditioned network gets sigma per token (B, 2L): the block's
sigma_bar on the noisy half, 0 on the clean half. The loss is the per-token NELBO over
the noisy half. With block_size >= L this is exactly MDLM.

Sampling is semi-autoregressive (trainer.samplers.discrete.semi_autoregressive): each
block is denoised by MDLM ancestral steps against the KV cache of the clean blocks
before it, then committed to the cache.

Shapes: B batch, L sequence length, V vocabulary, N blocks per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from configlib import option
from trainer.objectives.absorbing import block_causal_mask, block_diffusion_mask  # noqa: F401  (re-exported)
from trainer.objectives.discrete import (
    MaskedDiffusionConfig,
    MaskedDiffusionObjective,
    TokenRequest,
    masked_cross_entropy,
    time_conditioning,
)
from trainer.samplers.discrete import semi_autoregressive


@dataclass(kw_only=True)
class BD3LMConfig(MaskedDiffusionConfig):
    name: str = option("bd3lm", "Training objective.")
    block_size: int = option(
        16, "Tokens per block: blocks are generated left to right, denoised within.", ge=1
    )
    noise_clip: tuple[float, float] | None = option(
        None,
        "Training times drawn from [lo, hi] instead of [time_min, 1] (clipped schedule); "
        "NELBO estimates use the full range.",
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = super().check(given)
        if self.noise_clip is not None:
            lo, hi = self.noise_clip
            if not 0 < lo < hi <= 1:
                out.append(("noise_clip", f"needs 0 < lo < hi <= 1, got [{lo}, {hi}]"))
        return out


class BD3LM(MaskedDiffusionObjective):
    def __init__(self, cfg: BD3LMConfig, *, seed: int, rank: int, device: torch.device):
        super().__init__(cfg, seed=seed, rank=rank, device=device)
        self._masks: dict[int, torch.Tensor] = {}

    def num_blocks(self, length: int) -> int:
        return -(-length // self.cfg.block_size)

    def train_range(self) -> tuple[float, float]:
        if self.cfg.noise_clip is not None:
            return tuple(self.cfg.noise_clip)
        return super().train_range()

    def training_mask(self, length: int) -> torch.Tensor:
        if length not in self._masks:
            self._masks[length] = block_diffusion_mask(length, self.cfg.block_size, self.device)
        return self._masks[length]

    def nelbo_terms(
        self, model: nn.Module, x0_BL: torch.Tensor, t_BN: torch.Tensor, u_mask_BL: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        length = x0_BL.shape[1]
        t_BL, x_t, masked = self.corrupt_blocks(x0_BL, t_BN, u_mask_BL, self.cfg.block_size)
        sigma_BL = self.schedule.total(t_BL).to(self.device, torch.float32)
        sigma_B2L = torch.cat([sigma_BL, torch.zeros_like(sigma_BL)], dim=1)
        positions = torch.arange(length, device=self.device).repeat(2)
        logits = model(
            torch.cat([x_t, x0_BL], dim=1),
            sigma_B2L,
            attn_mask=self.training_mask(length),
            positions=positions,
        )[:, :length]
        ce = masked_cross_entropy(logits, x0_BL, self.mask_id)
        return self.masked_weight(t_BL, masked) * ce, masked

    def sample_tokens(
        self,
        req: TokenRequest,
        *,
        block_size: int | None = None,
        cache: bool = True,
        kv_cache: bool = True,
    ) -> torch.Tensor:
        """Block by block, ``req.steps`` ancestral steps per block. ``cache``: reuse the
        network's output after a step that changed nothing (no time conditioning only);
        ``kv_cache``: false recomputes the prefix every pass (the reference the cached
        path must match)."""
        return semi_autoregressive(
            req.model,
            req.num,
            req.length,
            self.masked_steps(req),
            block_size=block_size or self.cfg.block_size,
            reuse_unchanged=cache and time_conditioning(req.model) is False,
            kv_cache=kv_cache,
            device=self.device,
        )
