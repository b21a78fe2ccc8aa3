"""adaLN(-zero) modulation shared by the DiT families.

A conditioning vector c (B, D) produces per-channel shift / scale (/ gate) through
SiLU -> Linear; ``modulate`` applies x * (1 + scale) + shift after a parameter-free
LayerNorm. adaLN-zero initialises the Linear to zero, so every block starts as identity.
"""

from __future__ import annotations

import torch
from torch import nn


def modulate(x_BND: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    return x_BND * (1 + scale_BD[:, None]) + shift_BD[:, None]


class AdaLNModulation(nn.Module):
    """c -> ``num_chunks`` tensors of width D (order fixed by the caller); c has width
    ``cond_dim`` (default D)."""

    def __init__(self, dim: int, num_chunks: int, cond_dim: int | None = None):
        super().__init__()
        self.num_chunks = num_chunks
        self.linear = nn.Linear(cond_dim or dim, num_chunks * dim)

    def forward(self, c_BD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(nn.functional.silu(c_BD)).chunk(self.num_chunks, dim=-1)


def layer_norm(dim: int) -> nn.LayerNorm:
    """The parameter-free LayerNorm that adaLN modulates (eps as in SD3 / DiT)."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
