"""Recipe loading, inheritance, overrides, strict validation and the launcher's error path."""

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configlib import apply_overrides, load_yaml_with_bases
from data_pipeline.synthetic import GaussianMixture2DConfig
from models.flow_mlp import FlowMLPConfig
from trainer.config import Config, ConfigError, check_world_size, dump_config
from trainer.objectives.rectified_flow import RectifiedFlowConfig
from trainer.registry import config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]

# The smallest valid recipe: every required value, every optional section left out.
VALID = {
    "run": {"output_dir": "runs/test", "max_steps": 100},
    "model": {"name": "flow_mlp", "size": "tiny"},
    "objective": {"name": "rectified_flow"},
    "data": {"name": "gaussian_mixture2d"},
    "train": {"batch_size": 32},
}


def merged(base, patch):
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def recipe(tmp_path, patch=None, drop=(), name="recipe.yaml"):
    """VALID with ``patch`` deep-merged in and the dotted keys in ``drop`` removed."""
    data = merged(VALID, patch or {})
    for dotted in drop:
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        del node[last]
    return write(tmp_path / name, data)


def problems_of(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def paths_of(problems):
    return [p.split(":", 1)[0] for p in problems]


# ------------------------------------------------------------------------------ loading


def test_recipe_loads_into_config(tmp_path):
    """A recipe becomes typed dataclasses; tagged unions pick the family's config class."""
    cfg = load_config(recipe(tmp_path))
    assert isinstance(cfg, Config)
    assert cfg.run.output_dir == "runs/test"
    assert cfg.run.max_steps == 100
    assert cfg.train.batch_size == 32
    assert isinstance(cfg.model, FlowMLPConfig) and cfg.model.size == "tiny"
    assert isinstance(cfg.objective, RectifiedFlowConfig)
    assert isinstance(cfg.data, GaussianMixture2DConfig)
    assert cfg.optimizer.lr == 1e-4  # sections left out get their defaults
    assert cfg.optimizer.betas == (0.9, 0.999)


def test_base_inheritance_deep_merges_relative_to_the_file(tmp_path, monkeypatch):
    """``base:`` is resolved next to the child file (not the cwd); the merge is deep, the
    child wins, and lists are replaced rather than merged."""
    write(
        tmp_path / "common" / "base.yaml",
        merged(
            VALID,
            {
                "optimizer": {"lr": 0.01, "weight_decay": 0.1, "betas": [0.8, 0.9]},
                "ema": {"enabled": True, "decay": 0.9},
            },
        ),
    )
    child = write(
        tmp_path / "experiments" / "child.yaml",
        {
            "base": "../common/base.yaml",
            "run": {"max_steps": 50},
            "optimizer": {"lr": 0.02, "betas": [0.5, 0.6]},
        },
    )
    monkeypatch.chdir(write(tmp_path / "elsewhere" / "x", "").parent)
    cfg = load_config(child)
    assert cfg.optimizer.lr == 0.02  # child wins
    assert cfg.optimizer.weight_decay == 0.1  # sibling key kept from the base
    assert cfg.optimizer.betas == (0.5, 0.6)  # list replaced
    assert cfg.run.max_steps == 50 and cfg.run.output_dir == "runs/test"
    assert cfg.ema.enabled is True and cfg.ema.decay == 0.9


def test_base_chain_of_three_files(tmp_path):
    """A base may itself have a base; the nearest file wins."""
    write(tmp_path / "a.yaml", merged(VALID, {"run": {"seed": 1}, "train": {"log_every": 3}}))
    write(tmp_path / "b.yaml", {"base": "a.yaml", "run": {"seed": 2}})
    c = write(tmp_path / "sub" / "c.yaml", {"base": "../b.yaml", "train": {"batch_size": 16}})
    cfg = load_config(c)
    assert (cfg.run.seed, cfg.train.log_every, cfg.train.batch_size) == (2, 3, 16)


def test_lists_are_replaced_not_merged(tmp_path):
    """A child list replaces the base list whole, even when it is shorter."""
    write(tmp_path / "base.yaml", {"x": {"items": [1, 2, 3], "keep": True}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "x": {"items": [9]}})
    assert load_yaml_with_bases(child) == {"x": {"items": [9], "keep": True}}


def test_base_cycle_is_reported(tmp_path):
    """Two recipes naming each other as base give a ConfigError that shows the cycle."""
    a = write(tmp_path / "a.yaml", {"base": "b.yaml", **VALID})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    (problem,) = problems_of(a)
    assert "cycle" in problem
    assert "a.yaml" in problem and "b.yaml" in problem


def test_recipe_that_extends_itself_is_a_cycle(tmp_path):
    """A recipe naming itself as base is reported, not recursed into."""
    a = write(tmp_path / "a.yaml", {"base": "a.yaml", **VALID})
    (problem,) = problems_of(a)
    assert "cycle" in problem


def test_missing_recipe_file(tmp_path):
    """A recipe path that does not exist is a ConfigError naming the path."""
    missing = tmp_path / "nope.yaml"
    (problem,) = problems_of(missing)
    assert str(missing) in problem


def test_missing_base_file(tmp_path):
    """A ``base:`` that does not exist is a ConfigError naming it."""
    child = write(tmp_path / "child.yaml", {"base": "gone.yaml", **VALID})
    (problem,) = problems_of(child)
    assert "gone.yaml" in problem


@pytest.mark.parametrize(
    "text, fragment",
    [("run: [unclosed", "not valid YAML"), ("- a\n- b\n", "mapping"), ("base: 3\n", "base:")],
)
def test_unreadable_recipe(tmp_path, text, fragment):
    """Broken YAML, a non-mapping top level or a non-path base are ConfigErrors."""
    (problem,) = problems_of(write(tmp_path / "r.yaml", text))
    assert fragment in problem


# ---------------------------------------------------------------------------- overrides


def test_overrides_set_nested_values_with_yaml_types(tmp_path):
    """``dotted.key=value`` reaches nested and tagged-union fields; values are typed as YAML."""
    cfg = load_config(
        recipe(tmp_path),
        [
            "run.seed=7",
            "optimizer.lr=1e-3",
            "optimizer.weight_decay=0.05",
            "optimizer.betas=[0.8, 0.95]",
            "optimizer.fused=false",
            "train.grad_clip=null",
            "ema.enabled=true",
            "ema.decay=0.5",
            "model.hidden_dim=64",
            "data.num_modes=4",
        ],
    )
    assert cfg.run.seed == 7 and type(cfg.run.seed) is int
    assert cfg.optimizer.lr == 1e-3 and type(cfg.optimizer.lr) is float
    assert cfg.optimizer.weight_decay == 0.05
    assert cfg.optimizer.betas == (0.8, 0.95)
    assert cfg.optimizer.fused is False
    assert cfg.train.grad_clip is None
    assert cfg.ema.enabled is True and cfg.ema.decay == 0.5
    assert cfg.model.hidden_dim == 64
    assert cfg.data.num_modes == 4


def test_overrides_win_over_the_base_chain(tmp_path):
    """Overrides apply after the base merge, on top of both files."""
    write(tmp_path / "base.yaml", merged(VALID, {"run": {"seed": 1}}))
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "run": {"seed": 2}})
    assert load_config(child, ["run.seed=3"]).run.seed == 3


