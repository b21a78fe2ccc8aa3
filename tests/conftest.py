"""Shared fixtures: run the launcher as a real subprocess and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray's disk monitor counts a disk as full at 95% of capacity minus what is *available*
# to us. On shared CI hosts that is what other tenants leave, so it can log "over 95%
# full" with gigabytes free. The tests never spill objects; keep the monitor off for
# every Ray instance they start (in-process or `ray start`), which inherit this.
os.environ.setdefault("RAY_local_fs_capacity_threshold", "1")


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch_cmd(recipe: str | Path, *overrides: str, fresh: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "trainer.launch", str(recipe), *overrides]
    return [*cmd, "--fresh"] if fresh else cmd


def run_launch(
    recipe, *overrides, fresh=False, timeout=300, check=True
) -> subprocess.CompletedProcess:
    """Run ``python -m trainer.launch`` to completion; raise with its output on failure."""
    proc = subprocess.run(
        launch_cmd(recipe, *overrides, fresh=fresh),
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"launch failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}"
        )
    return proc


def run_module(module: str, *args: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from the repo root; output captured, exit code not checked."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=launch_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


# ------------------------------------------------------- prompted digits, judged per digit
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PER_DIGIT = 10
# Every digit on its own (the demo's zero row once came out as fours while the mean was 0.89)
# and the spread of each digit's samples against the real digits' (trainer.digit_judge):
MIN_DIGIT_ACCURACY = 0.7
MIN_DIVERSITY = 0.3


def train_caption_tokenizer(shards: Path, out: Path) -> Path:
    """The tiny T5's caption tokenizer as `make demo` trains it; returns the .model path."""
    proc = run_module(
        "data_pipeline.tokenizer", "train", "--input", str(shards), "--out", str(out),
        "--vocab-size", "40", "--model-type", "bpe",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(f"{out}.model")


def prompted_report(run_dir, out_dir, per_digit: int = PER_DIGIT, side: int = 8):
    """Sample ``per_digit`` images of each digit prompt (``side`` px) and judge them."""
    import numpy as np

    from trainer import digit_judge

    prompts = [digit_judge.PROMPT.format(w) for w in DIGIT_WORDS]
    proc = run_module(
        "trainer.sample",
        *("--run", str(run_dir), "--prompts", *prompts),
        *("--num-per-prompt", str(per_digit), "--steps", "20", "--cfg", "3.0", "--seed", "0"),
        *("--out", str(out_dir)),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    images, labels = digit_judge.load_samples(out_dir)
    assert images.shape == (10 * per_digit, side, side, 3) and images.dtype == np.uint8
    assert labels[:per_digit] == [prompts[0]] * per_digit
    assert (Path(out_dir) / "grid.png").exists()
    report = digit_judge.judge(images, labels)
    print(report.table())
    return report


def assert_every_digit_drawn(report, mean_bar: float, min_diversity: float = MIN_DIVERSITY):
    assert report.mean_accuracy >= mean_bar, report.table()
    assert report.min_accuracy >= MIN_DIGIT_ACCURACY, report.table()
    assert report.min_diversity >= min_diversity, report.table()


@pytest.fixture
def tiny_recipe() -> Path:
    return REPO / "recipes" / "tiny" / "flow2d.yaml"


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3-compatible server (moto) on loopback with bucket 'ckpts'; AWS_* env points at it."""
    import s3fs
    from moto.server import ThreadedMotoServer

    from cluster.env import free_port

    # s3fs caches filesystem instances per argument set: one made against an earlier
    # test's server (another port) would otherwise be reused and hang on a dead endpoint.
    s3fs.S3FileSystem.clear_instance_cache()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
        "FSSPEC_S3_ENDPOINT_URL": url,
    }.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="ckpts")
    yield url
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


# ----------------------------------------------------------------- parallel test runs
# `make test` runs the suite on 2 pytest-xdist workers with --dist loadscope: a module's
# tests share one worker, so its module-scoped fixtures (trained runs, built shards,
# daemons) are built once. (loadgroup would merge modules, but it silently stops grouping
# under pytest 9.2: pytest-dev/pytest-xdist#1386.) Modules that use Ray each start their
# own instance on their own ports, so they may overlap.
# Longest modules first, so the short ones fill in beside them instead of after them
# (kept as collected by --no-loadscope-reorder; xdist would otherwise put the modules
# with the most tests first).
SLOW_FIRST = [
    "tests/e2e/test_language_models.py",
    "tests/cluster/test_slurm.py",
    "tests/e2e/test_deepspeed.py",
    "tests/cluster/test_ray.py",
]


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.path.relative_to(REPO).as_posix()
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: collection order within a module is kept
