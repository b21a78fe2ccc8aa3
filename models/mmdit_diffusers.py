"""State-dict adapter between diffusers' ``SD3Transformer2DModel`` and our MMDiT.

Lets a run start from a published SD3 / SD3.5 checkpoint that is on local disk, and
export our weights back into the diffusers layout. Everything here is key renames over
plain tensors, plus concatenating / splitting q, k, v for our fused projections;
diffusers is not imported (it is a test / benchmark dependency only).

Conventions that differ at the edge (the networks compute the same function):

- time: diffusers' transformer takes ``timestep = sigma * 1000``; ours takes t in [0, 1]
  and multiplies by 1000 inside ``timestep_embedding``. Call ours with t = timestep / 1000.
- position table: diffusers stores the (deterministic) 2-D sin-cos table as a persistent
  buffer ``pos_embed.pos_embed``; ours recomputes it from the config (non-persistent), so
  ``from_diffusers_state_dict`` drops it and ``to_diffusers_state_dict(sd, cfg)`` rebuilds it.
- text projection: diffusers' ``caption_projection_dim`` is our width (heads x head_dim).

Supported: SD3 (medium) and SD3.5 large layouts, i.e. joint blocks with optional RMS
QK-norm. Not supported (rejected with a ValueError): SD3.5-medium's dual-attention
blocks (``dual_attention_layers``), other QK-norms, ``out_channels != in_channels``, no
position-table cropping (``pos_embed_max_size`` None).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from models.common.diffusers_io import (  # noqa: F401  (file names: re-exported)
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    listing,
    model_directory,
    read_config,
    read_weights,
)
from models.common.embeddings import sincos_2d_grid
from models.mmdit import PRESETS, MMDiTConfig

POS_TABLE_KEY = "pos_embed.pos_embed"

# SD3Transformer2DModel.__init__ defaults (diffusers 0.42), for keys a config.json omits.
DIFFUSERS_DEFAULTS: dict[str, object] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 96,
    "dual_attention_layers": (),
    "qk_norm": None,
}
_QK_NORMS = {None: False, "rms_norm": True}

# (diffusers name, our name) for everything outside the blocks ...
_TOP_KEYS: list[tuple[str, str]] = [
    ("pos_embed.proj", "patch_embed.proj"),
    ("time_text_embed.timestep_embedder.linear_1", "time_embed.linear_1"),
    ("time_text_embed.timestep_embedder.linear_2", "time_embed.linear_2"),
    ("time_text_embed.text_embedder.linear_1", "pooled_embed.0"),
    ("time_text_embed.text_embedder.linear_2", "pooled_embed.2"),
    ("context_embedder", "context_embed"),
    ("norm_out.linear", "final_mod.linear"),
    ("proj_out", "final_proj"),
]
# ... and inside block i (``transformer_blocks.{i}.`` <-> ``blocks.{i}.``). The last
# block has no c_out / c_mlp (pre-only text stream); its norm1_context is the
# AdaLayerNormContinuous with (scale, shift), our 2-chunk c_mod.
_BLOCK_KEYS: list[tuple[str, str]] = [
    ("norm1.linear", "x_mod.linear"),
    ("norm1_context.linear", "c_mod.linear"),
    ("attn.norm_q", "x_qkv.q_norm"),
    ("attn.norm_k", "x_qkv.k_norm"),
    ("attn.norm_added_q", "c_qkv.q_norm"),
    ("attn.norm_added_k", "c_qkv.k_norm"),
    ("attn.to_out.0", "x_out"),
    ("attn.to_add_out", "c_out"),
    ("ff.net.0.proj", "x_mlp.fc1"),
    ("ff.net.2", "x_mlp.fc2"),
    ("ff_context.net.0.proj", "c_mlp.fc1"),
    ("ff_context.net.2", "c_mlp.fc2"),
]
# Our fused q/k/v projections: rows [q; k; v] of one Linear <- diffusers' three Linears.
_BLOCK_FUSED: dict[str, tuple[str, str, str]] = {
    "x_qkv.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "c_qkv.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_PARAM_SUFFIXES = ("weight", "bias")
_DIFFUSERS_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)")
_OUR_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")


def _top_rename(key: str, to_ours: bool) -> str | None:
    src, dst = (0, 1) if to_ours else (1, 0)
    module, _, param = key.rpartition(".")
    if param in _PARAM_SUFFIXES:
        for pair in _TOP_KEYS:
            if module == pair[src]:
                return f"{pair[dst]}.{param}"
    return None


def _rename(
    sd: dict[str, torch.Tensor],
    to_ours: bool,
    convert_block: Callable[[dict[str, torch.Tensor], str, str, str, torch.Tensor], bool],
) -> dict[str, torch.Tensor]:
    """``sd`` with keys outside the blocks renamed by ``_TOP_KEYS`` and each key of block i
    handed to ``convert_block(out, i, module, param, value)``, which writes ``out`` or says
    False (no rule). Every key without a rule is reported in one ValueError."""
    block_pattern = _DIFFUSERS_BLOCK if to_ours else _OUR_BLOCK
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if to_ours and key == POS_TABLE_KEY:
            continue
        match = block_pattern.fullmatch(key)
        if match is None:
            renamed = _top_rename(key, to_ours)
            if renamed is None:
                unknown.append(key)
            else:
                out[renamed] = value
        elif not convert_block(out, *match.groups(), value):
            unknown.append(key)
    if unknown:
        source, target = ("diffusers SD3", "MMDiT") if to_ours else ("MMDiT", "diffusers")
        raise ValueError(
            f"{source} state dict has keys with no {target} counterpart: {listing(unknown)}"
        )
    return out


def from_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``SD3Transformer2DModel`` state dict -> our ``MMDiT`` state dict.

    Renamed tensors are the same objects; q, k, v are concatenated into our fused
    projection. ``pos_embed.pos_embed`` is dropped (ours recomputes it). Any key without
    a rule, e.g. a dual-attention ``attn2``, is an error.
    """
    fused_part = {
        part: (ours, i) for ours, parts in _BLOCK_FUSED.items() for i, part in enumerate(parts)
    }
    block_rename = {theirs: ours for theirs, ours in _BLOCK_KEYS}
    pending: dict[str, list[torch.Tensor | None]] = {}

    def convert_block(out, index, module, param, value) -> bool:
        if module in block_rename:
            out[f"blocks.{index}.{block_rename[module]}.{param}"] = value
        elif module in fused_part:
            fused, part = fused_part[module]
            pending.setdefault(f"blocks.{index}.{fused}.{param}", [None, None, None])[part] = value
        else:
            return False
        return True

    out = _rename(sd, True, convert_block)
    incomplete = [key for key, parts in pending.items() if any(p is None for p in parts)]
    if incomplete:
        raise ValueError(f"diffusers SD3 state dict lacks some of q/k/v for: {listing(incomplete)}")
    for key, parts in pending.items():
        out[key] = torch.cat(parts, dim=0)
    return out


