"""Checkpoints on a real S3-compatible endpoint (moto's server on loopback, through s3fs):
train two ranks writing to s3://, stop, resume from s3://, export from s3://."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, launch_env, train_losses

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECIPE = REPO / "recipes" / "tiny" / "flow2d.yaml"


def _run(*args):
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_checkpoint_resume_and_export_on_s3(tmp_path, s3_endpoint):
    import s3fs

    common = [
        "train.log_every=1",
        "eval.every=0",
        "checkpoint.every=5",
        "schedule.name=constant",
        "checkpoint.dir=s3://ckpts/runs/tiny",
    ]
    run = tmp_path / "run"
    first = _run(
        "-m", "trainer.launch", str(RECIPE), f"run.output_dir={run}", "run.max_steps=10", *common
    )
    assert first.returncode == 0, first.stderr[-4000:]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    assert fs.cat_file("ckpts/runs/tiny/latest").decode().strip() == "step_00000010"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("ckpts/runs/tiny/step_00000010")}
    assert {"meta.json", ".metadata", "rank_00000.pt", "rank_00001.pt", "trainer.pt"} <= names
    assert not (run / "checkpoints").exists()  # nothing written locally

    second = _run(
        "-m", "trainer.launch", str(RECIPE), f"run.output_dir={run}", "run.max_steps=20", *common
    )
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from step 10" in (run / "train.log").read_text()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("ckpts/runs/tiny") if "step_" in p) == [
        "step_00000015",
        "step_00000020",
    ]  # the recipe keeps the last 2

    out = tmp_path / "ema.safetensors"
    exported = _run("-m", "trainer.export", "s3://ckpts/runs/tiny", "--out", str(out))
    assert exported.returncode == 0, exported.stderr[-4000:]
    assert out.stat().st_size > 1000
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint


def test_train_from_s3_shards_checkpoint_to_s3_and_resume(tmp_path, s3_endpoint):
    """Shards written to s3://, read by the loader on 2 ranks, checkpoints on s3://, resumed:
    the resumed run reproduces the uninterrupted run's losses."""
    import uuid

    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    prefix = f"s3://ckpts/e2e-{uuid.uuid4().hex[:8]}"
    built = _run(
        "-m",
        "data_pipeline.build",
        "builtin:digits",
        "--out",
        f"{prefix}/digits",
        "--size",
        "16",
        "--shard-size",
        "100",
        "--limit",
        "400",
    )
    assert built.returncode == 0, built.stderr[-3000:]
    recipe = REPO / "recipes" / "tiny" / "digits_flow.yaml"
    common = [
        f"data.urls={prefix}/digits",
        "train.log_every=1",
        "eval.every=0",
        "checkpoint.every=5",
        "schedule.name=constant",
    ]
    run, straight = tmp_path / "run", tmp_path / "straight"
    ckpt = f"checkpoint.dir={prefix}/ckpt"
    first = _run(
        "-m",
        "trainer.launch",
        str(recipe),
        f"run.output_dir={run}",
        "run.max_steps=10",
        ckpt,
        *common,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(
        "-m",
        "trainer.launch",
        str(recipe),
        f"run.output_dir={run}",
        "run.max_steps=20",
        ckpt,
        *common,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 10" in (run / "train.log").read_text()
    ref = _run(
        "-m",
        "trainer.launch",
        str(recipe),
        f"run.output_dir={straight}",
        "run.max_steps=20",
        *common,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert train_losses(run) == train_losses(straight)
    s3fs.S3FileSystem.clear_instance_cache()
