"""Audio DiT: a Stable Audio-style diffusion transformer over the 1-D latent sequence of
an audio autoencoder (or raw samples), conditioned on text and timing.

Latent frames are cut into 1-D patches, which get an absolute sin-cos embedding of their
index; every block is :class:`CrossDiTBlock`: self-attention with RoPE over the patch
index, cross-attention to the context, MLP, with adaLN-zero from the conditioning vector. Timing (``seconds_start``, ``seconds_total``
of the window, as Stable Audio) is embedded like a timestep (value / ``seconds_max`` in
[0, 1] -> sinusoids -> MLP) and enters twice, as in Stable Audio: as two context tokens
after the text tokens, and summed into the conditioning vector. Text is the T5 token
sequence of ``objective.conditioning``, zero when dropped for classifier-free guidance
(timing is never dropped: a guided sample keeps its requested length).

Interface: ``forward(x, t, cond)`` with x (B, C, T) latents, t (B,) in [0, 1] (0 data, 1
noise) and cond = {"seconds_start": (B,), "seconds_total": (B,), "context": (B, L,
context_dim) (optional: no text)}; returns (B, C, T).

Shapes: B batch, C latent channels, T latent frames, N = T / patch tokens, L text tokens,
D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from configlib import option
from models.common.attention import QKVProjection
from models.common.context_parallel import ContextParallel
from models.common.cross_dit import (
    SHARED_MODULATION_HELP,
    CrossAttention,
    CrossDiTBlock,
    shared_modulation,
)
from models.common.embeddings import TimestepMLP, rope_cos_sin_nd, sincos_1d
from models.common.init import ParamInit
from models.common.modulation import AdaLNModulation, layer_norm, modulate
from models.common.parallelize import parallelize_blocks_keeping_input_dtypes
from models.common.patches import PatchEmbedND, unpatchify_nd
from models.common.presets import count_params_on_meta, resolve_preset

# num_heads x head_dim = width; "stable_audio" is Stable Audio Open's DiT width and depth (1.26B
# here with adaLN-zero)
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"depth": 3, "num_heads": 4, "head_dim": 32},
    "small": {"depth": 8, "num_heads": 8, "head_dim": 32},
    "base": {"depth": 12, "num_heads": 12, "head_dim": 64},
    "stable_audio": {"depth": 24, "num_heads": 24, "head_dim": 64},
}
TIMING = ("seconds_start", "seconds_total")


@dataclass(kw_only=True)
class AudioDiTConfig:
    name: str = option("audio_dit", "Model family.")
    size: str = option("tiny", "Size preset (depth, num_heads, head_dim).", choices=PRESETS)
    depth: int | None = option(None, "Blocks; overrides the preset.", ge=1)
    num_heads: int | None = option(None, "Attention heads; overrides the preset.", ge=1)
    head_dim: int | None = option(None, "Width per head; overrides the preset.", ge=4)
    in_channels: int = option(64, "Channels of the latent sequence (the autoencoder's).", ge=1)
    patch_size: int = option(1, "Latent frames per token.", ge=1)
    context_dim: int = option(768, "Width of the text token sequence (T5-base: 768).", ge=1)
    seconds_max: float = option(
        512.0, "Largest seconds_start / seconds_total the timing embedding resolves.", gt=0
    )
    qk_norm: bool = option(True, "Per-head RMS norm of queries and keys.")
    shared_modulation: bool = option(False, SHARED_MODULATION_HELP)
    mlp_ratio: float = option(4.0, "MLP hidden width / model width.", gt=0)
    rope_base: float = option(10000.0, "RoPE frequency base.", gt=1)
    sample_frames: int = option(
        1024, "Typical latent frames per sample, used to report FLOPs per sample for MFU.", ge=1
    )
    text_tokens: int = option(
        128, "Typical text tokens per sample (T5), for FLOPs per sample.", ge=0
    )

    def dims(self) -> dict[str, int]:
        return resolve_preset(PRESETS, self.size, self)

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        dims = self.dims()
        if dims["head_dim"] % 2:
            return [("head_dim", f"must be even for RoPE (got {dims['head_dim']})")]
        return []


class AudioDiT(nn.Module):
    def __init__(self, cfg: AudioDiTConfig):
        super().__init__()
        dims = cfg.dims()
        self.cfg = cfg
        self.head_dim, self.num_heads = dims["head_dim"], dims["num_heads"]
        self.width = width = dims["num_heads"] * dims["head_dim"]
        self.patch_embed = PatchEmbedND(cfg.in_channels, width, (cfg.patch_size,))
        self.time_embed = TimestepMLP(width)
        self.start_embed = TimestepMLP(width)
        self.total_embed = TimestepMLP(width)
        self.context_embed = nn.Linear(cfg.context_dim, width)
        hidden = int(width * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            CrossDiTBlock(width, dims["num_heads"], hidden, cfg.qk_norm, cfg.shared_modulation)
            for _ in range(dims["depth"])
        )
        self.block_mod = AdaLNModulation(width, 6) if cfg.shared_modulation else None
        self.final_norm = layer_norm(width)
        self.final_mod = AdaLNModulation(width, 2)  # (shift, scale)
        self.final_proj = nn.Linear(width, cfg.patch_size * cfg.in_channels)
        # set by enable_context_parallel: blocks then hold 1 / P of the tokens each
        self.context_parallel: ContextParallel | None = None

    def forward(
        self, x_BCT: torch.Tensor, t_B: torch.Tensor, cond: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        missing = [k for k in TIMING if cond is None or k not in cond]
        if missing:
            raise ValueError(f"the audio DiT needs the timing condition {missing} in cond")
        if x_BCT.ndim != 3 or x_BCT.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"expected latents (B, {self.cfg.in_channels}, T), got {tuple(x_BCT.shape)}"
            )
        dtype = self.patch_embed.proj.weight.dtype
        tokens, grid = self.patch_embed(x_BCT.to(dtype))
        seconds = [
            cond[k].float().clamp(0, self.cfg.seconds_max) / self.cfg.seconds_max for k in TIMING
        ]
        start, total = self.start_embed(seconds[0], dtype), self.total_embed(seconds[1], dtype)
        vec = self.time_embed(t_B, dtype) + start + total
        context = [start[:, None], total[:, None]]
        if "context" in cond:
            context.insert(0, self.context_embed(cond["context"].to(dtype)))
        context_BLD = torch.cat(context, dim=1)
        # RoPE in attention scores only relative offsets; a frame must also know where it
        # is to end the clip where seconds_total says, so tokens get an absolute sin-cos
        # embedding of their index too (added in fp32, as the image DiTs add theirs).
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        tokens = (tokens + sincos_1d(self.width, positions).to(tokens.device)).to(dtype)
        rope = rope_cos_sin_nd(positions[:, None], self.head_dim, base=self.cfg.rope_base)
        cp = self.context_parallel
        if cp is not None:
            tokens, rope = cp.shard(tokens, rope, self.num_heads)
        block_vec = shared_modulation(self.block_mod, vec)
        for block in self.blocks:
            tokens = block(tokens, context_BLD, block_vec, rope, cp=cp)
        shift, scale = self.final_mod(vec)
        tokens = self.final_proj(modulate(self.final_norm(tokens), shift, scale))
        if cp is not None:
            tokens = cp.gather(tokens)
        out = unpatchify_nd(tokens, (self.cfg.patch_size,), self.cfg.in_channels, grid)
        return out.clone() if out._is_view() else out  # FSDP2's hooks need a non-view

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Xavier-uniform linears, zero biases; adaLN-zero and zero cross-attention
        outputs (every block starts as the identity), zero output head."""
        init = ParamInit(self, seed)
        init.defaults_(self)
        init.own_init_(
            self, PatchEmbedND, TimestepMLP, AdaLNModulation, CrossAttention, CrossDiTBlock
        )
        init.own_init_(self, QKVProjection)
        init.zeros_(self.final_proj.weight)
        init.zeros_(self.final_proj.bias)

    def flops_per_sample(self, frames: int | None = None, text_tokens: int | None = None) -> float:
        """Training FLOPs (forward + backward = 3x forward) for one sample of ``frames``
        latent frames and ``text_tokens`` T5 tokens (defaults: sample_frames, text_tokens).

        Matmuls: 2 FLOPs per weight per token it acts on: the S = N patch tokens; the
        text tokens for the context projection; the text + 2 timing tokens for the cross
        keys / values; once per sample for the embeddings of t and timing and the
        modulations. Attention: QK^T and AV, 4 N^2 D (self) + 4 N L_ctx D (cross) per block.
        """
        frames = self.cfg.sample_frames if frames is None else frames
        text = self.cfg.text_tokens if text_tokens is None else text_tokens
        patches, context = frames // self.cfg.patch_size, text + len(TIMING)
        seq = patches
        counts = {"patches": 0, "seq": 0, "context": 0, "text": 0, "sample": 0}
        for name, module in self.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv1d)):
                continue
            if name.startswith(("patch_embed", "final_proj")):
                where = "patches"
            elif name.startswith("context_embed"):
                where = "text"
            elif name.endswith("cross.kv"):
                where = "context"
            elif name.endswith("mod.linear") or name.startswith(("time_", "start_", "total_")):
                where = "sample"
            else:
                where = "seq"
            counts[where] += module.weight.numel()
        forward = 2 * (
            counts["patches"] * patches + counts["seq"] * seq + counts["context"] * context
            + counts["text"] * text + counts["sample"]
        )  # fmt: skip
        forward += len(self.blocks) * 4 * self.width * (seq * seq + seq * context)
        return 3.0 * forward


def build(cfg: AudioDiTConfig) -> AudioDiT:
    return AudioDiT(cfg)


# (model, ParallelPlan, mesh) -> model; forward casts its own inputs, keeping t in fp32
parallelize = parallelize_blocks_keeping_input_dtypes


def num_params(cfg: AudioDiTConfig) -> int:
    return count_params_on_meta(AudioDiT, cfg)
