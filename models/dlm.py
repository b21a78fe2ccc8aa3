"""DLM: the bidirectional text transformer behind the discrete diffusion LMs (MDLM, SEDD,
BD3-LM) and their autoregressive baseline.

Token embedding -> pre-norm transformer blocks (rotary positions, SDPA attention, GELU
MLP) -> final norm -> untied linear head. With ``time_conditioning`` every block is
modulated adaLN-zero style by the noise level sigma (DiT / MDLM's DDiT): sigma goes
through the shared sinusoidal ``TimestepMLP`` (sinusoids of 1000 sigma) to a vector c,
and c gives per-channel shift / scale / gate. sigma is per sequence [B] or per token
[B, L] (BD3-LM: one level per block); per-token modulations are computed once per
distinct sigma value and gathered, so per-block levels cost no more than per-sequence
ones.

Interface: ``model(tokens_BL, sigma=None, *, attn_mask=None, positions=None,
kv_cache=None) -> logits_BLV`` (float32 over all V ids; the objective applies its own
parameterisation):

* ``attn_mask``: None for full bidirectional attention, else a bool tensor broadcastable
  to (B, 1, L, M), True = may attend; M = cached tokens + L (cache first). A row with no
  True entry gives NaN (SDPA's behaviour): every query must see at least one key.
* ``positions``: rotary positions, (L,) or (B, L); default arange(L) offset by the
  cache length. Positions may repeat (BD3-LM's x_t ++ x_0 pass uses arange(L) twice).
* ``kv_cache``: a :class:`KVCache` from ``model.new_kv_cache()``. The current tokens
  attend to the cached keys / values plus their own; they are appended to the cache
  unless ``cache.frozen`` (BD3-LM's denoising passes of the current block). The cache
  holds detached tensors: it is for sampling, not for training.

Shapes: B batch, L current tokens, M attended keys (cache + L), D width, H heads, K head
dim, V vocabulary, N distinct conditioning values, C conditioning width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from configlib import option
from models.common.attention import QKVProjection, attention
from models.common.embeddings import TimestepMLP, apply_rope, rope_cos_sin
from models.common.init import ParamInit
from models.common.mlp import FeedForward
from models.common.modulation import AdaLNModulation, gated_residual, layer_norm, modulate
from models.common.parallelize import parallelize_blocks_keeping_input_dtypes
from models.common.presets import count_params_on_meta, resolve_preset

# width = num_heads x head_dim; cond_dim is the width of the sigma embedding c (MDLM: 128).
# Parameters at V = 50258 (GPT-2 + [MASK]) with time conditioning (without): tiny 14.2M
# (13.7M), small 170M (162M; 92M without embedding and head: MDLM / SEDD / BD3-LM's
# "small"), medium 425M (405M), 1b 1.06B (1.01B).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"width": 128, "depth": 4, "num_heads": 4, "cond_dim": 128},
    "small": {"width": 768, "depth": 12, "num_heads": 12, "cond_dim": 128},
    "medium": {"width": 1024, "depth": 24, "num_heads": 16, "cond_dim": 128},
    "1b": {"width": 2048, "depth": 16, "num_heads": 16, "cond_dim": 256},
}


@dataclass(kw_only=True)
class DLMConfig:
    name: str = option("dlm", "Model family.")
    size: str = option("tiny", "Size preset (width, depth, num_heads, cond_dim).", choices=PRESETS)
    vocab_size: int = option(
        doc="Token ids read and predicted: the tokenizer's vocab_size ([MASK] included).", ge=2
    )
    max_seq_len: int = option(
        1024,
        "Training sequence length: FLOPs per sample and the KV cache's initial capacity.",
        ge=1,
    )
    width: int | None = option(None, "Model width; overrides the preset.", ge=8)
    depth: int | None = option(None, "Transformer blocks; overrides the preset.", ge=1)
    num_heads: int | None = option(None, "Attention heads; overrides the preset.", ge=1)
    cond_dim: int | None = option(
        None, "Width of the sigma embedding that drives adaLN; overrides the preset.", ge=1
    )
    mlp_ratio: float = option(4.0, "MLP hidden width / model width.", gt=0)
    time_conditioning: bool = option(
        True, "adaLN conditioning on the noise level sigma (diffusion); false for AR."
    )
    qk_norm: bool = option(False, "Per-head RMS norm of queries and keys.")
    rope_base: float = option(10000.0, "Rotary embedding base (longest wavelength / 2 pi).", gt=1)

    def dims(self) -> dict[str, int]:
        return resolve_preset(PRESETS, self.size, self)

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = []
        dims = self.dims()
        head_dim, rest = divmod(dims["width"], dims["num_heads"])
        if rest:
            out.append(("num_heads", f"{dims['num_heads']} does not divide width {dims['width']}"))
        elif head_dim % 2:
            out.append(("num_heads", f"head width {head_dim} must be even for rotary positions"))
        if not self.time_conditioning and "cond_dim" in given:
            out.append(("cond_dim", "has no effect with time_conditioning: false"))
        return out


class KVCache:
    """Keys (after RoPE) and values of the tokens seen so far, for every block.

    Buffers are (B, H, capacity, K) per block, grown by doubling; ``len(cache)`` tokens
    of them are valid. ``frozen`` stops forward passes from appending (BD3-LM denoises
    the current block against the committed ones, then commits the clean block with
    ``frozen = False``).
    """

    def __init__(self, num_layers: int, capacity: int = 0):
        self.frozen = False
        self._capacity = capacity
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def past(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Block ``layer``'s cached (B, H, len, K) keys and values (None when empty)."""
        if self._length == 0 or self._keys[layer] is None:
            return None, None
        return (
            self._keys[layer][:, :, : self._length],
            self._values[layer][:, :, : self._length],
        )

    def store(self, layer: int, k_BHLK: torch.Tensor, v_BHLK: torch.Tensor) -> None:
        """Write block ``layer``'s new keys / values after the valid ones (see advance)."""
        batch, heads, count, head_dim = k_BHLK.shape
        end = self._length + count
        buf = self._keys[layer]
        if buf is not None and buf.shape[0] != batch:
            if self._length:
                raise ValueError(
                    f"the KV cache holds {buf.shape[0]} sequences, the input has {batch}; "
                    "use cache.reorder to change it"
                )
            buf = None
        if buf is None or buf.shape[2] < end or buf.dtype != k_BHLK.dtype:
            capacity = max(end, self._capacity, 2 * (buf.shape[2] if buf is not None else 0))
            shape = (batch, heads, capacity, head_dim)
            new_k = k_BHLK.new_empty(shape)
            new_v = v_BHLK.new_empty(shape)
            if buf is not None and self._length:
                new_k[:, :, : self._length] = self._keys[layer][:, :, : self._length]
                new_v[:, :, : self._length] = self._values[layer][:, :, : self._length]
            self._keys[layer], self._values[layer] = new_k, new_v
        self._keys[layer][:, :, self._length : end] = k_BHLK.detach()
        self._values[layer][:, :, self._length : end] = v_BHLK.detach()

    def advance(self, count: int) -> None:
        """Mark ``count`` stored tokens valid (after every block stored them)."""
        self._length += count

    def truncate(self, length: int) -> None:
        """Forget every token after the first ``length``."""
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot truncate a KV cache of {self._length} tokens to {length}")
        self._length = length

    def reorder(self, index_B: torch.Tensor) -> None:
        """Keep / repeat / permute sequences: new sequence i is old sequence index_B[i]."""
        for layer, buf in enumerate(self._keys):
            if buf is not None:
                index = index_B.to(buf.device)
                self._keys[layer] = buf.index_select(0, index)
                self._values[layer] = self._values[layer].index_select(0, index)


