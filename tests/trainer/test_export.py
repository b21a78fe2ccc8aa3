"""Consolidated safetensors export of sharded checkpoints."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, launch_env, run_launch
from safetensors.torch import load_file

from models.flow_mlp import FlowMLPConfig, build


@pytest.mark.slow
def test_export_two_rank_checkpoint_loads_into_a_plain_model(tmp_path):
    run = tmp_path / "run"
    run_launch(REPO / "recipes/tiny/flow2d.yaml", f"run.output_dir={run}", "eval.every=0")
    out = tmp_path / "ema.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.export", str(run), "--out", str(out)],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    ema = load_file(out)
    model = build(FlowMLPConfig())
    model.load_state_dict(ema)  # strict: every key, every shape
    weights = load_file(_export(run, tmp_path / "model.safetensors", "model"))
    assert set(weights) == set(ema)
    assert any(not torch.equal(weights[k], ema[k]) for k in ema)  # EMA lags the weights
    x, t = torch.randn(8, 2), torch.rand(8)
    assert torch.isfinite(model(x, t)).all()
    bad = subprocess.run(
        [sys.executable, "-m", "trainer.export", str(run), "--step", "7", "--out", str(out)],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
    )
    assert (
        bad.returncode == 2
        and "not a complete checkpoint" in bad.stderr
        and "Traceback" not in bad.stderr
    )


def _export(run, out, weights):
    subprocess.run(
        [sys.executable, "-m", "trainer.export", str(run), "--weights", weights, "--out", str(out)],
        cwd=REPO,
        env=launch_env(),
        check=True,
        capture_output=True,
    )
    return out
