"""Every recipe shipped under recipes/ loads and validates strictly."""

from pathlib import Path

import pytest

from trainer.config import Config, check_world_size
from trainer.registry import load_config

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
# recipes/precompute/ holds encoder specs for data_pipeline.precompute (validated by its tests)
RECIPES = sorted(
    p for p in RECIPES_DIR.rglob("*.yaml") if "precompute" not in p.relative_to(RECIPES_DIR).parts
)


def test_recipes_are_found():
    """The glob finds recipes, including those in subfolders (so the test below is not empty)."""
    assert RECIPES
    assert any(path.parent != RECIPES_DIR for path in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_recipe_loads_and_validates(path):
    """The recipe (with its base chain) passes every check, and its global batch splits
    over the data-parallel ranks of the local ranks it asks for (a context-parallel group
    shares its samples)."""
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    micro, accum = check_world_size(cfg, cfg.cluster.num_workers)
    data_parallel = cfg.cluster.num_workers // cfg.parallel.context_parallel
    assert micro * accum * data_parallel == cfg.train.batch_size


STAGED = [p for p in RECIPES if load_config(p).train.trainable is not None]


def test_staged_recipes_are_found():
    names = {str(p.relative_to(RECIPES_DIR)) for p in STAGED}
    assert {"dcae_adapt.yaml", "dcae_refine.yaml", "tiny/dcae_refine.yaml"} <= names


@pytest.mark.parametrize("path", STAGED, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_trainable_patterns_name_parameters_of_the_recipes_model(path):
    """Every train.trainable pattern matches parameters of the recipe's own model (built on
    the meta device, so the reference sizes cost nothing), and some stay frozen."""
    import torch

    from trainer.registry import MODELS
    from trainer.warm_start import apply_trainable

    cfg = load_config(path)
    with torch.device("meta"):
        model = MODELS[cfg.model.name].build(cfg.model)
    frozen = apply_trainable(model, cfg.train.trainable)
    assert 0 < len(frozen) < len(list(model.parameters()))