class _Head(nn.Linear):
    """Output projection with its bias added out of place: F.linear's fused bias on 3-D
    input returns a view, and FSDP2 warns about view outputs of the root module. The extra
    pass over the logits is cheap next to the matmul. Same parameters as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.bias


def _norm(dim: int, conditioned: bool) -> nn.LayerNorm:
    # adaLN supplies scale and shift when conditioned; otherwise the norm learns a scale
    return layer_norm(dim) if conditioned else nn.LayerNorm(dim, eps=1e-6, bias=False)


def _per_token(
    chunks: tuple[torch.Tensor, ...], cond_index_BL: torch.Tensor | None
) -> list[torch.Tensor]:
    """(N, D) modulation chunks -> (B, 1, D) for per-sequence c (N = B) or (B, L, D)."""
    if cond_index_BL is None:
        return [c[:, None] for c in chunks]
    return [c[cond_index_BL] for c in chunks]


class DLMBlock(nn.Module):
    """Pre-norm block: (adaLN-modulated) attention with RoPE, then the MLP.

    Pure function of its inputs: with ``keep_kv`` it returns the current tokens' keys /
    values and the model stores them, so activation checkpointing can recompute it safely.
    Without, it returns None for both: they are views of the projection, and FSDP2 warns
    about (in-place hazards on) view outputs of a wrapped module.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_hidden: int, qk_norm: bool, cond_dim: int | None
    ):
        super().__init__()
        conditioned = cond_dim is not None
        self.norm_attn = _norm(dim, conditioned)
        self.qkv = QKVProjection(dim, num_heads, qk_norm)
        self.attn_out = nn.Linear(dim, dim)
        self.norm_mlp = _norm(dim, conditioned)
        self.mlp = FeedForward(dim, mlp_hidden)
        # shift / scale / gate for attention and MLP
        self.mod = AdaLNModulation(dim, 6, cond_dim) if conditioned else None

    def forward(
        self,
        x_BLD: torch.Tensor,
        cond_NC: torch.Tensor | None,
        cond_index_BL: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past_k: torch.Tensor | None,
        past_v: torch.Tensor | None,
        keep_kv: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        h = self.norm_attn(x_BLD)
        if self.mod is not None:
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = _per_token(
                self.mod(cond_NC), cond_index_BL
            )
            h = modulate(h, shift_a, scale_a)
        q, k, v = self.qkv(h)  # (B, L, H, K)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, K)
        keys = k if past_k is None else torch.cat([past_k.to(k.dtype), k], dim=2)
        values = v if past_v is None else torch.cat([past_v.to(v.dtype), v], dim=2)
        attn = self.attn_out(attention(q, keys, values, attn_mask))
        if not keep_kv:
            k = v = None
        if self.mod is None:
            x_BLD = x_BLD + attn
            return x_BLD + self.mlp(self.norm_mlp(x_BLD)), k, v
        x_BLD = gated_residual(x_BLD, gate_a, attn)
        x_BLD = gated_residual(
            x_BLD, gate_m, self.mlp(modulate(self.norm_mlp(x_BLD), shift_m, scale_m))
        )
        return x_BLD, k, v


class DLM(nn.Module):
    def __init__(self, cfg: DLMConfig):
        super().__init__()
        dims = cfg.dims()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.max_seq_len = cfg.max_seq_len
        self.time_conditioning = cfg.time_conditioning
        self.width = width = dims["width"]
        self.head_dim = width // dims["num_heads"]
        cond_dim = dims["cond_dim"] if cfg.time_conditioning else None
        self.embed = nn.Embedding(cfg.vocab_size, width)
        self.time_embed = TimestepMLP(cond_dim) if cond_dim else None
        hidden = int(width * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            DLMBlock(width, dims["num_heads"], hidden, cfg.qk_norm, cond_dim)
            for _ in range(dims["depth"])
        )
        self.final_norm = _norm(width, cond_dim is not None)
        self.final_mod = AdaLNModulation(width, 2, cond_dim) if cond_dim else None  # shift, scale
        self.head = _Head(width, cfg.vocab_size)

    def new_kv_cache(self) -> KVCache:
        return KVCache(len(self.blocks), capacity=self.max_seq_len)

    def _conditioning(
        self, sigma: torch.Tensor | None, batch: int, seq: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """sigma -> (c (N, C), index (B, L) into c, or None when c is per sequence)."""
        if self.time_embed is None:
            return None, None  # sigma is allowed and ignored (see the module docstring)
        if sigma is None:
            raise ValueError("this DLM has time_conditioning: pass sigma ([B] or [B, L])")
        sigma = torch.as_tensor(sigma, device=self.embed.weight.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(batch)
        if sigma.shape == (batch,):
            return self.time_embed(sigma, dtype), None
        if sigma.shape != (batch, seq):
            raise ValueError(
                f"sigma has shape {tuple(sigma.shape)}; expected ({batch},) or ({batch}, {seq})"
            )
        # one embedding per distinct level (BD3-LM: a few per sequence), gathered per token
        values, index_BL = torch.unique(sigma, return_inverse=True)
        return self.time_embed(values, dtype), index_BL

    def forward(
        self,
        tokens_BL: torch.Tensor,
        sigma: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        batch, seq = tokens_BL.shape
        cached = len(kv_cache) if kv_cache is not None else 0
        device = self.embed.weight.device
        if positions is None:
            positions = torch.arange(cached, cached + seq, device=device)
        elif positions.shape[-1] != seq or positions.dim() not in (1, 2):
            raise ValueError(
                f"positions {tuple(positions.shape)} do not match tokens {(batch, seq)}"
            )
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise ValueError(
                    f"attn_mask must be a bool tensor (True = may attend), got {attn_mask.dtype}"
                )
            if tuple(attn_mask.shape[-2:]) != (seq, cached + seq):
                raise ValueError(
                    f"attn_mask ends in {tuple(attn_mask.shape[-2:])}; expected "
                    f"({seq}, {cached + seq}) for {seq} tokens after {cached} cached"
                )
            attn_mask = attn_mask.to(device)
        x_BLD = self.embed(tokens_BL.to(device))
        cond_NC, cond_index_BL = self._conditioning(sigma, batch, seq, x_BLD.dtype)
        cos, sin = rope_cos_sin(positions.to(device), self.head_dim, self.cfg.rope_base)
        store = kv_cache is not None and not kv_cache.frozen
        for layer, block in enumerate(self.blocks):
            past_k, past_v = kv_cache.past(layer) if kv_cache is not None else (None, None)
            x_BLD, k, v = block(
                x_BLD, cond_NC, cond_index_BL, cos, sin, attn_mask, past_k, past_v, store
            )
            if store:
                kv_cache.store(layer, k, v)
        if store:
            kv_cache.advance(seq)
        h = self.final_norm(x_BLD)
        if self.final_mod is not None:
            shift, scale = _per_token(self.final_mod(cond_NC), cond_index_BL)
            h = modulate(h, shift, scale)
        return self.head(h).float()

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Xavier-uniform linears, zero biases, N(0, 0.02) embeddings; adaLN-zero and a
        zero head, so every block starts as identity and the first logits are uniform."""
        init = ParamInit(self, seed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init.linear_(module)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                init.layer_norm_(module)
            elif isinstance(module, QKVProjection):
                init.xavier_uniform_(module.qkv.weight, parts=3)  # q, k, v each its own matrix
        init.normal_(self.embed.weight, 0.02)
        init.own_init_(self, TimestepMLP, AdaLNModulation)
        init.zeros_(self.head.weight)
        init.zeros_(self.head.bias)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward = 3x forward) per token at length seq_len.

        Matmuls: 2 FLOPs per weight per token (embedding lookups are free); attention:
        QK^T and AV, 4 * seq_len * D per block and query; the sigma embedding and adaLN
        linears run once per sequence (per-sequence sigma), shared by its seq_len tokens.
        """
        token_w = cond_w = 0
        for name, module in self.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if name.startswith("time_embed") or name.endswith("mod.linear"):
                cond_w += module.weight.numel()
            else:
                token_w += module.weight.numel()
        forward = 2 * token_w + 4 * seq_len * self.width * len(self.blocks)
        forward += 2 * cond_w / seq_len
        return 3.0 * forward

    def flops_per_sample(self) -> float:
        """Training FLOPs of one max_seq_len sequence (the loop's MFU)."""
        return self.flops_per_token(self.max_seq_len) * self.max_seq_len


def build(cfg: DLMConfig) -> DLM:
    return DLM(cfg)


# (model, ParallelPlan, mesh) -> model. sigma must reach the sinusoids in fp32 (bf16
# rounds noise levels): the root's inputs keep their dtype, forward casts the embeddings
parallelize = parallelize_blocks_keeping_input_dtypes


def num_params(cfg: DLMConfig) -> int:
    return count_params_on_meta(DLM, cfg)
