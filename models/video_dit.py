"""Video DiT: a spacetime-patch diffusion transformer (Sora / Open-Sora / Wan layout) over
video latents (or pixels), conditioned on text through cross-attention.

Clips (B, C, T, H, W) are cut into (pt, ph, pw) tubelets; every block is
:class:`CrossDiTBlock`: self-attention with 3-D RoPE (time, rows, columns), cross-
attention to the T5 (or padded CLIP) tokens, MLP, adaLN-zero from the timestep embedding
(plus the pooled text vector when there is one). ``attention: full`` attends over all
spacetime tokens; ``factorized`` alternates blocks that attend within each frame and
blocks that attend along time at each patch position (Latte's variant; far cheaper for
long clips). An image is a 1-frame video (pt = 1), so the same weights train on both.

Interface: ``forward(x, t, cond)`` with x (B, C, T, H, W) (or an image batch (B, C, H, W),
run as 1-frame videos), t (B,) in [0, 1] (0 data, 1 noise) and cond = {"context": (B, L,
context_dim), "pooled": (B, P) (optional)}; returns x's shape.

Shapes: B batch, C channels, T frames, H x W frame, N tokens, L text tokens, D width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from configlib import option
from models.common.attention import QKVProjection
from models.common.context_parallel import ContextParallel
from models.common.cross_dit import (
    SHARED_MODULATION_HELP,
    AttentionGroups,
    CrossAttention,
    CrossDiTBlock,
    shared_modulation,
)
from models.common.embeddings import TimestepMLP, grid_positions, rope_cos_sin_nd
from models.common.init import ParamInit
from models.common.modulation import AdaLNModulation, layer_norm, modulate
from models.common.parallelize import parallelize_blocks_keeping_input_dtypes
from models.common.patches import PatchEmbedND, patch_grid, unpatchify_nd
from models.common.presets import count_params_on_meta, resolve_preset

# num_heads x head_dim = width; "1.6b" has Wan2.1-1.3B's width and depth (adaLN-zero per
# block adds the rest), "3b" and "6.7b" are 2048 and 3072 wide, 32 blocks deep.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"depth": 3, "num_heads": 4, "head_dim": 32},
    "small": {"depth": 8, "num_heads": 8, "head_dim": 64},
    "1.6b": {"depth": 30, "num_heads": 12, "head_dim": 128},
    "3b": {"depth": 32, "num_heads": 16, "head_dim": 128},
    "6.7b": {"depth": 32, "num_heads": 24, "head_dim": 128},
}


@dataclass(kw_only=True)
class VideoDiTConfig:
    name: str = option("video_dit", "Model family.")
    size: str = option("tiny", "Size preset (depth, num_heads, head_dim).", choices=PRESETS)
    depth: int | None = option(None, "Blocks; overrides the preset.", ge=1)
    num_heads: int | None = option(None, "Attention heads; overrides the preset.", ge=1)
    head_dim: int | None = option(None, "Width per head; overrides the preset.", ge=6)
    in_channels: int = option(16, "Channels of the (latent) video.", ge=1)
    patch_size: tuple[int, int, int] = option((1, 2, 2), "Tubelet (frames, rows, columns).")
    context_dim: int = option(4096, "Width of the text token sequence (T5-XXL: 4096).", ge=1)
    pooled_dim: int = option(0, "Width of a pooled text vector added to t; 0: none.", ge=0)
    attention: Literal["full", "factorized"] = option(
        "full", "Self-attention over all spacetime tokens, or alternating spatial / temporal."
    )
    qk_norm: bool = option(True, "Per-head RMS norm of queries and keys.")
    shared_modulation: bool = option(False, SHARED_MODULATION_HELP)
    mlp_ratio: float = option(4.0, "MLP hidden width / model width.", gt=0)
    rope_base: float = option(10000.0, "RoPE frequency base.", gt=1)
    sample_shape: tuple[int, int, int] = option(
        (16, 32, 32), "Typical latent (frames, height, width), for FLOPs per sample (MFU)."
    )
    text_tokens: int = option(256, "Typical text tokens per sample, for FLOPs per sample.", ge=0)

    def dims(self) -> dict[str, int]:
        return resolve_preset(PRESETS, self.size, self)

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = []
        if any(p < 1 for p in self.patch_size):
            out.append(("patch_size", f"{list(self.patch_size)}: every side must be >= 1"))
        head_dim = self.dims()["head_dim"]
        if head_dim % 2:
            out.append(("head_dim", f"must be even for 3-D RoPE (got {head_dim})"))
        return out


class VideoDiT(nn.Module):
    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        dims = cfg.dims()
        self.cfg = cfg
        self.head_dim, self.num_heads = dims["head_dim"], dims["num_heads"]
        self.width = width = dims["num_heads"] * dims["head_dim"]
        self.patch = tuple(cfg.patch_size)
        self.patch_embed = PatchEmbedND(cfg.in_channels, width, self.patch)
        self.time_embed = TimestepMLP(width)
        self.pooled_embed = (
            nn.Sequential(nn.Linear(cfg.pooled_dim, width), nn.SiLU(), nn.Linear(width, width))
            if cfg.pooled_dim
            else None
        )
        self.context_embed = nn.Linear(cfg.context_dim, width)
        hidden = int(width * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            CrossDiTBlock(width, dims["num_heads"], hidden, cfg.qk_norm, cfg.shared_modulation)
            for _ in range(dims["depth"])
        )
        self.block_mod = AdaLNModulation(width, 6) if cfg.shared_modulation else None
        self.final_norm = layer_norm(width)
        self.final_mod = AdaLNModulation(width, 2)  # (shift, scale)
        self.final_proj = nn.Linear(width, math.prod(self.patch) * cfg.in_channels)
        # set by enable_context_parallel: blocks then hold 1 / P of the tokens each
        self.context_parallel: ContextParallel | None = None

    def groups(self, index: int, grid: tuple[int, int, int]) -> AttentionGroups | None:
        """Block ``index``'s self-attention groups: None (full), a frame, or a time line."""
        if self.cfg.attention == "full":
            return None
        frames, rows, cols = grid
        return AttentionGroups(frames, rows * cols, across_outer=index % 2 == 1)

    def forward(
        self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        if x_BCTHW.ndim == 4 and x_BCTHW.shape[1] == self.cfg.in_channels:
            if self.patch[0] != 1:
                raise ValueError(
                    f"an image is a 1-frame video: it needs tubelets 1 frame long, not {self.patch}"
                )
            return self.forward(x_BCTHW.unsqueeze(2), t_B, cond).squeeze(2).clone()  # non-view
        if x_BCTHW.ndim != 5 or x_BCTHW.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"expected video (B, {self.cfg.in_channels}, T, H, W) or image "
                f"(B, {self.cfg.in_channels}, H, W), got {tuple(x_BCTHW.shape)}"
            )
        dtype = self.patch_embed.proj.weight.dtype
        tokens, grid = self.patch_embed(x_BCTHW.to(dtype))
        vec = self.time_embed(t_B, dtype)
        if self.pooled_embed is not None:
            vec = vec + self.pooled_embed(cond["pooled"].to(dtype))
        context = self.context_embed(cond["context"].to(dtype))
        # time gets the channel pairs an even split leaves over (rope_axes_dims)
        rope = rope_cos_sin_nd(
            grid_positions(grid, tokens.device), self.head_dim, base=self.cfg.rope_base
        )
        cp = self.context_parallel
        if cp is not None:
            tokens, rope = cp.shard(tokens, rope, self.num_heads)
        block_vec = shared_modulation(self.block_mod, vec)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, context, block_vec, rope, self.groups(i, grid), cp)
        shift, scale = self.final_mod(vec)
        tokens = self.final_proj(modulate(self.final_norm(tokens), shift, scale))
        if cp is not None:
            tokens = cp.gather(tokens)
        out = unpatchify_nd(tokens, self.patch, self.cfg.in_channels, grid)
        return out.clone() if out._is_view() else out  # FSDP2's hooks need a non-view

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Xavier-uniform linears, zero biases; adaLN-zero and zero cross-attention
        outputs (every block starts as the identity), zero output head."""
        init = ParamInit(self, seed)
        init.defaults_(self)
        init.own_init_(
            self,
            PatchEmbedND,
            TimestepMLP,
            AdaLNModulation,
            CrossAttention,
            QKVProjection,
            CrossDiTBlock,
        )
        init.zeros_(self.final_proj.weight)
        init.zeros_(self.final_proj.bias)

    def flops_per_sample(
        self, shape: tuple[int, int, int] | None = None, text_tokens: int | None = None
    ) -> float:
        """Training FLOPs (forward + backward = 3x forward) for one clip of latent
        (frames, height, width) ``shape`` and ``text_tokens`` text tokens.

        Matmuls: 2 FLOPs per weight per token it acts on (the N spacetime tokens; text
        tokens for the context projection and the cross keys / values; once per sample
        for the embeddings and modulations). Attention: QK^T and AV, 4 D per query-key
        pair: N^2 per block when full, frames x (rows x cols)^2 for a spatial block and
        rows x cols x frames^2 for a temporal one when factorized; cross 4 N L D.
        """
        shape = tuple(self.cfg.sample_shape) if shape is None else tuple(shape)
        text = self.cfg.text_tokens if text_tokens is None else text_tokens
        grid = patch_grid(shape, self.patch)
        tokens = math.prod(grid)
        per_token = per_text = per_sample = 0
        for name, module in self.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv3d)):
                continue
            n = module.weight.numel()
            if name.startswith("context_embed") or name.endswith("cross.kv"):
                per_text += n
            elif name.endswith("mod.linear") or name.startswith(("time_", "pooled_")):
                per_sample += n
            else:
                per_token += n
        forward = 2 * (per_token * tokens + per_text * text + per_sample)
        for i in range(len(self.blocks)):
            groups = self.groups(i, grid)
            pairs = tokens * tokens if groups is None else groups.pairs()
            forward += 4 * self.width * (pairs + tokens * text)
        return 3.0 * forward


def build(cfg: VideoDiTConfig) -> VideoDiT:
    return VideoDiT(cfg)


# (model, ParallelPlan, mesh) -> model; forward casts its own inputs, keeping t in fp32
parallelize = parallelize_blocks_keeping_input_dtypes


def num_params(cfg: VideoDiTConfig) -> int:
    return count_params_on_meta(VideoDiT, cfg)
