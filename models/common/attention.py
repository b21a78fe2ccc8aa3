"""Attention shared by the transformer families: projections, optional per-head RMS
QK-norm, and scaled_dot_product_attention (flash / memory-efficient kernels on GPU).

Shapes: B batch, N tokens, H heads, K head dim, D = H * K model width.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class QKVProjection(nn.Module):
    """Per-stream q, k, v projections (with optional RMS norm of q and k per head)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=eps) if qk_norm else None

    def forward(self, x_BND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x_BND.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, H, N, K)
            return t.reshape(b, n, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q(x_BND)), heads(self.k(x_BND)), heads(self.v(x_BND))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


def joint_attention(streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """One attention over the concatenation of several token streams; returns each
    stream's slice of the output as (B, N_i, D)."""
    q = torch.cat([s[0] for s in streams], dim=2)
    k = torch.cat([s[1] for s in streams], dim=2)
    v = torch.cat([s[2] for s in streams], dim=2)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, sum N_i, K)
    b, h, n, kdim = out.shape
    out = out.transpose(1, 2).reshape(b, n, h * kdim)
    sizes = [s[0].shape[2] for s in streams]
    return list(out.split(sizes, dim=1))