def to_diffusers_state_dict(
    sd: dict[str, torch.Tensor], cfg: MMDiTConfig | None = None
) -> dict[str, torch.Tensor]:
    """Our ``MMDiT`` state dict -> diffusers ``SD3Transformer2DModel`` state dict.

    Fused q/k/v projections are split (into copies, so the result can be saved with
    safetensors, which refuses tensors that share memory). With ``cfg`` the position
    table ``pos_embed.pos_embed`` (a persistent buffer in diffusers, needed for a strict
    ``load_state_dict``) is added, computed from the config.
    """
    block_rename = {ours: theirs for theirs, ours in _BLOCK_KEYS}

    def convert_block(out, index, module, param, value) -> bool:
        if module in block_rename:
            out[f"transformer_blocks.{index}.{block_rename[module]}.{param}"] = value
        elif module in _BLOCK_FUSED and value.shape[0] % 3 == 0:
            for part, chunk in zip(_BLOCK_FUSED[module], value.chunk(3, dim=0)):
                out[f"transformer_blocks.{index}.{part}.{param}"] = chunk.clone()
        else:
            return False
        return True

    out = _rename(sd, False, convert_block)
    if cfg is not None:
        width = cfg.dims()["num_heads"] * cfg.dims()["head_dim"]
        out[POS_TABLE_KEY] = sincos_2d_grid(width, cfg.pos_max_grid, cfg.pos_base_grid)[None]
    return out


