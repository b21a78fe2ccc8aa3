"""The autoencoders a latent-diffusion recipe or the precompute can name, built frozen.

``autoencoder: {name: identity}`` trains in pixel space (``channels: 1`` for mono audio samples); ``{name: kl_vae | dc_ae | audio_vae
| video_vae, path: FILE}`` loads a KL-VAE, a DC-AE, a 1-D audio VAE or a causal video VAE: FILE is a ``.safetensors`` written by ``python -m trainer.export``
from a run of that family (its metadata names the architecture, and, after
``python -m data_pipeline.latent_stats``, the latent scale/shift), or a local diffusers
``AutoencoderKL`` / ``AutoencoderDC`` directory. Architecture keys written in the recipe must agree with the
file's. Random weights only with ``random_init: true``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from configlib import ConfigError, from_dict, option
from models import audio_vae, dc_ae, kl_vae, video_vae
from models.audio_vae import AudioVAEConfig
from models.autoencoder import Autoencoder, IdentityAutoencoder, IdentityAutoencoderConfig
from models.dc_ae import DCAEConfig
from models.kl_vae import KLVAEConfig
from models.video_vae import VideoVAEConfig

SCALE_KEY, SHIFT_KEY = "latent_scale", "latent_shift"  # safetensors metadata


@dataclass(frozen=True)
class _Family:
    config: type  # the architecture's config dataclass
    model: type  # its Autoencoder
    load_diffusers: Callable[[Path], tuple[Any, dict]]  # directory -> (config, state dict)
    architecture: tuple[str, ...]  # keys that a recipe may repeat but not contradict


def _exported_only(name: str) -> Callable[[Path], tuple[Any, dict]]:
    """The loader of a family without a diffusers layout: a directory is a user mistake."""

    def load(path: Path) -> tuple[Any, dict]:
        raise ConfigError(
            [
                f"autoencoder.path: {path}: a {name} loads from a trainer.export .safetensors, not a diffusers folder"
            ]
        )

    return load


FAMILIES: dict[str, _Family] = {
    "kl_vae": _Family(
        KLVAEConfig, kl_vae.KLVAE, kl_vae.load_diffusers_checkpoint,
        ("channels", "layers_per_block", "latent_channels", "norm_groups", "quant_conv"),
    ),
    "dc_ae": _Family(
        DCAEConfig, dc_ae.DCAE, dc_ae.load_diffusers_checkpoint,
        ("channels", "encoder_layers", "decoder_layers", "blocks", "latent_channels",
         "head_dim", "qkv_kernels", "decoder_norms", "decoder_acts"),
    ),
    "audio_vae": _Family(
        AudioVAEConfig, audio_vae.AudioVAE, _exported_only("audio_vae"),
        ("channels", "strides", "latent_channels"),
    ),
    "video_vae": _Family(
        VideoVAEConfig, video_vae.VideoVAE, _exported_only("video_vae"),
        ("channels", "layers_per_block", "temporal_down", "latent_channels", "norm_groups"),
    ),
}  # fmt: skip


@dataclass(kw_only=True)
class AutoencoderSection:
    """Tagged union over autoencoders (filled below)."""

    REGISTRY: ClassVar[dict[str, type]] = {}
    name: str = option(
        doc="Autoencoder: 'identity' (pixel or sample space), 'kl_vae', 'dc_ae', 'audio_vae' "
        "(1-D) or 'video_vae' (causal spacetime)."
    )


@dataclass(kw_only=True)
class _Pretrained:
    """Where a trained autoencoder's weights come from (mixed into each family's config)."""

    path: str | None = option(
        None,
        "Weights: a .safetensors from trainer.export of a run of this family, or a local "
        "diffusers AutoencoderKL / AutoencoderDC directory.",
    )
    random_init: bool = option(False, "Random weights instead of path (tests and demos only).")
    seed: int = option(0, "Seed of random-init weights.")

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = super().check(given)  # the architecture's own checks
        if self.random_init == (self.path is not None):
            out.append(("path", "give exactly one of path and random_init: true"))
        if not self.random_init and "seed" in given:
            out.append(("seed", "has no effect unless random_init is true"))
        return out


@dataclass(kw_only=True)
class PretrainedKLVAEConfig(_Pretrained, KLVAEConfig):
    pass


@dataclass(kw_only=True)
class PretrainedDCAEConfig(_Pretrained, DCAEConfig):
    pass


@dataclass(kw_only=True)
class PretrainedAudioVAEConfig(_Pretrained, AudioVAEConfig):
    pass


@dataclass(kw_only=True)
class PretrainedVideoVAEConfig(_Pretrained, VideoVAEConfig):
    pass


AutoencoderSection.REGISTRY.update(
    {"identity": IdentityAutoencoderConfig, "kl_vae": PretrainedKLVAEConfig,
     "dc_ae": PretrainedDCAEConfig, "audio_vae": PretrainedAudioVAEConfig,
     "video_vae": PretrainedVideoVAEConfig}
)  # fmt: skip


def read_export(path: str | Path) -> tuple[dict, dict]:
    """(tensors, metadata) of an exported safetensors file."""
    from safetensors import safe_open

    tensors, meta = {}, {}
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        for key in f.keys():  # noqa: SIM118 - safe_open has no items()
            tensors[key] = f.get_tensor(key)
    return tensors, meta


def exported_family(meta: dict, path: Path) -> str:
    """The autoencoder family an exported file's metadata names."""
    if "model" not in meta:
        raise ValueError(
            f"autoencoder.path: {path} does not say which network it holds (export it "
            "with python -m trainer.export from the autoencoder's run directory)"
        )
    name = json.loads(meta["model"]).get("name")
    if name not in FAMILIES:
        raise ValueError(
            f"autoencoder.path: {path} holds a {name!r} model, not an autoencoder ({sorted(FAMILIES)})"
        )
    return name


