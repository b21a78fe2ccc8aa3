"""Attention shared by the transformer families: a fused q/k/v projection, optional
per-head RMS QK-norm, and scaled_dot_product_attention (flash / memory-efficient
kernels on GPU) with an optional mask, over one stream or several joined ones.

Shapes: B batch, N queries, M keys, H heads, K head dim, D = H * K model width.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.common.init import ParamInit


class QKVProjection(nn.Module):
    """One stream's q, k, v from one fused Linear (D -> 3D, rows [q; k; v]: one GEMM
    instead of three), with optional per-head RMS norm of q and k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        head_dim = dim // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=eps) if qk_norm else None

    def forward(self, x_BND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> q, k, v, each (B, N, H, K) (views into the projection's output)."""
        b, n, _ = x_BND.shape
        q, k, v = self.qkv(x_BND).view(b, n, 3, self.num_heads, -1).unbind(2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def init_(self, init: ParamInit) -> None:
        """Xavier-uniform q, k and v, each as its own (D, D) matrix; bias as given."""
        init.xavier_uniform_(self.qkv.weight, parts=3)


def attention(
    q_BHNK: torch.Tensor,
    k_BHMK: torch.Tensor,
    v_BHMK: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA of N queries over M keys -> (B, N, D), heads merged back into the width.

    ``attn_mask``: None (full attention) or a bool tensor broadcastable to (B, H, N, M),
    True = may attend; a query with no True entry gives NaN (SDPA's behaviour).
    """
    out = F.scaled_dot_product_attention(q_BHNK, k_BHMK, v_BHMK, attn_mask=attn_mask)
    b, h, n, kdim = out.shape
    return out.transpose(1, 2).reshape(b, n, h * kdim)


def joint_attention(
    streams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> list[torch.Tensor]:
    """One attention over the concatenation of several token streams, each given as
    (B, N_i, H, K) q, k, v; returns each stream's slice of the output as (B, N_i, D).

    Streams are concatenated along tokens in (B, N, H, K) layout, so the (B, H, N, K)
    tensors SDPA takes are transposed views, not copies (flash attention's own layout).
    """
    q, k, v = (torch.cat([s[i] for s in streams], dim=1).transpose(1, 2) for i in range(3))
    out = attention(q, k, v)  # (B, sum N_i, D)
    sizes = [s[0].shape[1] for s in streams]
    return list(out.split(sizes, dim=1))