def test_apply_overrides_parses_scalars_and_leaves_input_alone():
    """Values are parsed as YAML scalars; the input mapping is not mutated."""
    data = {"a": {"keep": 1}}
    out = apply_overrides(data, ["a.b=3", "a.c=1.5", "a.d=true", "a.e=null", "a.f=text", "g.h=2"])
    assert out == {
        "a": {"keep": 1, "b": 3, "c": 1.5, "d": True, "e": None, "f": "text"},
        "g": {"h": 2},
    }
    assert data == {"a": {"keep": 1}}


@pytest.mark.parametrize("item", ["foo", "=3", "a..b=1", ".a=1", "a.=1"])
def test_malformed_override(tmp_path, item):
    """An override that is not ``dotted.key=value`` is a ConfigError quoting it."""
    (problem,) = problems_of(recipe(tmp_path), [item])
    assert repr(item) in problem


def test_malformed_overrides_reported_together(tmp_path):
    """Every bad override is listed in one error."""
    problems = problems_of(recipe(tmp_path), ["foo", "run.seed=1", "=3"])
    assert len(problems) == 2


def test_override_into_a_scalar(tmp_path):
    """Setting a key below a scalar value is a ConfigError naming the scalar's path."""
    (problem,) = problems_of(recipe(tmp_path, {"run": {"seed": 0}}), ["run.seed.x=1"])
    assert problem.startswith("run.seed:")


