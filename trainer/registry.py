"""Name -> implementation tables for models, objectives and data sources, and reading
a recipe against them.

Adding a family means adding one line here; the config's tagged unions and the
launcher pick it up from these tables. ``trainer.config`` is the schema alone and
imports no family: ``load_config`` lives here, where the families are known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configlib import ConfigError, apply_overrides, from_dict, recipe_chain
from data_pipeline import loader, synthetic, text_tokens
from models import audio_dit, audio_vae, dc_ae, dlm, flow_mlp, kl_vae, mmdit, video_dit, video_vae
from trainer import backends  # noqa: F401  (registers each backend's pass-through check)
from trainer.config import (
    Config,
    DataSection,
    ModelSection,
    ObjectiveSection,
    is_resolved_config,
    merge_layer,
)
from trainer.objectives import ar, autoencoding, bd3lm, ddpm, mdlm, rectified_flow, sedd


@dataclass(frozen=True)
class ModelFamily:
    config: type
    build: Callable[[Any], Any]  # config -> nn.Module (called under the meta device)
    parallelize: Callable[..., Any]  # (model, ParallelPlan, mesh) -> model


@dataclass(frozen=True)
class ObjectiveEntry:
    config: type
    build: Callable[..., Any]  # (config, seed=, rank=, device=) -> Objective


@dataclass(frozen=True)
class DataEntry:
    config: type
    build: Callable[
        ..., Any
    ]  # (config, seed=, rank=, world_size=, micro_batch=, accum_steps=) -> DataSource


MODELS: dict[str, ModelFamily] = {
    "flow_mlp": ModelFamily(flow_mlp.FlowMLPConfig, flow_mlp.build, flow_mlp.parallelize),
    "mmdit": ModelFamily(mmdit.MMDiTConfig, mmdit.build, mmdit.parallelize),
    "dlm": ModelFamily(dlm.DLMConfig, dlm.build, dlm.parallelize),
    "audio_dit": ModelFamily(audio_dit.AudioDiTConfig, audio_dit.build, audio_dit.parallelize),
    "video_dit": ModelFamily(video_dit.VideoDiTConfig, video_dit.build, video_dit.parallelize),
    # autoencoders trained as the model (objective: autoencoding)
    "kl_vae": ModelFamily(kl_vae.KLVAEConfig, kl_vae.build, kl_vae.parallelize),
    "dc_ae": ModelFamily(dc_ae.DCAEConfig, dc_ae.build, dc_ae.parallelize),
    "audio_vae": ModelFamily(audio_vae.AudioVAEConfig, audio_vae.build, audio_vae.parallelize),
    "video_vae": ModelFamily(video_vae.VideoVAEConfig, video_vae.build, video_vae.parallelize),
}
OBJECTIVES: dict[str, ObjectiveEntry] = {
    "rectified_flow": ObjectiveEntry(
        rectified_flow.RectifiedFlowConfig, rectified_flow.RectifiedFlow
    ),
    "ddpm": ObjectiveEntry(ddpm.DDPMConfig, ddpm.DDPM),
    # language models (token sequences; see trainer/objectives/text_eval.py)
    "mdlm": ObjectiveEntry(mdlm.MDLMConfig, mdlm.MDLM),
    "sedd": ObjectiveEntry(sedd.SEDDConfig, sedd.SEDD),
    "bd3lm": ObjectiveEntry(bd3lm.BD3LMConfig, bd3lm.BD3LM),
    "ar": ObjectiveEntry(ar.ARConfig, ar.AR),
    # autoencoder pretraining (trainer/objectives/autoencoding.py)
    "autoencoding": ObjectiveEntry(autoencoding.AutoencodingConfig, autoencoding.Autoencoding),
}
DATA: dict[str, DataEntry] = {
    "gaussian_mixture2d": DataEntry(
        synthetic.GaussianMixture2DConfig, synthetic.GaussianMixtureSource
    ),
    "webdataset": DataEntry(loader.WebDatasetConfig, loader.WebDatasetSource),
    "tokens": DataEntry(text_tokens.TokensConfig, text_tokens.TokenStreamSource),
}

ModelSection.REGISTRY.update({k: v.config for k, v in MODELS.items()})
ObjectiveSection.REGISTRY.update({k: v.config for k, v in OBJECTIVES.items()})
DataSection.REGISTRY.update({k: v.config for k, v in DATA.items()})


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a recipe (with its ``base:`` chain), apply overrides and validate strictly."""
    chain = [*recipe_chain(path), (None, apply_overrides({}, overrides))]
    data: dict = {}
    for _, layer in chain:
        data = merge_layer(data, layer)
    # A run's own config.yaml spells out every field, defaults included; none of them was
    # written on purpose, so relaunching it (to resume), or a recipe whose base: it is,
    # must not trip the "has no effect" checks. Only the layers above it count as written.
    resolved = [i for i, (file, _) in enumerate(chain) if file and is_resolved_config(file)]
    given = [layer for _, layer in chain[resolved[-1] + 1 if resolved else 0 :]]
    if resolved and chain[resolved[-1]][0] != Path(path) and not _writes(given, "run.output_dir"):
        # a recipe extending a run's config.yaml is a new run: inheriting the old run's
        # directory would resume the old checkpoints and overwrite its base file
        raise ConfigError(
            [
                f"run.output_dir: inherited from {chain[resolved[-1]][0]}, a run's resolved "
                "config; a recipe extending it is a new run: give it its own run.output_dir "
                "(to continue that run, launch its config.yaml itself, with overrides)"
            ],
            str(path),
        )
    return from_dict(Config, data, source=str(path), layers=given)


def _writes(layers: list[dict], dotted: str) -> bool:
    """Whether any of ``layers`` sets the key at ``dotted``."""
    for layer in layers:
        node: Any = layer
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return True
    return False


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate an already-merged mapping (used when a resolved config.yaml is re-read)."""
    # A dumped config lists every field; none of them counts as deliberately written,
    # so only type, range and cross-field checks apply.
    return from_dict(Config, data, source=source, layers=[{}])