def config_from_diffusers(diffusers_config: dict) -> MMDiTConfig:
    """``SD3Transformer2DModel`` config (``config.json`` as a dict) -> ``MMDiTConfig``.

    Every unsupported setting is reported in one ValueError.
    """
    problems = []
    unknown = sorted(
        k for k in diffusers_config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS
    )
    if unknown:
        problems.append(f"unknown keys {unknown}")
    class_name = diffusers_config.get("_class_name", "SD3Transformer2DModel")
    if class_name != "SD3Transformer2DModel":
        problems.append(f"_class_name is {class_name!r}, expected 'SD3Transformer2DModel'")
    c = {
        **DIFFUSERS_DEFAULTS,
        **{k: v for k, v in diffusers_config.items() if k in DIFFUSERS_DEFAULTS},
    }
    width = c["num_attention_heads"] * c["attention_head_dim"]
    if c["caption_projection_dim"] != width:
        problems.append(
            f"caption_projection_dim {c['caption_projection_dim']} must equal num_attention_heads x "
            f"attention_head_dim = {width} (the text stream has the image stream's width)"
        )
    if c["out_channels"] is not None and c["out_channels"] != c["in_channels"]:
        problems.append(
            f"out_channels {c['out_channels']} must equal in_channels {c['in_channels']}"
        )
    if tuple(c["dual_attention_layers"] or ()):
        problems.append(
            f"dual_attention_layers {list(c['dual_attention_layers'])} (SD3.5-medium MMDiT-X "
            "blocks) are not supported"
        )
    if c["qk_norm"] not in _QK_NORMS:
        problems.append(f"qk_norm {c['qk_norm']!r} is not supported (None or 'rms_norm')")
    if c["pos_embed_max_size"] is None:
        problems.append("pos_embed_max_size None (no position-table cropping) is not supported")
    if c["sample_size"] % c["patch_size"]:
        problems.append(
            f"sample_size {c['sample_size']} is not a multiple of patch_size {c['patch_size']}"
        )
    if problems:
        raise ValueError("unsupported diffusers SD3 config: " + "; ".join(problems))
    dims = {
        "depth": c["num_layers"],
        "num_heads": c["num_attention_heads"],
        "head_dim": c["attention_head_dim"],
    }
    size = next((name for name, preset in PRESETS.items() if preset == dims), None)
    return MMDiTConfig(
        size=size or "tiny",
        **({} if size else dims),
        in_channels=c["in_channels"],
        patch_size=c["patch_size"],
        context_dim=c["joint_attention_dim"],
        pooled_dim=c["pooled_projection_dim"],
        pos_max_grid=c["pos_embed_max_size"],
        pos_base_grid=c["sample_size"] // c["patch_size"],
        qk_norm=_QK_NORMS[c["qk_norm"]],
        mlp_ratio=4.0,
        sample_size=c["sample_size"],
    )


def config_to_diffusers(cfg: MMDiTConfig) -> dict:
    """``MMDiTConfig`` -> ``SD3Transformer2DModel`` keyword arguments (the way back)."""
    dims = cfg.dims()
    problems = []
    if cfg.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio {cfg.mlp_ratio} (diffusers' MLP is 4x wide)")
    if cfg.pos_base_grid * cfg.patch_size != cfg.sample_size:
        problems.append(
            f"pos_base_grid {cfg.pos_base_grid} x patch_size {cfg.patch_size} != sample_size "
            f"{cfg.sample_size} (diffusers derives the base grid from sample_size)"
        )
    if problems:
        raise ValueError("MMDiT config has no diffusers equivalent: " + "; ".join(problems))
    return {
        "sample_size": cfg.sample_size,
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "num_layers": dims["depth"],
        "attention_head_dim": dims["head_dim"],
        "num_attention_heads": dims["num_heads"],
        "joint_attention_dim": cfg.context_dim,
        "caption_projection_dim": dims["num_heads"] * dims["head_dim"],
        "pooled_projection_dim": cfg.pooled_dim,
        "out_channels": cfg.in_channels,
        "pos_embed_max_size": cfg.pos_max_grid,
        "dual_attention_layers": (),
        "qk_norm": "rms_norm" if cfg.qk_norm else None,
    }


def load_diffusers_checkpoint(path: str | Path) -> tuple[MMDiTConfig, dict[str, torch.Tensor]]:
    """Read a local diffusers SD3 transformer (safetensors only) -> (config, our state dict).

    ``path`` is the transformer directory (``config.json`` + ``diffusion_pytorch_model
    .safetensors`` or a sharded ``*.safetensors.index.json``), a pipeline directory with a
    ``transformer/`` subfolder, or one ``.safetensors`` file with ``config.json`` beside it.
    Tensors keep their stored dtype. The stored position table is checked against ours.
    """
    path = model_directory(path, "transformer")
    cfg = config_from_diffusers(read_config(path))
    state, files = read_weights(path)
    if POS_TABLE_KEY in state:
        _check_pos_table(state[POS_TABLE_KEY], cfg, files[0])
    return cfg, from_diffusers_state_dict(state)


def _check_pos_table(stored: torch.Tensor, cfg: MMDiTConfig, where: Path) -> None:
    width = cfg.dims()["num_heads"] * cfg.dims()["head_dim"]
    ours = sincos_2d_grid(width, cfg.pos_max_grid, cfg.pos_base_grid)[None]
    if stored.shape != ours.shape or not torch.allclose(stored.float(), ours, atol=1e-2):
        raise ValueError(
            f"{where}: stored position table {tuple(stored.shape)} does not match the one computed "
            f"from config.json {tuple(ours.shape)} (different layout or interpolation scale)"
        )