def test_override_value_is_type_checked(tmp_path):
    """An override value of the wrong type is reported at its key path."""
    assert paths_of(problems_of(recipe(tmp_path), ["train.batch_size=abc"])) == ["train.batch_size"]


# --------------------------------------------------------------------------- validation

# (patch, dotted keys to drop, key path of the single expected problem, message fragment)
SINGLE_MISTAKES = {
    "unknown key": ({"optimizer": {"lrr": 1e-3}}, (), "optimizer.lrr", "did you mean 'lr'"),
    "unknown section": ({"optimzer": {}}, (), "optimzer", "did you mean 'optimizer'"),
    "str for int": ({"train": {"batch_size": "abc"}}, (), "train.batch_size", "integer"),
    "bool for int": ({"train": {"batch_size": True}}, (), "train.batch_size", "integer"),
    "bool for float": ({"optimizer": {"lr": True}}, (), "optimizer.lr", "number"),
    "str for bool": ({"ema": {"enabled": "maybe"}}, (), "ema.enabled", "true or false"),
    "missing value": ({}, ("run.max_steps",), "run.max_steps", "missing required value"),
    "missing union name": ({}, ("model.name",), "model.name", "missing required value"),
    "backend not in set": (
        {"parallel": {"backend": "megatron"}},
        (),
        "parallel.backend",
        "not allowed",
    ),
    "schedule not in set": ({"schedule": {"name": "foo"}}, (), "schedule.name", "not allowed"),
    "size not in set": ({"model": {"size": "huge"}}, (), "model.size", "not allowed"),
    "lr out of range": ({"optimizer": {"lr": -1}}, (), "optimizer.lr", "out of range"),
    "decay out of range": (
        {"ema": {"enabled": True, "decay": 1.5}},
        (),
        "ema.decay",
        "out of range",
    ),
    "beta out of range": ({"optimizer": {"betas": [0.9, 1.0]}}, (), "optimizer.betas[1]", "range"),
    "unknown model": (
        {"model": {"name": "flow_mlpp"}},
        (),
        "model.name",
        "did you mean 'flow_mlp'",
    ),
    "unknown data": (
        {"data": {"name": "gausian_mixture2d"}},
        (),
        "data.name",
        "gaussian_mixture2d",
    ),
    "min_lr_ratio unused": (
        {"schedule": {"min_lr_ratio": 0.1}},
        (),
        "schedule.min_lr_ratio",
        "no effect",
    ),
    "ema.decay unused": ({"ema": {"enabled": False, "decay": 0.9}}, (), "ema.decay", "no effect"),
    "logit_std unused": (
        {"objective": {"timestep_sampling": "uniform", "logit_std": 2.0}},
        (),
        "objective.logit_std",
        "no effect",
    ),
    "wandb_project unused": (
        {"logging": {"wandb": False, "wandb_project": "x"}},
        (),
        "logging.wandb_project",
        "no effect",
    ),
    "num_samples unused": (
        {"eval": {"every": 0, "num_samples": 10}},
        (),
        "eval.num_samples",
        "no effect",
    ),
    "use_ema unused": ({"eval": {"every": 10, "use_ema": True}}, (), "eval.use_ema", "no effect"),
    "micro batch": (
        {"train": {"micro_batch_size": 5}},
        (),
        "train.micro_batch_size",
        "does not divide",
    ),
    "warmup": (
        {"schedule": {"warmup_steps": 101}},
        (),
        "schedule.warmup_steps",
        "exceeds run.max_steps",
    ),
}


