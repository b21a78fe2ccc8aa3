"""Frozen text encoders for conditioning: T5 (transformers) and CLIP text (open_clip).

Each encoder is built from its config: weights come from a local checkpoint named by
``path`` (nothing is ever downloaded), or are random when the recipe says
``random_init: true`` (tests, the CPU demo, throughput runs). A missing ``path`` is an
error, never a reason to fall back to random weights. Encoders are frozen (no parameter
requires grad, always in eval mode), cast to ``dtype``, and map a list of strings to
tensors::

    T5TextEncoder(texts)   -> {"sequence": (B, L, D), "mask": (B, L)}
    ClipTextEncoder(texts) -> {"sequence": (B, L, D), "pooled": (B, P), "mask": (B, L)}

Shapes: B texts, L tokens (``max_length``; texts are truncated or padded to it), D width of
the encoder, P width of CLIP's projected pooled embedding. ``mask`` is True on real tokens
(including T5's ``</s>`` and CLIP's start/end tokens), False on padding.

Large encoders (T5-XXL, CLIP bigG) are sharded like the model with
:func:`shard_frozen_module`: FSDP2 per transformer layer and at the root, so each rank
holds 1/N of the weights and gathers one layer at a time.

``transformers`` and ``open_clip`` are imported only inside the constructors.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from configlib import option
from models.common.parallelize import DTYPES

# Random-init sizes, as plain data. "xxl" is T5 v1.1 XXL (the SD3 text encoder), so a
# random-init run measures the real memory and speed of sharding it.
T5_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2},
    "xxl": {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64},
}
# "full" keeps the architecture's own text tower; "tiny" shrinks it.
CLIP_PRESETS: dict[str, dict[str, Any] | None] = {
    "tiny": {
        "embed_dim": 32,
        "text_cfg": {"width": 32, "layers": 2, "heads": 2, "context_length": 77},
    },
    "full": None,
}
# Only the text tower is kept; a random-init model gets this stand-in vision tower so that
# building, say, bigG's 1.8B-parameter image tower is not paid for nothing.
_STANDIN_VISION_CFG = {
    "image_size": 32,
    "patch_size": 16,
    "width": 32,
    "layers": 1,
    "head_width": 32,
}
# Text-tower options whose forward differs from the causal CLIP text transformer we run.
_UNSUPPORTED_TEXT_CFG = (
    "hf_model_name",
    "hf_tokenizer_name",
    "tokenizer_mode",
    "embed_cls",
    "no_causal_mask",
    "final_ln_after_pool",
)

_RANDOM_INIT_ONLY = "has no effect unless random_init is true (a loaded encoder has the checkpoint's size and weights)"


# ------------------------------------------------------------------------------ configs
@dataclass(kw_only=True)
class FrozenEncoderConfig:
    """Options every frozen text encoder has: where its weights come from and their dtype."""

    random_init: bool = option(
        False, "Build the encoder with random weights instead of loading path (tests, demos)."
    )
    seed: int = option(0, "Seed of random-init weights, so every rank builds the same encoder.")
    dtype: Literal["fp32", "bf16"] = option("fp32", "Dtype of the frozen weights and outputs.")


@dataclass(kw_only=True)
class T5EncoderConfig(FrozenEncoderConfig):
    path: str | None = option(
        None,
        "Local directory of a transformers T5 checkpoint (T5EncoderModel.from_pretrained, local files only).",
    )
    tokenizer_path: str | None = option(
        None,
        "A sentencepiece .model (data_pipeline.tokenizer; path or fsspec URL) or a local transformers "
        "tokenizer directory; default: the tokenizer saved in path. Required with random_init.",
    )
    size: Literal["tiny", "xxl"] = option(
        "tiny",
        "Size preset of a random-init encoder (tiny: d_model 32, 2 layers; xxl: T5 v1.1 XXL).",
    )
    max_length: int = option(
        256, "Tokens per text including </s>; longer texts are cut, shorter ones padded.", ge=2
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = _source_problems(self, given, "a local transformers T5 directory")
        if self.random_init and self.tokenizer_path is None:
            out.append(
                (
                    "tokenizer_path",
                    "required with random_init: true; train one with "
                    "`python -m data_pipeline.tokenizer train`",
                )
            )
        if (
            self.tokenizer_path
            and "://" in self.tokenizer_path
            and not self.tokenizer_path.endswith(".model")
        ):
            out.append(("tokenizer_path", "a remote tokenizer must be a sentencepiece .model file"))
        return out


@dataclass(kw_only=True)
class ClipTextEncoderConfig(FrozenEncoderConfig):
    arch: str = option(
        "ViT-L-14",
        "open_clip architecture (open_clip.list_models(), e.g. ViT-L-14, ViT-bigG-14) or a local "
        ".json architecture file in open_clip's format.",
    )
    path: str | None = option(
        None,
        "Local checkpoint file of that architecture (.pt/.bin/.safetensors state dict) for "
        "open_clip.create_model(arch, pretrained=path).",
    )
    size: Literal["tiny", "full"] = option(
        "tiny",
        "Size preset of a random-init encoder (tiny: width 32, 2 layers, 2 heads; full: arch's own).",
    )
    max_length: int = option(
        77, "Tokens per text including start/end; at most the arch's context length.", ge=2
    )
    hidden_layer: Literal["penultimate", "final"] = option(
        "penultimate",
        "Which hidden states 'sequence' returns: the second-to-last layer (SDXL/SD3) or the final normed one.",
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = _source_problems(self, given, "a local open_clip checkpoint file")
        arch_cfg, problem = _clip_arch_config(self.arch)
        if problem:
            out.append(("arch", problem))
            return out
        if arch_cfg is None:  # a .json file that is not there yet: checked when built
            return out
        text_cfg = dict(arch_cfg.get("text_cfg", {}))
        if self.random_init and CLIP_PRESETS[self.size]:
            text_cfg.update(CLIP_PRESETS[self.size]["text_cfg"])
        unsupported = _unsupported_text_options(text_cfg)
        if unsupported:
            out.append(("arch", unsupported))
        context = int(text_cfg.get("context_length", 77))
        if self.max_length > context:
            out.append(
                (
                    "max_length",
                    f"{self.max_length} exceeds the context length {context} of {self.arch}",
                )
            )
        return out


def _source_problems(
    cfg: T5EncoderConfig | ClipTextEncoderConfig, given: set[str], what: str
) -> list[tuple[str, str]]:
    """Weights come from exactly one place: ``path``, or random init asked for explicitly."""
    out = []
    if cfg.random_init:
        if cfg.path is not None:
            out.append(
                (
                    "path",
                    "cannot be combined with random_init: true (random weights would ignore it); drop one",
                )
            )
    else:
        if cfg.path is None:
            out.append(
                ("path", f"missing: set path to {what}, or random_init: true for random weights")
            )
        out += [(key, _RANDOM_INIT_ONLY) for key in ("size", "seed") if key in given]
    if cfg.path is not None and "://" in cfg.path:
        out.append(("path", "must be on local disk; copy the checkpoint there first"))
    return out


def _open_clip_config_dir() -> Path | None:
    # Read open_clip's bundled architecture files without importing it (config checks
    # run in every process that loads a recipe).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model_configs"


def _clip_arch_config(arch: str) -> tuple[dict | None, str | None]:
    """(architecture config, problem). A .json path that does not exist yet gives (None, None)."""
    if arch.endswith(".json"):
        path = Path(arch).expanduser()
        if not path.is_file():
            return None, None
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            return None, f"{arch} is not valid JSON ({err})"
    else:
        folder = _open_clip_config_dir()
        if folder is None:
            return None, "open_clip is not installed"
        known = {p.stem: p for p in folder.glob("*.json")}
        if arch not in known:
            close = difflib.get_close_matches(arch, list(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return (
                None,
                f"unknown open_clip architecture {arch!r}{hint}; see open_clip.list_models()",
            )
        data = json.loads(known[arch].read_text())
    if not all(k in data for k in ("embed_dim", "vision_cfg", "text_cfg")):
        return (
            None,
            f"{arch} is not an open_clip architecture (needs embed_dim, vision_cfg, text_cfg)",
        )
    return data, None


def _unsupported_text_options(text_cfg: dict) -> str | None:
    used = [key for key in _UNSUPPORTED_TEXT_CFG if text_cfg.get(key)]
    if used:
        return (
            f"text tower options {used} are not supported; use a causal CLIP text tower "
            "(e.g. ViT-L-14, ViT-H-14, ViT-bigG-14)"
        )
    return None


def _raise_config_problems(cfg: Any) -> None:
    problems = cfg.check(set())
    if problems:
        name = type(cfg).__name__
        raise ValueError("; ".join(f"{name}.{key}: {message}" for key, message in problems))


# ------------------------------------------------------------------------------ encoders
class FrozenTextEncoder(nn.Module):
    """Common behaviour: frozen, eval-only, one dtype. Subclasses list their layers in
    ``transformer_layers()`` for :func:`shard_frozen_module`."""

    def _freeze(self, dtype: str) -> None:
        self.to(DTYPES[dtype])
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        # A parent's model.train() must not switch on dropout here: the conditioning of a
        # text would change from step to step.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class _SentencePieceBatcher:
    """T5-style batches from our sentencepiece Tokenizer: ids then </s>, padded with <pad>."""

    def __init__(self, tokenizer: Any):
        if tokenizer.pad_id is None or tokenizer.eos_id is None:
            raise ValueError(f"tokenizer {tokenizer.source} needs pad and eos ids for T5")
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.tokenizer.encode_batch(texts)
        ids_BL = torch.full((len(texts), max_length), self.tokenizer.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((len(texts), max_length), dtype=torch.bool)
        for i, row in enumerate(rows):
            row = [*row[: max_length - 1], self.tokenizer.eos_id]
            ids_BL[i, : len(row)] = torch.tensor(row)
            mask_BL[i, : len(row)] = True
        return ids_BL, mask_BL


class _HFBatcher:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        return batch["input_ids"], batch["attention_mask"].bool()


def _t5_tokenizer(cfg: T5EncoderConfig) -> _SentencePieceBatcher | _HFBatcher:
    source = cfg.tokenizer_path or cfg.path
    local = Path(source).expanduser()
    if source.endswith(".model") or "://" in source or local.is_file():
        from data_pipeline.tokenizer import Tokenizer

        return _SentencePieceBatcher(Tokenizer.load(source))
    if not local.is_dir():
        raise FileNotFoundError(f"T5 tokenizer {source} does not exist")
    from transformers import AutoTokenizer

    try:
        return _HFBatcher(AutoTokenizer.from_pretrained(str(local), local_files_only=True))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"no transformers tokenizer in {source} ({err}); set tokenizer_path to a sentencepiece .model"
        ) from None


class T5TextEncoder(FrozenTextEncoder):
    """The encoder half of T5 (transformers ``T5EncoderModel``), frozen."""

    def __init__(self, cfg: T5EncoderConfig):
        super().__init__()
        _raise_config_problems(cfg)
        import transformers

        self.max_length = cfg.max_length
        path = None if cfg.random_init else Path(cfg.path).expanduser()
        # The weights' path is checked before the tokenizer, which defaults to it: the
        # error should name what the user got wrong.
        if path is not None and not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise FileNotFoundError(
                f"T5 encoder path {cfg.path} {what}; set path to a local transformers T5 "
                "directory (save_pretrained), or random_init: true for random weights"
            )
        self.batcher = _t5_tokenizer(cfg)
        if path is None:
            model_cfg = transformers.T5Config(
                vocab_size=self.batcher.vocab_size,
                feed_forward_proj="gated-gelu",  # T5 v1.1, as in SD3
                dropout_rate=0.0,
                tie_word_embeddings=False,
                **T5_PRESETS[cfg.size],
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = transformers.T5EncoderModel(model_cfg)
        else:
            try:
                model = transformers.T5EncoderModel.from_pretrained(
                    str(path), local_files_only=True, dtype=DTYPES[cfg.dtype]
                )
            except OSError as err:
                raise FileNotFoundError(
                    f"cannot load a T5 encoder from {cfg.path}: {err}"
                ) from None
        if self.batcher.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.batcher.vocab_size} ids but the T5 encoder only "
                f"{model.config.vocab_size} embeddings"
            )
        self.model = model
        self.width = model.config.d_model
        self._freeze(cfg.dtype)

    def transformer_layers(self) -> list[nn.Module]:
        return list(self.model.encoder.block)

    @torch.no_grad()
    def forward(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids_BL, mask_BL = self.batcher(list(texts), self.max_length)
        ids_BL, mask_BL = ids_BL.to(self.device), mask_BL.to(self.device)
        sequence_BLD = self.model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
        return {"sequence": sequence_BLD, "mask": mask_BL}


class ClipTextEncoder(FrozenTextEncoder):
    """The text tower of an open_clip CLIP model, frozen; the image tower is dropped."""

    def __init__(self, cfg: ClipTextEncoderConfig):
        super().__init__()
        _raise_config_problems(cfg)
        arch = cfg.arch
        if arch.endswith(".json") and not Path(arch).expanduser().is_file():
            raise FileNotFoundError(f"CLIP architecture file {arch} does not exist")
        import open_clip

        if arch.endswith(".json"):
            open_clip.add_model_config(Path(arch).expanduser())
            arch = Path(arch).stem
        arch_cfg = open_clip.get_model_config(arch)
        if cfg.random_init:
            overrides: dict[str, Any] = {"vision_cfg": dict(_STANDIN_VISION_CFG)}
            preset = CLIP_PRESETS[cfg.size]
            if preset:
                overrides["embed_dim"] = preset["embed_dim"]
                overrides["text_cfg"] = {**arch_cfg["text_cfg"], **preset["text_cfg"]}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = open_clip.create_model(arch, pretrained=None, **overrides)
            text_cfg = overrides.get("text_cfg", arch_cfg["text_cfg"])
        else:
            path = Path(cfg.path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"CLIP checkpoint {cfg.path} does not exist; set path to a local open_clip "
                    "checkpoint file, or random_init: true for random weights"
                )
            # An absolute path can never be mistaken for a pretrained tag (which would download).
            model = open_clip.create_model(arch, pretrained=str(path.resolve()))
            text_cfg = arch_cfg["text_cfg"]
        # CLIP keeps the text modules at its root; CustomTextCLIP in a TextTransformer.
        text = getattr(model, "text", model)
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding  # (context, D)
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection  # (D, P) parameter, Linear, or None
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)  # (context, context)
        self.pool_type = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        self.eos_id = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
        del model, text  # frees the image tower
        self.hidden_layer = cfg.hidden_layer
        self.width = self.transformer.width
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(
            context_length=cfg.max_length, **(text_cfg.get("tokenizer_kwargs") or {})
        )
        self._freeze(cfg.dtype)

    def transformer_layers(self) -> list[nn.Module]:
        return list(self.transformer.resblocks)

    @torch.no_grad()
    def forward(self, texts: list[str]) -> dict[str, torch.Tensor]:
        from open_clip.transformer import text_global_pool

        ids_BL = self.tokenizer(list(texts)).to(self.device)
        length = ids_BL.shape[1]
        dtype = self.dtype
        # The end token is the first occurrence of eot; everything after it is padding.
        end_B = (ids_BL == self.tokenizer.eot_token_id).int().argmax(dim=-1)
        mask_BL = torch.arange(length, device=ids_BL.device)[None] <= end_B[:, None]
        x_BLD = self.token_embedding(ids_BL).to(dtype) + self.positional_embedding[:length].to(
            dtype
        )
        attn_mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        batch_first = getattr(self.transformer, "batch_first", True)
        if not batch_first:
            x_BLD = x_BLD.transpose(0, 1)
        previous = x_BLD
        for block in self.transformer.resblocks:
            previous, x_BLD = x_BLD, block(x_BLD, attn_mask=attn_mask)
        if not batch_first:
            previous, x_BLD = previous.transpose(0, 1), x_BLD.transpose(0, 1)
        final_BLD = self.ln_final(x_BLD)
        pooled_BD = text_global_pool(final_BLD, ids_BL, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            pooled_BP = self.text_projection(pooled_BD)
        elif self.text_projection is not None:
            pooled_BP = pooled_BD @ self.text_projection
        else:
            pooled_BP = pooled_BD
        sequence_BLD = previous if self.hidden_layer == "penultimate" else final_BLD
        return {"sequence": sequence_BLD, "pooled": pooled_BP, "mask": mask_BL}


def build_text_encoder(cfg: T5EncoderConfig | ClipTextEncoderConfig) -> FrozenTextEncoder:
    """The frozen encoder a config describes."""
    if isinstance(cfg, T5EncoderConfig):
        return T5TextEncoder(cfg)
    if isinstance(cfg, ClipTextEncoderConfig):
        return ClipTextEncoder(cfg)
    raise TypeError(f"not a text encoder config: {type(cfg).__name__}")


# ------------------------------------------------------------------------------ sharding
def shard_frozen_module(
    module: nn.Module, mesh: Any = None, layers: list[nn.Module] | None = None
) -> nn.Module:
    """Shard a frozen encoder with FSDP2: each transformer layer, then the root.

    ``layers`` defaults to ``module.transformer_layers()``. Every rank keeps 1/N of each
    layer and gathers one layer at a time in forward. Unlike the trained model (see
    ``models.common.parallelize``), the root is resharded right after forward too:
    nothing runs backward through a frozen encoder, and FSDP2's default for a root would
    keep it gathered for that backward (for T5-XXL its whole 32k x 4096 embedding on every
    rank, for good).
    """
    from torch.distributed.fsdp import fully_shard

    if layers is None:
        if not hasattr(module, "transformer_layers"):
            raise TypeError(
                f"{type(module).__name__} does not say which layers to shard; pass layers="
            )
        layers = module.transformer_layers()
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return module
