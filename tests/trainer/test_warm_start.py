"""init.path and train.trainable: what a fresh run starts from and what it trains, and one
clear line for each way of getting them wrong."""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from configlib import ConfigError
from trainer.config import InitConfig
from trainer.export import load_start
from trainer.registry import load_config
from trainer.warm_start import apply_trainable, check_fits


class Tiny(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.encoder = nn.Linear(3, width)
        self.head = nn.Linear(width, 2)


def test_trainable_freezes_every_parameter_no_pattern_names():
    model = Tiny()
    frozen = apply_trainable(model, ["head.*"])
    assert frozen == ["encoder.weight", "encoder.bias"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "head.weight",
        "head.bias",
    ]
    assert apply_trainable(Tiny(), None) == []


def test_a_pattern_that_matches_nothing_is_named():
    with pytest.raises(ConfigError) as err:
        apply_trainable(Tiny(), ["head.*", "decoder.*"])
    (line,) = err.value.problems
    assert line.startswith("train.trainable: 'decoder.*' matches no parameter")
    assert "'encoder.weight'" in line  # what names look like


def test_weights_of_another_architecture_name_the_difference():
    with torch.device("meta"):
        model = Tiny(width=4)
    other = {k: torch.zeros(v.shape) for k, v in Tiny(width=8).state_dict().items()}
    with pytest.raises(ConfigError) as err:
        check_fits(model, other, "old.safetensors")
    (line,) = err.value.problems
    assert line.startswith("init.path: old.safetensors is another architecture")
    assert "encoder.weight (8, 3) vs (4, 3)" in line
    partial = {"encoder.weight": torch.zeros(4, 3), "extra": torch.zeros(1)}
    with pytest.raises(ConfigError, match=r"lacks 3 tensor.*has 1 the model lacks \(extra\)"):
        check_fits(model, partial, "x")
    check_fits(model, {k: torch.zeros(v.shape) for k, v in Tiny().state_dict().items()}, "x")


def test_missing_path_and_other_families_get_one_line(tmp_path):
    def start(path):
        with pytest.raises(ConfigError) as err:
            load_start(InitConfig(path=str(path)), "dc_ae")
        (line,) = err.value.problems
        return line

    assert (
        start(tmp_path / "nope")
        == f"init.path: {tmp_path / 'nope'}: no such run directory or .safetensors file"
    )
    assert "is not a run directory (no config.yaml)" in start(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "kl_vae"}}))
    assert start(run) == f"init.path: {run} holds a 'kl_vae' model; this recipe trains a 'dc_ae'"
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "dc_ae"}}))
    assert start(run).startswith("init.path: no complete checkpoint under")
    exported = tmp_path / "mmdit.safetensors"
    save_file({"w": torch.zeros(1)}, str(exported), metadata={"model": '{"name": "mmdit"}'})
    assert "holds a 'mmdit' model" in start(exported)


def test_an_exported_file_of_the_family_loads_as_is(tmp_path):
    exported = tmp_path / "ae.safetensors"
    save_file({"w": torch.ones(2)}, str(exported), metadata={"model": '{"name": "dc_ae"}'})
    state, source = load_start(InitConfig(path=str(exported)), "dc_ae")
    assert source == str(exported) and torch.equal(state["w"], torch.ones(2))


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["init.weights=ema"], "init.weights: has no effect without init.path"),
        (["init.step=10"], "init.step: has no effect without init.path"),
        (["init.path=a.safetensors", "init.step=3"], "init.step: has no effect for an exported"),
        (["train.trainable=[]"], "train.trainable: an empty list trains nothing"),
    ],
)
def test_init_and_trainable_keys_without_effect_are_errors(overrides, problem):
    with pytest.raises(ConfigError) as err:
        load_config("recipes/tiny/dcae.yaml", overrides)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_a_missing_init_path_stops_every_rank_with_one_line(tmp_path):
    """Found once the ranks build the run: exit 2 and the line once, not once per rank."""
    from conftest import REPO, launch_cmd, launch_env

    from data_pipeline.build import main as build_main
    from trainer.signals import EXIT_CONFIG_ERROR

    data = tmp_path / "digits"
    assert build_main(["builtin:digits", "--out", str(data), "--size", "16", "--limit", "64"]) == 0
    missing = tmp_path / "phase1"
    proc = subprocess.run(
        launch_cmd(
            "recipes/tiny/dcae.yaml", f"run.output_dir={tmp_path / 'run'}",
            f"init.path={missing}", "cluster.num_workers=2", "logging.progress_bar=false",
            f"data.urls={data}",
        ),  # fmt: skip
        cwd=REPO,
        env=launch_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stderr[-3000:]
    line = f"init.path: {missing}: no such run directory or .safetensors file"
    assert proc.stderr.count(line) == 1, proc.stderr[-3000:]