@pytest.mark.parametrize(
    "patch, drop, key, fragment", SINGLE_MISTAKES.values(), ids=list(SINGLE_MISTAKES)
)
def test_single_mistake_is_reported_at_its_key_path(tmp_path, patch, drop, key, fragment):
    """One mistake gives exactly one problem, prefixed by its key path, saying what is wrong."""
    (problem,) = problems_of(recipe(tmp_path, patch, drop))
    assert problem.startswith(f"{key}: ")
    assert fragment in problem


# The same keys are fine when the options they depend on are chosen.
ACCEPTED = {
    "min_lr_ratio with cosine": {"schedule": {"name": "cosine", "min_lr_ratio": 0.1}},
    "decay with ema": {"ema": {"enabled": True, "decay": 0.9}},
    "logit_std with logit_normal": {
        "objective": {"timestep_sampling": "logit_normal", "logit_std": 2.0}
    },
    "wandb_project with wandb": {"logging": {"wandb": True, "wandb_project": "x"}},
    "num_samples with eval": {"eval": {"every": 10, "num_samples": 10}},
    "dividing micro batch": {"train": {"micro_batch_size": 8}},
    "warmup == max_steps": {"schedule": {"warmup_steps": 100}},
}


@pytest.mark.parametrize("patch", ACCEPTED.values(), ids=list(ACCEPTED))
def test_key_is_accepted_when_it_has_an_effect(tmp_path, patch):
    """The no-effect and cross-field rules only fire under the options that make them true."""
    assert isinstance(load_config(recipe(tmp_path, patch)), Config)


def many_mistakes(output_dir):
    """A recipe with one instance of each class of field-level mistake, and its key paths."""
    data = {
        "run": {"output_dir": str(output_dir)},  # max_steps missing
        "model": {"name": "flow_mlp", "size": "huge"},
        "objective": {"name": "rectified_flow", "timestep_sampling": "uniform", "logit_std": 2.0},
        "data": {"name": "gausian_mixture2d"},
        "train": {"batch_size": "abc", "log_every": True},
        "optimizer": {"lrr": 0.1, "lr": -1},
        "schedule": {"name": "foo"},
        "parallel": {"backend": "megatron"},
        "ema": {"enabled": True, "decay": 1.5},
        "logging": {"wandb_project": "x"},
        "eval": {"num_samples": 10},
    }
    keys = [
        "run.max_steps",
        "model.size",
        "objective.logit_std",
        "data.name",
        "train.batch_size",
        "train.log_every",
        "optimizer.lrr",
        "optimizer.lr",
        "schedule.name",
        "parallel.backend",
        "ema.decay",
        "logging.wandb_project",
        "eval.num_samples",
    ]
    return data, keys


def test_all_problems_reported_together(tmp_path):
    """Unknown keys, wrong types, missing values, bad choices, ranges, union names and
    no-effect keys all come back in one ConfigError, one problem per mistake."""
    data, keys = many_mistakes(tmp_path / "run")
    problems = problems_of(write(tmp_path / "bad.yaml", data))
    assert sorted(paths_of(problems)) == sorted(keys)
    text = "\n".join(problems)
    assert "did you mean 'lr'" in text and "did you mean 'gaussian_mixture2d'" in text


