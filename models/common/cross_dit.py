"""The DiT block of the families that read text through cross-attention (audio DiT,
video DiT): self-attention over the signal's tokens with axial RoPE, cross-attention to
a context sequence (text tokens and any extra condition tokens), then the MLP.

Self-attention and MLP are adaLN-zero branches modulated by the conditioning vector
(timestep embedding plus global conditions); cross-attention reads an affine LayerNorm
and its output projection starts at zero (the PixArt / Wan layout), so a freshly
initialised block is the identity. The six modulation vectors come from the block's own
projection of the conditioning vector (adaLN-zero per block, DiT), or, with
``shared_modulation``, from one projection the model computes for all blocks plus a
learnt (6, D) table per block (adaLN-single: PixArt-alpha, Wan), far fewer parameters.

Shapes: B batch, N signal tokens, L context tokens, H heads, K head dim, D = H * K.
"""

from __future__ import annotations

import torch
from torch import nn

from models.common.attention import QKVProjection, attention
from models.common.context_parallel import ContextParallel
from models.common.embeddings import apply_rope
from models.common.init import ParamInit
from models.common.mlp import FeedForward
from models.common.modulation import AdaLNModulation, gated_residual, layer_norm, modulate

SHARED_MODULATION_HELP = (
    "adaLN-single (PixArt-alpha, Wan): one projection of t for all blocks plus a learnt "
    "table per block, instead of adaLN-zero's projection per block."
)


def shared_modulation(mod: AdaLNModulation | None, vec_BD: torch.Tensor) -> torch.Tensor:
    """What the blocks read: ``vec`` itself (per-block adaLN), or the model's one
    projection of it as (B, 6, D) (``mod``, shared modulation)."""
    return vec_BD if mod is None else torch.stack(mod(vec_BD), 1)


class AttentionGroups:
    """Self-attention restricted to groups of tokens (factorised spacetime attention):
    tokens laid out (B, outer, inner) in sequence order attend within each outer slice
    (``across_outer`` False: one frame's patches, for outer = frames) or along the outer
    axis at each inner index (True: one patch position over the frames)."""

    def __init__(self, outer: int, inner: int, across_outer: bool):
        self.outer, self.inner, self.across_outer = outer, inner, across_outer

    def fold(self, x_BNHK: torch.Tensor) -> torch.Tensor:
        b, _, h, k = x_BNHK.shape
        x = x_BNHK.reshape(b, self.outer, self.inner, h, k)
        if self.across_outer:
            return x.transpose(1, 2).reshape(b * self.inner, self.outer, h, k)
        return x.reshape(b * self.outer, self.inner, h, k)

    def unfold(self, out_GMD: torch.Tensor) -> torch.Tensor:
        d = out_GMD.shape[-1]
        if self.across_outer:
            b = out_GMD.shape[0] // self.inner
            out = out_GMD.reshape(b, self.inner, self.outer, d).transpose(1, 2)
        else:
            b = out_GMD.shape[0] // self.outer
            out = out_GMD.reshape(b, self.outer, self.inner, d)
        return out.reshape(b, self.outer * self.inner, d)

    def pairs(self) -> int:
        """Query-key pairs per sample: sum over groups of (group size)^2."""
        return self.outer * self.inner * (self.outer if self.across_outer else self.inner)


class CrossAttention(nn.Module):
    """Queries from the signal tokens, keys and values from the context (both width D)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=eps) if qk_norm else None

    def forward(self, x_BND: torch.Tensor, c_BLD: torch.Tensor) -> torch.Tensor:
        b, n, _ = x_BND.shape
        q = self.q(x_BND).view(b, n, self.num_heads, -1)
        k, v = self.kv(c_BLD).view(b, c_BLD.shape[1], 2, self.num_heads, -1).unbind(2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.out(attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))

    def init_(self, init: ParamInit) -> None:
        """Xavier-uniform q and k/v (as two matrices), zero output projection."""
        init.xavier_uniform_(self.q.weight)
        init.xavier_uniform_(self.kv.weight, parts=2)
        init.zeros_(self.out.weight)
        init.zeros_(self.out.bias)


class CrossDiTBlock(nn.Module):
    """adaLN-zero self-attention (RoPE) -> cross-attention -> adaLN-zero MLP."""

    def init_(self, init: ParamInit) -> None:
        """A shared-modulation block's table starts at zero (the model's shared
        projection does too: adaLN-zero)."""
        if self.mod_table is not None:
            init.zeros_(self.mod_table)

    def __init__(
        self, dim: int, num_heads: int, mlp_hidden: int, qk_norm: bool,
        shared_modulation: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.norm = layer_norm(dim)
        if shared_modulation:  # added to the model's shared projection (B, 6, D)
            self.mod, self.mod_table = None, nn.Parameter(torch.zeros(6, dim))
        else:
            self.mod, self.mod_table = AdaLNModulation(dim, 6), None
        self.qkv = QKVProjection(dim, num_heads, qk_norm)
        self.attn_out = nn.Linear(dim, dim)
        self.cross_norm = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttention(dim, num_heads, qk_norm)
        self.mlp = FeedForward(dim, mlp_hidden)

    def forward(
        self,
        x_BND: torch.Tensor,
        c_BLD: torch.Tensor,
        vec_BD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        groups: AttentionGroups | None = None,
        cp: ContextParallel | None = None,
    ) -> torch.Tensor:
        """``vec_BD``: the conditioning vector, or with shared modulation the model's
        shared projection of it (B, 6, D);
        ``rope``: (cos, sin) tables of the N tokens' positions (rope_cos_sin_nd);
        ``groups``: self-attention within groups of tokens only (None: all N together);
        ``cp``: x holds this rank's share of the tokens (and rope their positions), and
        self-attention swaps to all tokens of a share of the heads (Ulysses)."""
        if self.mod is None:
            mods = (vec_BD + self.mod_table.to(vec_BD.dtype)).unbind(1)
        else:
            mods = self.mod(vec_BD)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        q, k, v = self.qkv(modulate(self.norm(x_BND), shift_a, scale_a))
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cp is not None:
            q, k, v = cp.tokens_to_heads(q), cp.tokens_to_heads(k), cp.tokens_to_heads(v)
        if groups is not None:
            q, k, v = groups.fold(q), groups.fold(k), groups.fold(v)
        attn = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if groups is not None:
            attn = groups.unfold(attn)
        if cp is not None:
            b, n, _ = attn.shape
            attn = cp.heads_to_tokens(attn.view(b, n, q.shape[-2], -1)).flatten(2)
        x_BND = gated_residual(x_BND, gate_a, self.attn_out(attn))
        x_BND = x_BND + self.cross(self.cross_norm(x_BND), c_BLD)
        return gated_residual(x_BND, gate_m, self.mlp(modulate(self.norm(x_BND), shift_m, scale_m)))
