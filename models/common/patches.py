"""Non-overlapping patches in 1-D (audio latents), 2-D (images) and 3-D (video) for the
transformer families.

Tokens are in row-major order of the patch grid (last axis fastest, the order of
:func:`models.common.embeddings.grid_positions`); a token's features are laid out
(patch offsets..., channel), the layout the 2-D MMDiT output head has always used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.common.init import ParamInit

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def patch_grid(spatial: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
    """Patches per axis; ValueError when an axis is not a whole number of patches."""
    if len(spatial) != len(patch):
        raise ValueError(f"a {len(patch)}-D patch {tuple(patch)} for a {len(spatial)}-D input")
    bad = [(s, p) for s, p in zip(spatial, patch, strict=True) if p < 1 or s % p]
    if bad:
        raise ValueError(
            f"input size {tuple(spatial)} is not divisible by the patch size {tuple(patch)}"
        )
    return tuple(s // p for s, p in zip(spatial, patch, strict=True))


def patchify(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """(B, C, S_1..S_A) -> (B, N, prod(patch) * C), N = prod(S_a / patch_a)."""
    b, c, *spatial = x.shape
    grid, axes = patch_grid(spatial, patch), len(patch)
    split = [n for pair in zip(grid, patch, strict=True) for n in pair]
    x = x.reshape(b, c, *split)  # B, C, g1, p1, g2, p2, ...
    order = [0, *range(2, 2 + 2 * axes, 2), *range(3, 3 + 2 * axes, 2), 1]
    return x.permute(order).reshape(b, math.prod(grid), math.prod(patch) * c)


def unpatchify_nd(
    tokens_BND: torch.Tensor, patch: Sequence[int], channels: int, grid: Sequence[int]
) -> torch.Tensor:
    """(B, prod(grid), prod(patch) * C) -> (B, C, grid_a * patch_a...): inverse of patchify."""
    b, n, d = tokens_BND.shape
    if n != math.prod(grid) or d != math.prod(patch) * channels:
        raise ValueError(
            f"tokens {tuple(tokens_BND.shape)} do not fit a grid {tuple(grid)} of patches "
            f"{tuple(patch)} with {channels} channels"
        )
    axes = len(patch)
    x = tokens_BND.reshape(b, *grid, *patch, channels)
    order = [0, 2 * axes + 1, *[i for a in range(axes) for i in (1 + a, 1 + axes + a)]]
    sizes = [g * p for g, p in zip(grid, patch, strict=True)]
    return x.permute(order).reshape(b, channels, *sizes)


class PatchEmbedND(nn.Module):
    """Patches of an A-axis input (A = 1, 2, 3) -> tokens (B, N, dim) by a strided conv
    (a linear map of each patch); positions come from RoPE in the attention, not here."""

    def __init__(self, in_channels: int, dim: int, patch: Sequence[int]):
        super().__init__()
        if len(patch) not in _CONVS:
            raise ValueError(f"patches are 1-D, 2-D or 3-D, got {tuple(patch)}")
        self.patch = tuple(patch)
        self.proj = _CONVS[len(patch)](in_channels, dim, kernel_size=self.patch, stride=self.patch)

    def init_(self, init: ParamInit) -> None:
        """Xavier-uniform weight as a (dim, C * prod(patch)) matrix (DiT), zero bias."""
        init.xavier_uniform_(self.proj.weight)
        init.zeros_(self.proj.bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """:meth:`forward` without the final copy: tokens are a transposed view of the conv's
        (B, dim, N) output, for a caller that adds to them first (one copy, not two)."""
        grid = patch_grid(x.shape[2:], self.patch)
        return self.proj(x).flatten(2).transpose(1, 2), grid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(B, C, S_1..S_A) -> tokens (B, N, dim) and the patch grid (for RoPE, unpatchify)."""
        tokens_BND, grid = self.project(x)
        return tokens_BND.contiguous(), grid