def test_cross_field_problems_reported_with_field_problems(tmp_path):
    """Cross-field checks run, and are listed alongside field problems of other sections."""
    path = recipe(
        tmp_path,
        {
            "train": {"micro_batch_size": 5},
            "schedule": {"warmup_steps": 500},
            "optimizer": {"lrr": 0.1},
            "parallel": {"backend": "megatron"},
        },
    )
    assert sorted(paths_of(problems_of(path))) == [
        "optimizer.lrr",
        "parallel.backend",
        "schedule.warmup_steps",
        "train.micro_batch_size",
    ]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="known limitation: when a required section (here model) cannot be built, the "
    "root cross-field checks cannot run, so the micro-batch problem shows on the next try",
)
def test_cross_field_problems_survive_a_broken_section(tmp_path):
    """A bad union name in one section does not hide cross-field problems elsewhere."""
    path = recipe(tmp_path, {"model": {"name": "flow_mlpp"}, "train": {"micro_batch_size": 5}})
    assert sorted(paths_of(problems_of(path))) == ["model.name", "train.micro_batch_size"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["run.max_steps=null"], "run.max_steps"),
        (["schedule.warmup_steps=null"], "schedule.warmup_steps"),
        (["optimizer.betas=null"], "optimizer.betas"),
        (["train.batch_size=null", "train.micro_batch_size=4"], "train.batch_size"),
    ],
)
def test_null_for_a_required_value_is_a_config_error(tmp_path, overrides, key):
    """``null`` where a value is required is a user mistake at its key path, not a crash."""
    assert paths_of(problems_of(recipe(tmp_path), overrides)) == [key]


@pytest.mark.parametrize("section, key", [("train", "train.batch_size"), ("run", "run.max_steps")])
def test_missing_section_is_a_config_error(tmp_path, section, key):
    """Leaving out a section with required values reports those values, not a crash."""
    assert key in paths_of(problems_of(recipe(tmp_path, drop=(section,))))


def test_invalid_choice_adds_no_spurious_problems(tmp_path):
    """A misspelt schedule name is one problem, not also a complaint about the default."""
    path = recipe(tmp_path, {"schedule": {"name": "cosin", "min_lr_ratio": 0.1}})
    assert paths_of(problems_of(path)) == ["schedule.name"]


def test_override_that_disables_an_option_silences_its_recipe_keys(tmp_path):
    """Turning EMA or evaluation off from a later layer (command line) is allowed even
    though the recipe sets keys that then have no effect."""
    path = recipe(
        tmp_path, {"ema": {"enabled": True, "decay": 0.9}, "eval": {"every": 10, "num_samples": 5}}
    )
    cfg = load_config(path, ["ema.enabled=false", "eval.every=0"])
    assert cfg.ema.enabled is False and cfg.eval.every == 0


def test_no_effect_key_in_the_same_layer_as_its_switch_is_reported(tmp_path):
    """A key given on the command line next to the override that disables it is an error."""
    path = recipe(tmp_path, {"eval": {"every": 10}})
    problems = problems_of(path, ["eval.every=0", "eval.num_samples=5"])
    assert paths_of(problems) == ["eval.num_samples"]


# --------------------------------------------------------------------------- world size


@pytest.mark.parametrize(
    "batch, micro, world, expected",
    [(64, None, 1, (64, 1)), (64, None, 2, (32, 1)), (64, 8, 2, (8, 4)), (64, 16, 4, (16, 1))],
)
def test_check_world_size_splits_the_batch(tmp_path, batch, micro, world, expected):
    """Returns (micro batch per rank, accumulation steps) for a world size."""
    cfg = load_config(recipe(tmp_path, {"train": {"batch_size": batch, "micro_batch_size": micro}}))
    assert check_world_size(cfg, world) == expected


@pytest.mark.parametrize(
    "batch, micro, world, key",
    [
        (64, None, 3, "train.batch_size"),
        (64, 16, 8, "train.micro_batch_size"),  # per-rank batch 8 < micro 16
        (48, 16, 2, "train.micro_batch_size"),  # 16 divides 48 but not the per-rank 24
    ],
)
def test_check_world_size_rejects_uneven_splits(tmp_path, batch, micro, world, key):
    """A global batch that does not split over the ranks is a ConfigError at its key."""
    cfg = load_config(recipe(tmp_path, {"train": {"batch_size": batch, "micro_batch_size": micro}}))
    with pytest.raises(ConfigError) as info:
        check_world_size(cfg, world)
    assert paths_of(info.value.problems) == [key]


