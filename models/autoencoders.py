"""The autoencoders a latent-diffusion recipe or the precompute can name, built frozen.

``autoencoder: {name: identity}`` trains in pixel space; ``{name: kl_vae, path: FILE}``
loads a KL-VAE: FILE is a ``.safetensors`` written by ``python -m trainer.export`` from a
``kl_vae`` run (its metadata names the architecture, and, after
``python -m data_pipeline.latent_stats``, the latent scale/shift), or a local diffusers
``AutoencoderKL`` directory. Architecture keys written in the recipe must agree with the
file's. Random weights only with ``random_init: true``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from configlib import from_dict, option
from models.autoencoder import Autoencoder, IdentityAutoencoder, IdentityAutoencoderConfig
from models.kl_vae import KLVAE, KLVAEConfig, load_diffusers_checkpoint

ARCHITECTURE = ("channels", "layers_per_block", "latent_channels", "norm_groups", "quant_conv")
SCALE_KEY, SHIFT_KEY = "latent_scale", "latent_shift"  # safetensors metadata


@dataclass(kw_only=True)
class AutoencoderSection:
    """Tagged union over autoencoders (filled below)."""

    REGISTRY: ClassVar[dict[str, type]] = {}
    name: str = option(doc="Autoencoder: 'identity' (pixel space) or 'kl_vae'.")


@dataclass(kw_only=True)
class PretrainedKLVAEConfig(KLVAEConfig):
    path: str | None = option(
        None,
        "Weights: a .safetensors from trainer.export of a kl_vae run, or a local diffusers "
        "AutoencoderKL directory.",
    )
    random_init: bool = option(False, "Random weights instead of path (tests and demos only).")
    seed: int = option(0, "Seed of random-init weights.")

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = super().check(given)
        if self.random_init == (self.path is not None):
            out.append(("path", "give exactly one of path and random_init: true"))
        if not self.random_init and "seed" in given:
            out.append(("seed", "has no effect unless random_init is true"))
        return out


AutoencoderSection.REGISTRY.update(
    {"identity": IdentityAutoencoderConfig, "kl_vae": PretrainedKLVAEConfig}
)


def read_export(path: str | Path) -> tuple[dict, dict]:
    """(tensors, metadata) of an exported safetensors file."""
    from safetensors import safe_open

    tensors, meta = {}, {}
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        for key in f.keys():  # noqa: SIM118 - safe_open has no items()
            tensors[key] = f.get_tensor(key)
    return tensors, meta


def _merged(cfg: PretrainedKLVAEConfig, stored: KLVAEConfig, where: str) -> KLVAEConfig:
    """The stored architecture, checked against what the recipe wrote explicitly."""
    clash = [
        f"{key}: recipe {getattr(cfg, key)!r}, {where} {stored.dims()[key]!r}"
        for key in ARCHITECTURE
        if getattr(cfg, key) is not None and getattr(cfg, key) != stored.dims()[key]
    ]
    if clash:
        raise ValueError(f"autoencoder.path {cfg.path}: another architecture; " + "; ".join(clash))
    return stored


def build_autoencoder(cfg) -> Autoencoder:
    """The frozen autoencoder ``cfg`` names, weights loaded, in eval mode."""
    if isinstance(cfg, IdentityAutoencoderConfig):
        return IdentityAutoencoder(cfg.scale, cfg.shift).eval().requires_grad_(False)
    if not isinstance(cfg, PretrainedKLVAEConfig):
        raise ValueError(f"unknown autoencoder {getattr(cfg, 'name', cfg)!r}")
    if cfg.random_init:
        model = KLVAE(cfg)
        model.init_weights(cfg.seed)
        return model.eval().requires_grad_(False)
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(f"autoencoder.path: {path} not found")
    scale, shift = cfg.scale, cfg.shift
    if path.is_dir():
        stored, state = load_diffusers_checkpoint(path)
    else:
        state, meta = read_export(path)
        if "model" not in meta:
            raise ValueError(
                f"autoencoder.path: {path} does not say which network it holds (export it "
                "with python -m trainer.export from the kl_vae run directory)"
            )
        names = {f.name for f in fields(KLVAEConfig)}
        data = {k: v for k, v in json.loads(meta["model"]).items() if k in names}
        stored = from_dict(KLVAEConfig, data, source=str(path))
        scale = scale if scale is not None else _float(meta.get(SCALE_KEY))
        shift = shift if shift is not None else _float(meta.get(SHIFT_KEY))
    arch = _merged(cfg, stored, str(path))
    fixed = {f.name: getattr(arch, f.name) for f in fields(KLVAEConfig)}
    fixed.update(
        scale=scale if scale is not None else arch.scale,
        shift=shift if shift is not None else arch.shift,
    )
    model = KLVAE(KLVAEConfig(**fixed))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)
