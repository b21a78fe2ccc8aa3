"""adaLN(-zero) modulation shared by the DiT families and the conditioned text backbone.

A conditioning vector c (B, C) produces per-channel shift / scale (/ gate) through
SiLU -> Linear (:class:`AdaLNModulation`); :func:`modulate` applies x * (1 + scale) + shift
after a parameter-free LayerNorm, and :func:`gated_residual` adds a branch as x + gate * y.
adaLN-zero initialises the Linear to zero (:meth:`AdaLNModulation.init_`), so every
gate is zero and every block starts as the identity. :class:`AdaLNZeroResidual` is one such
branch put together, for families whose blocks need no other layout.

Shapes: B batch, N tokens, D width, C conditioning width. A modulation tensor is (B, D),
one vector per sample broadcast over the tokens, or (B, N, D) / (B, 1, D), per token.
"""

from __future__ import annotations

import torch
from torch import nn

from models.common.init import ParamInit


def _over_tokens(m: torch.Tensor) -> torch.Tensor:
    return m[:, None] if m.dim() == 2 else m


def modulate(x_BND: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, shift / scale (B, D) or per token (B, N or 1, D)."""
    return x_BND * (1 + _over_tokens(scale)) + _over_tokens(shift)


def gated_residual(
    x_BND: torch.Tensor, gate: torch.Tensor, update_BND: torch.Tensor
) -> torch.Tensor:
    """x + gate * update, gate (B, D) or per token (B, N or 1, D): adaLN-zero's residual."""
    return x_BND + _over_tokens(gate) * update_BND


class AdaLNModulation(nn.Module):
    """c -> ``num_chunks`` tensors of width D (order fixed by the caller); c has width
    ``cond_dim`` (default D)."""

    def __init__(self, dim: int, num_chunks: int, cond_dim: int | None = None):
        super().__init__()
        self.num_chunks = num_chunks
        self.linear = nn.Linear(cond_dim or dim, num_chunks * dim)

    def forward(self, c_BC: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(nn.functional.silu(c_BC)).chunk(self.num_chunks, dim=-1)

    def init_(self, init: ParamInit) -> None:
        """adaLN-zero: zero weight and bias, so shift, scale and gate start at zero."""
        init.zeros_(self.linear.weight)
        init.zeros_(self.linear.bias)


def layer_norm(dim: int) -> nn.LayerNorm:
    """The parameter-free LayerNorm that adaLN modulates (eps as in SD3 / DiT)."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class AdaLNZeroResidual(nn.Module):
    """One adaLN-zero branch (DiT): x + gate * body(modulate(norm(x), shift, scale)),
    with (shift, scale, gate) from c. The identity once ``mod`` is zero-initialised.

    ``body`` maps (B, N, D) -> (B, N, D) (attention, :class:`FeedForward`, ...);
    c is (B, cond_dim) (default D) per sample, or (B, N, cond_dim) per token.
    """

    def __init__(self, dim: int, body: nn.Module, cond_dim: int | None = None):
        super().__init__()
        self.norm = layer_norm(dim)
        self.mod = AdaLNModulation(dim, 3, cond_dim)
        self.body = body

    def forward(self, x_BND: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.mod(c)
        return gated_residual(x_BND, gate, self.body(modulate(self.norm(x_BND), shift, scale)))