# ---------------------------------------------------------------------------- round trip


def test_dump_config_round_trips_with_every_option_active(tmp_path):
    """dump_config -> YAML -> config_from_dict gives an equal Config (tuples, unions, nulls)."""
    cfg = load_config(
        recipe(
            tmp_path,
            {
                "model": {"hidden_dim": 64},
                "objective": {"timestep_sampling": "logit_normal", "logit_std": 0.5},
                "optimizer": {"lr": 1e-3, "betas": [0.8, 0.95]},
                "schedule": {"name": "cosine", "min_lr_ratio": 0.1, "warmup_steps": 10},
                "ema": {"enabled": True, "decay": 0.99},
                "logging": {"wandb": True},
                "eval": {"every": 50},
            },
        )
    )
    text = dump_config(cfg)
    assert list(yaml.safe_load(text)) == [
        "run",
        "model",
        "objective",
        "data",
        "train",
        "optimizer",
        "schedule",
        "ema",
        "checkpoint",
        "parallel",
        "cluster",
        "logging",
        "eval",
        "init",
    ]
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_dump_config_round_trips_with_default_options(tmp_path):
    """A dumped config with options left at their defaults re-reads to an equal Config."""
    cfg = load_config(recipe(tmp_path))
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_run_config_yaml_relaunches_despite_inert_defaults(tmp_path):
    """A run's config.yaml lists every field, so with a constant schedule it holds
    ``schedule.min_lr_ratio`` and with EMA off ``ema.decay``. Relaunching it (to resume)
    loads to the same Config; only its command-line overrides count as written."""
    cfg = load_config(recipe(tmp_path, {"schedule": {"name": "constant"}}))
    assert cfg.ema.enabled is False
    dumped = tmp_path / "run" / "config.yaml"
    dumped.parent.mkdir()
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg
    assert load_config(dumped, ["run.max_steps=7"]).run.max_steps == 7
    # an override that has no effect is still reported
    assert paths_of(problems_of(dumped, ["schedule.min_lr_ratio=0.5"])) == ["schedule.min_lr_ratio"]
    # the same mapping without the trainer's header is a hand-written recipe: the inert
    # keys are errors, as they would be for a user
    body = dump_config(cfg).split("\n", 2)[2]
    assert body.startswith("run:")
    plain = write(tmp_path / "plain.yaml", yaml.safe_load(body))
    assert {"schedule.min_lr_ratio", "ema.decay"} <= set(paths_of(problems_of(plain)))


def test_recipe_extending_a_run_config_yaml_counts_only_its_own_keys(tmp_path):
    """``base: RUN/config.yaml`` (a new run that starts from an old run's settings): the
    dumped defaults are not written on purpose, the child recipe's keys are."""
    cfg = load_config(recipe(tmp_path, {"schedule": {"name": "constant"}}))
    dumped = tmp_path / "run" / "config.yaml"
    dumped.parent.mkdir()
    dumped.write_text(dump_config(cfg))
    new_run = {"output_dir": str(tmp_path / "run2"), "max_steps": 9}
    child = write(tmp_path / "child.yaml", {"base": "run/config.yaml", "run": new_run})
    assert load_config(child) == dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, **new_run)
    )
    # an inert key the child writes is still an error, as is one from the command line
    inert = write(
        tmp_path / "inert.yaml",
        {"base": "run/config.yaml", "run": new_run, "schedule": {"min_lr_ratio": 0.5}},
    )
    assert paths_of(problems_of(inert)) == ["schedule.min_lr_ratio"]
    assert paths_of(problems_of(child, ["ema.decay=0.9"])) == ["ema.decay"]
    # the old run's directory is not inherited: the new run would resume the old one's
    # checkpoints and overwrite the config.yaml it extends
    same_dir = write(tmp_path / "same.yaml", {"base": "run/config.yaml", "run": {"max_steps": 9}})
    assert paths_of(problems_of(same_dir)) == ["run.output_dir"]
    assert load_config(same_dir, [f"run.output_dir={tmp_path / 'run3'}"]).run.max_steps == 9
    # a dumped file whose fields are what a hand-edit gave it a base: for: the layers below
    # it do not count as written either
    edited = tmp_path / "edited" / "config.yaml"
    edited.parent.mkdir()
    cosine = write(tmp_path / "cosine.yaml", {"schedule": {"name": "cosine", "min_lr_ratio": 0.1}})
    edited.write_text(
        dump_config(cfg) + yaml.safe_dump({"base": str(cosine)})  # constant schedule wins
    )
    over_edited = write(tmp_path / "over.yaml", {"base": str(edited), "run": new_run})
    assert load_config(over_edited).schedule.name == "constant"