def pretrained_config(path: str | Path) -> _Pretrained:
    """The recipe section for an exported autoencoder file, its family read from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder: {path} not found")
    name = exported_family(read_export(path)[1], path)
    return from_dict(AutoencoderSection.REGISTRY[name], {"path": str(path)})


def _merged(cfg: _Pretrained, stored, family: _Family, where: str):
    """The stored architecture, checked against what the recipe wrote explicitly."""
    clash = [
        f"{key}: recipe {getattr(cfg, key)!r}, {where} {stored.dims()[key]!r}"
        for key in family.architecture
        if getattr(cfg, key) is not None and getattr(cfg, key) != stored.dims()[key]
    ]
    if clash:
        raise ValueError(f"autoencoder.path {cfg.path}: another architecture; " + "; ".join(clash))
    return stored


def build_autoencoder(cfg) -> Autoencoder:
    """The frozen autoencoder ``cfg`` names, weights loaded, in eval mode."""
    if isinstance(cfg, IdentityAutoencoderConfig):
        return IdentityAutoencoder(cfg.scale, cfg.shift, cfg.channels).eval().requires_grad_(False)
    if not isinstance(cfg, _Pretrained) or cfg.name not in FAMILIES:
        raise ValueError(f"unknown autoencoder {getattr(cfg, 'name', cfg)!r}")
    family = FAMILIES[cfg.name]
    if cfg.random_init:
        model = family.model(cfg)
        model.init_weights(cfg.seed)
        return model.eval().requires_grad_(False)
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(f"autoencoder.path: {path} not found")
    scale, shift = cfg.scale, cfg.shift
    if path.is_dir():
        stored, state = family.load_diffusers(path)
    else:
        state, meta = read_export(path)
        held = exported_family(meta, path)
        if held != cfg.name:
            raise ValueError(f"autoencoder.path: {path} holds a {held} model, not a {cfg.name}")
        names = {f.name for f in fields(family.config)}
        data = {k: v for k, v in json.loads(meta["model"]).items() if k in names}
        stored = from_dict(family.config, data, source=str(path))
        scale = scale if scale is not None else _float(meta.get(SCALE_KEY))
        shift = shift if shift is not None else _float(meta.get(SHIFT_KEY))
    arch = _merged(cfg, stored, family, str(path))
    fixed = {f.name: getattr(arch, f.name) for f in fields(family.config)}
    fixed.update(
        scale=scale if scale is not None else arch.scale,
        shift=shift if shift is not None else arch.shift,
    )
    model = family.model(family.config(**fixed))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)
