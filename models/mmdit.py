"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3.

Image (latent or pixel) patches and text tokens keep separate weights (q/k/v, MLP,
adaLN-zero modulation) and meet in one joint attention over the concatenated sequence.
The vector condition is timestep embedding + projected pooled text embedding. The last
block's text stream is "pre-only": it contributes keys/values but is not updated.

Interface: ``forward(x, t, cond)`` with x (B, C, H, W), t (B,) in [0, 1] (0 data, 1
noise) and cond = {"context": (B, L, context_dim), "pooled": (B, pooled_dim)}; returns
(B, C, H, W) (velocity for rectified flow, eps / v for the DDPM family).

Computes the same function as diffusers' ``SD3Transformer2DModel`` (bit-identical in
fp32; diffusers takes timestep = 1000 t): ``models/mmdit_diffusers.py`` converts weights
both ways and ``tests/models/test_mmdit.py`` checks the outputs.

Shapes: B batch, N image tokens, L text tokens, D width, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from configlib import option
from models.common.attention import QKVProjection, joint_attention
from models.common.embeddings import PatchEmbed, TimestepMLP, unpatchify
from models.common.init import ParamInit
from models.common.mlp import FeedForward
from models.common.modulation import AdaLNModulation, gated_residual, layer_norm, modulate
from models.common.parallelize import parallelize_blocks_keeping_input_dtypes
from models.common.patches import PatchEmbedND
from models.common.presets import count_params_on_meta, resolve_preset

# num_heads x head_dim = width; "sd3_medium" is SD3-medium-like (~2B), "8b" SD3-large-like.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"depth": 2, "num_heads": 2, "head_dim": 16},
    "small": {"depth": 6, "num_heads": 6, "head_dim": 32},
    "base": {"depth": 12, "num_heads": 12, "head_dim": 64},
    "sd3_medium": {"depth": 24, "num_heads": 24, "head_dim": 64},
    "8b": {"depth": 38, "num_heads": 38, "head_dim": 64},
}


@dataclass(kw_only=True)
class MMDiTConfig:
    name: str = option("mmdit", "Model family.")
    size: str = option("tiny", "Size preset (depth, num_heads, head_dim).", choices=PRESETS)
    depth: int | None = option(None, "Joint blocks; overrides the preset.", ge=1)
    num_heads: int | None = option(None, "Attention heads; overrides the preset.", ge=1)
    head_dim: int | None = option(None, "Width per head; overrides the preset.", ge=4)
    in_channels: int = option(16, "Channels of the (latent) image.", ge=1)
    patch_size: int = option(2, "Patch side in (latent) pixels.", ge=1)
    context_dim: int = option(4096, "Width of the text token sequence (T5 / padded CLIP).", ge=1)
    pooled_dim: int = option(
        2048, "Width of the pooled text vector (CLIP-L + CLIP-G pooled).", ge=1
    )
    pos_max_grid: int = option(
        96,
        "Side of the position table in patches (largest image: pos_max_grid * patch_size).",
        ge=1,
    )
    pos_base_grid: int = option(64, "Patches per side that span the base position range.", ge=1)
    qk_norm: bool = option(True, "Per-head RMS norm of queries and keys (stabilises large models).")
    mlp_ratio: float = option(4.0, "MLP hidden width / model width.", gt=0)
    sample_size: int = option(
        128, "Typical (latent) image side, used to report FLOPs per sample for MFU.", ge=1
    )
    text_tokens: int = option(
        333, "Typical text tokens per sample (77 CLIP + 256 T5), for FLOPs per sample.", ge=1
    )

    def dims(self) -> dict[str, int]:
        return resolve_preset(PRESETS, self.size, self)