# ---------------------------------------------------------------------------------- CLI


def test_launcher_reports_bad_recipe_without_traceback(tmp_path):
    """``python -m trainer.launch`` on a recipe with many mistakes exits 2 with one
    ``error:`` report naming every key path, no traceback, and no run directory."""
    run_dir = tmp_path / "run"
    data, keys = many_mistakes(run_dir)
    bad = write(tmp_path / "bad.yaml", data)
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.launch", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr
    assert "Traceback" not in proc.stderr
    for key in keys:
        assert f"{key}:" in proc.stderr
    assert not run_dir.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


@pytest.mark.parametrize(
    ("recipe_name", "overrides", "expected"),
    [
        (
            "mdlm",
            ["data.urls={missing}", "objective.tokenizer={missing}.model"],
            [
                "data.urls: no such file or folder: {missing}",
                "objective.tokenizer: {missing}.model does not exist",
            ],
        ),
        ("digits_flow", ["data.urls={missing}"], ["data.urls: no such file or folder: {missing}"]),
        (
            "mdlm",
            ["data.urls={empty}/shard-{{000000..000001}}.tar", "data.tokenizer={empty}"],
            [
                "data.urls: shard {empty}/shard-000000.tar does not exist",
                "data.tokenizer: {empty} is a folder, not a .model file",
            ],
        ),
        ("mdlm", ["data.urls={empty}"], ["data.urls: no .tar shards under {empty}"]),
    ],
)
def test_launcher_reports_missing_inputs_before_starting_ranks(
    tmp_path, recipe_name, overrides, expected
):
    """Missing shards or tokenizer models are reported once by the launcher, before it
    starts 2 ranks: exit 2, one ``error:`` report naming the keys, no traceback, no run
    directory (no rank ever ran)."""
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    paths["empty"].mkdir()
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.launch",
            str(REPO / "recipes" / "tiny" / f"{recipe_name}.yaml"),
            *(o.format(**paths) for o in overrides),
            f"run.output_dir={run_dir}",
            "cluster.num_workers=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error:") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "launch: rank" not in proc.stderr, proc.stderr
    for text in expected:
        assert f"  - {text.format(**paths)}" in proc.stderr, proc.stderr
    assert not run_dir.exists()


def test_input_check_reports_a_refusing_endpoint_and_leaves_http_to_the_ranks(
    tmp_path, monkeypatch
):
    """An S3 endpoint that refuses connections is the user's to fix (named with its key);
    an HTTP tokenizer's store cannot tell missing from failing, so the ranks try it. A
    missing local file is reported as before."""
    from trainer.preflight import check_inputs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    cfg = load_config(
        REPO / "recipes" / "tiny" / "mdlm.yaml",
        [
            "data.urls=s3://nobody/shards",
            "data.tokenizer=http://127.0.0.1:9/arith.model",
            f"objective.tokenizer={tmp_path}/nope.model",
        ],
    )
    assert check_inputs(cfg) == [
        "data.urls: s3://nobody/shards: cannot reach http://127.0.0.1:9: check "
        "AWS_ENDPOINT_URL and the network",
        f"objective.tokenizer: {tmp_path}/nope.model does not exist",
    ]
    s3fs.S3FileSystem.clear_instance_cache()


