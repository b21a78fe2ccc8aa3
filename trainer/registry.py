"""Name -> implementation tables for models, objectives and data sources.

Adding a family means adding one line here; the config's tagged unions and the
launcher pick it up from these tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data_pipeline import loader, synthetic, text_tokens
from models import dlm, flow_mlp, mmdit
from trainer.config import DataSection, ModelSection, ObjectiveSection
from trainer.objectives import ar, bd3lm, ddpm, mdlm, rectified_flow, sedd


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