class JointBlock(nn.Module):
    """One MMDiT block: per-stream adaLN-zero, joint attention, per-stream MLP."""

    def __init__(
        self, dim: int, num_heads: int, mlp_hidden: int, qk_norm: bool, context_pre_only: bool
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm = layer_norm(dim)
        # image stream: shift/scale/gate for attention and MLP
        self.x_mod = AdaLNModulation(dim, 6)
        self.x_qkv = QKVProjection(dim, num_heads, qk_norm)
        self.x_out = nn.Linear(dim, dim)
        self.x_mlp = FeedForward(dim, mlp_hidden)
        # text stream: the last block only needs its keys/values (scale, shift)
        self.c_mod = AdaLNModulation(dim, 2 if context_pre_only else 6)
        self.c_qkv = QKVProjection(dim, num_heads, qk_norm)
        if not context_pre_only:
            self.c_out = nn.Linear(dim, dim)
            self.c_mlp = FeedForward(dim, mlp_hidden)

    def forward(
        self, x_BND: torch.Tensor, c_BLD: torch.Tensor, vec_BD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.x_mod(vec_BD)
        x_in = modulate(self.norm(x_BND), shift_a, scale_a)
        if self.context_pre_only:
            c_scale_a, c_shift_a = self.c_mod(vec_BD)
        else:
            c_shift_a, c_scale_a, c_gate_a, c_shift_m, c_scale_m, c_gate_m = self.c_mod(vec_BD)
        c_in = modulate(self.norm(c_BLD), c_shift_a, c_scale_a)
        # image tokens first, then text (diffusers' order; attention itself is order-free)
        x_attn, c_attn = joint_attention([self.x_qkv(x_in), self.c_qkv(c_in)])
        x_BND = gated_residual(x_BND, gate_a, self.x_out(x_attn))
        x_BND = gated_residual(
            x_BND, gate_m, self.x_mlp(modulate(self.norm(x_BND), shift_m, scale_m))
        )
        if self.context_pre_only:
            return x_BND, None
        c_BLD = gated_residual(c_BLD, c_gate_a, self.c_out(c_attn))
        c_BLD = gated_residual(
            c_BLD, c_gate_m, self.c_mlp(modulate(self.norm(c_BLD), c_shift_m, c_scale_m))
        )
        return x_BND, c_BLD


class MMDiT(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        dims = cfg.dims()
        self.cfg = cfg
        self.width = width = dims["num_heads"] * dims["head_dim"]
        self.patch_size = cfg.patch_size
        self.out_channels = cfg.in_channels
        self.patch_embed = PatchEmbed(
            cfg.in_channels, width, cfg.patch_size, cfg.pos_max_grid, cfg.pos_base_grid
        )
        self.time_embed = TimestepMLP(width)
        self.pooled_embed = nn.Sequential(
            nn.Linear(cfg.pooled_dim, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.context_embed = nn.Linear(cfg.context_dim, width)
        hidden = int(width * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            JointBlock(
                width,
                dims["num_heads"],
                hidden,
                cfg.qk_norm,
                context_pre_only=i == dims["depth"] - 1,
            )
            for i in range(dims["depth"])
        )
        self.final_norm = layer_norm(width)
        self.final_mod = AdaLNModulation(width, 2)  # (scale, shift)
        self.final_proj = nn.Linear(width, cfg.patch_size**2 * cfg.in_channels)

    def forward(
        self, x_BCHW: torch.Tensor, t_B: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        # Inputs go to the weights' dtype here (FSDP2 does not cast the root's inputs, see
        # parallelize); t stays as given: its sinusoids are computed in fp32, like diffusers'.
        dtype = self.patch_embed.proj.weight.dtype
        tokens, (rows, cols) = self.patch_embed(x_BCHW.to(dtype))
        vec = self.time_embed(t_B, tokens.dtype) + self.pooled_embed(
            cond["pooled"].to(tokens.dtype)
        )
        context = self.context_embed(cond["context"].to(tokens.dtype))
        for block in self.blocks:
            tokens, context = block(tokens, context, vec)
        scale, shift = self.final_mod(vec)
        tokens = self.final_proj(modulate(self.final_norm(tokens), shift, scale))
        return unpatchify(tokens, self.patch_size, self.out_channels, rows, cols)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Xavier-uniform linears, zero biases; adaLN-zero (modulations and output zero)."""
        init = ParamInit(self, seed)
        init.defaults_(self)
        init.own_init_(self, QKVProjection, PatchEmbedND, TimestepMLP, AdaLNModulation)
        init.zeros_(self.final_proj.weight)
        init.zeros_(self.final_proj.bias)
        self.patch_embed.reset_pos_table()

    def flops_per_sample(
        self, image_tokens: int | None = None, text_tokens: int | None = None
    ) -> float:
        """Training FLOPs (forward + backward = 3x forward) for one sample.

        Matmuls: 2 FLOPs per weight per token of the stream it acts on; attention:
        QK^T and AV, 4 * S^2 * D per block for S = image + text tokens.
        """
        if image_tokens is None:
            image_tokens = (self.cfg.sample_size // self.patch_size) ** 2
        text_tokens = self.cfg.text_tokens if text_tokens is None else text_tokens
        image_w = text_w = vector_w = 0
        for name, module in self.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            n = module.weight.numel()
            if name.endswith("_mod.linear") or name.startswith(("time_embed", "pooled_embed")):
                vector_w += n  # once per sample
            elif ".c_" in name or name.startswith("context_embed"):
                text_w += n
            else:
                image_w += n
        seq = image_tokens + text_tokens
        forward = 2 * (image_w * image_tokens + text_w * text_tokens + vector_w)
        forward += 4 * seq * seq * self.width * len(self.blocks)
        return 3.0 * forward


def build(cfg: MMDiTConfig) -> MMDiT:
    return MMDiT(cfg)


# (model, ParallelPlan, mesh) -> model; forward casts its own inputs, keeping t in fp32
parallelize = parallelize_blocks_keeping_input_dtypes


def num_params(cfg: MMDiTConfig) -> int:
    return count_params_on_meta(MMDiT, cfg)