def test_missing_inputs_are_warnings_under_ray(tmp_path, monkeypatch, capsys):
    """A Ray job's driver may run on a node without the workers' node-local data, so there
    the check warns and the launch goes on to Ray (whose workers then report)."""
    import cluster.ray_train
    from trainer import launch

    started = []
    monkeypatch.setattr(cluster.ray_train, "run_ray", lambda cfg, fresh: started.append(cfg) or 0)
    recipe_path = str(REPO / "recipes" / "tiny" / "mdlm.yaml")
    args = [recipe_path, f"data.urls={tmp_path}/nope", f"run.output_dir={tmp_path}/run"]
    assert launch.main([*args, "cluster.launcher=ray"]) == 0
    assert len(started) == 1
    err = capsys.readouterr().err
    assert f"warning: data.urls: no such file or folder: {tmp_path}/nope" in err
    assert "error:" not in err
    assert launch.main([*args, "cluster.launcher=local"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and f"  - data.urls: no such file or folder: {tmp_path}/nope" in err
    assert "warning:" not in err and len(started) == 1


def test_input_check_looks_up_autoencoder_and_perceptual_weights(tmp_path):
    """A latent recipe's autoencoder file and a VAE recipe's perceptual network are
    inputs like the encoders: missing ones are named with their key before ranks start."""
    from trainer.preflight import check_inputs

    vae = load_config(
        REPO / "recipes" / "tiny" / "vae.yaml",
        [f"run.output_dir={tmp_path}/run", f"objective.perceptual={tmp_path}/vgg.pt"],
    )
    problems = check_inputs(vae)
    assert f"objective.perceptual: {tmp_path}/vgg.pt does not exist" in problems
    latent = load_config(
        REPO / "recipes" / "tiny" / "sd3_like.yaml",
        [
            f"run.output_dir={tmp_path}/run2",
            f"objective.autoencoder={{name: kl_vae, path: {tmp_path}/vae.safetensors}}",
        ],
    )
    assert f"objective.autoencoder.path: {tmp_path}/vae.safetensors does not exist" in (
        check_inputs(latent)
    )


def test_dc_ae_recipe_rejects_a_kl_weight(tmp_path):
    """A DC-AE is deterministic: a KL weight written for it would silently do nothing."""
    from configlib import ConfigError

    recipe = REPO / "recipes" / "tiny" / "dcae.yaml"
    cfg = load_config(recipe, [f"run.output_dir={tmp_path}"])
    assert cfg.model.name == "dc_ae" and cfg.model.dims()["latent_channels"] == 4
    with pytest.raises(ConfigError, match="objective.kl_weight: has no effect: a DC-AE"):
        load_config(recipe, [f"run.output_dir={tmp_path}", "objective.kl_weight=1e-6"])
    # the same key is fine for the KL-VAE
    load_config(
        REPO / "recipes" / "tiny" / "vae.yaml",
        [f"run.output_dir={tmp_path}", "objective.kl_weight=1e-6"],
    )


def test_naming_another_autoencoder_replaces_that_section_only(tmp_path):
    """The objective's autoencoder is a tagged union too: a child recipe naming another
    one does not inherit the base's keys for the old one (identity's channels, scale),
    while the rest of the objective (its conditioning) is kept."""
    child = tmp_path / "child.yaml"
    child.write_text(
        f"base: {Path('recipes/tiny/audio_dit.yaml').resolve()}\n"
        "model: {in_channels: 8, patch_size: 2}\n"
        "objective:\n  autoencoder: {name: audio_vae, random_init: true, size: tiny}\n"
    )
    cfg = load_config(child)
    assert cfg.objective.autoencoder.name == "audio_vae"
    assert cfg.objective.autoencoder.scale is None  # not identity's 3.0
    assert cfg.objective.conditioning.t5 is not None
