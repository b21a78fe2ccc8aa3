"""Whole runs through the launcher: FSDP2 on 2 gloo ranks, exact resume, resharding,
preemption signals and crash safety (SIGKILL at random moments, also mid-save)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, launch_cmd, launch_env, read_metrics, run_launch, train_losses

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECIPE = REPO / "recipes" / "tiny" / "flow2d.yaml"
COMMON = ("train.log_every=1", "eval.every=0")


def ckpt_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / "meta.json").exists())


def latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip()[5:])


def test_two_ranks_write_run_directory(tmp_path):
    """A 2-rank FSDP2 run writes config, metrics with the required fields, logs, checkpoints."""
    run = tmp_path / "run"
    run_launch(RECIPE, f"run.output_dir={run}", "train.log_every=5")
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for key in ("step", "loss", "lr", "grad_norm", "samples_per_s", "data_wait_frac"):
        assert all(key in r for r in records), key
    assert "mfu" not in records[0]  # CPU: no known peak, so no made-up MFU
    assert (run / "config.yaml").exists() and (run / "train.log").exists()
    assert (run / "logs" / "rank_00000.log").exists() and (run / "logs" / "rank_00001.log").exists()
    assert ckpt_steps(run) == [10, 20] and latest_step(run) == 20
    ckpt = run / "checkpoints" / "step_00000020"
    assert (ckpt / ".metadata").exists()
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    assert any(r.get("eval/sliced_w1") is not None for r in read_metrics(run))
    assert list((run / "samples").glob("samples_step*.png"))


@pytest.mark.parametrize("async_save", [False, True])
def test_exact_resume_is_bit_identical(tmp_path, async_save):
    """2N straight steps == N steps, stop, resume for N more (same losses, bit for bit),
    with synchronous and with background (async) checkpoint writes."""
    common = (
        *COMMON,
        "schedule.name=constant",
        "checkpoint.every=5",
        f"checkpoint.async_save={str(async_save).lower()}",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_launch(RECIPE, f"run.output_dir={straight}", "run.max_steps=20", *common)
    run_launch(RECIPE, f"run.output_dir={resumed}", "run.max_steps=10", *common)
    assert latest_step(resumed) == 10
    proc = run_launch(RECIPE, f"run.output_dir={resumed}", "run.max_steps=20", *common)
    assert "resuming" in proc.stderr
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert a == b


def test_relaunching_the_run_config_resumes(tmp_path):
    """``trainer.launch RUN/config.yaml`` continues the run from its latest checkpoint (the
    dump's inert defaults, such as min_lr_ratio with a constant schedule, are no error)."""
    run = tmp_path / "run"
    common = (*COMMON, "schedule.name=constant", "checkpoint.every=5")
    run_launch(RECIPE, f"run.output_dir={run}", "run.max_steps=10", *common)
    assert latest_step(run) == 10
    proc = run_launch(run / "config.yaml", "run.max_steps=15")
    assert "resuming" in proc.stderr
    assert latest_step(run) == 15
    assert sorted(train_losses(run)) == list(range(1, 16))


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_resume_on_a_different_number_of_ranks(tmp_path, first, second):
    """DCP reshards model/optimizer/EMA; per-sample noise keeps training the same function."""
    common = (*COMMON, "checkpoint.every=10", "schedule.name=constant")
    straight, resharded = tmp_path / "straight", tmp_path / "resharded"
    run_launch(RECIPE, f"run.output_dir={straight}", f"cluster.num_workers={first}", *common)
    run_launch(
        RECIPE,
        f"run.output_dir={resharded}",
        f"cluster.num_workers={first}",
        "run.max_steps=10",
        *common,
    )
    proc = run_launch(
        RECIPE, f"run.output_dir={resharded}", f"cluster.num_workers={second}", *common
    )
    assert f"saved on {first} ranks, now {second}" in (resharded / "train.log").read_text(), (
        proc.stderr
    )
    a, b = train_losses(straight), train_losses(resharded)
    assert sorted(b) == list(range(1, 21))
    for step in range(11, 21):  # only float summation order differs
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    meta = json.loads((resharded / "checkpoints" / "step_00000020" / "meta.json").read_text())
    assert meta["world_size"] == second


def _start(run: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        launch_cmd(RECIPE, f"run.output_dir={run}", *overrides),
        cwd=REPO,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists():
            steps = [r["step"] for r in read_metrics(run) if "loss" in r]
            if steps and steps[-1] >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
            )
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_checkpoints_and_exits_75(tmp_path, signame):
    """The signal makes every rank save at the next step boundary and exit with 75;
    rerunning the same command resumes and reproduces the uninterrupted losses."""
    common = (*COMMON, "run.max_steps=150", "checkpoint.every=1000", "schedule.name=constant")
    run, straight = tmp_path / "run", tmp_path / "straight"
    proc = _start(run, *common)
    _wait_for_step(run, 5, proc)
    os.killpg(proc.pid, getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    stopped = latest_step(run)
    assert 5 <= stopped < 150 and ckpt_steps(run) == [stopped]
    assert "checkpoint saved, rerun the same command to resume" in err
    if signame != "SIGTERM":
        return  # same code path after the flag is set; the resume is checked once, below
    run_launch(RECIPE, f"run.output_dir={run}", *common)
    run_launch(RECIPE, f"run.output_dir={straight}", *common)
    a, b = train_losses(straight), train_losses(run)
    assert sorted(b) == list(range(1, 151))
    assert a == b


def test_two_sigints_abort(tmp_path):
    """A second Ctrl-C does not wait for a checkpoint: the run aborts non-zero promptly."""
    run = tmp_path / "run"
    proc = _start(
        run, *COMMON, "run.max_steps=100000", "checkpoint.every=100000", "model.size=small"
    )
    _wait_for_step(run, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)  # a person's double Ctrl-C; signals sent back to back coalesce into one
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode not in (0, 75)


def _kill_when_a_save_is_in_flight(run: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll for a step directory without meta.json (a save under way) and kill -9 then."""
    deadline = time.time() + timeout
    root = run / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        if root.exists() and any(not (p / "meta.json").exists() for p in root.glob("step_*")):
            os.killpg(proc.pid, signal.SIGKILL)
            return True
        time.sleep(0.001)
    return False


def test_sigkill_at_random_moments_never_breaks_latest(tmp_path):
    """Kill -9 the whole run, alternately while a checkpoint is being written and at a random
    time; after each kill 'latest' names a complete checkpoint and the run resumes. The final
    losses equal an uninterrupted run's, and retention removes the torn directories."""
    common = (
        *COMMON,
        "run.max_steps=24",
        "checkpoint.every=1",
        "checkpoint.keep_last=2",
        "model.size=small",
    )
    run, straight = tmp_path / "run", tmp_path / "straight"
    rng = random.Random(1234)
    mid_save_kills = random_kills = 0
    for attempt in range(3):
        proc = _start(run, *common)
        if attempt % 2 == 0:
            mid_save_kills += _kill_when_a_save_is_in_flight(run, proc)
        else:
            time.sleep(rng.uniform(3.0, 8.0))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                random_kills += 1
        proc.wait()
        if (run / "checkpoints" / "latest").exists():
            step = latest_step(run)
            ckpt = run / "checkpoints" / f"step_{step:08d}"
            assert (ckpt / "meta.json").exists() and (ckpt / ".metadata").exists()
            assert (ckpt / "rank_00000.pt").exists() and (ckpt / "rank_00001.pt").exists()
    assert mid_save_kills >= 1
    run_launch(RECIPE, f"run.output_dir={run}", *common)
    run_launch(RECIPE, f"run.output_dir={straight}", *common)
    assert train_losses(run) == train_losses(straight)
    assert len(ckpt_steps(run)) == 2  # retention honoured
    leftovers = [
        p.name for p in (run / "checkpoints").glob("step_*") if not (p / "meta.json").exists()
    ]
    assert leftovers == []


def test_latest_pointing_at_incomplete_checkpoint_falls_back(tmp_path):
    """A pointer to a directory without meta.json is ignored; the newest complete one loads."""
    run = tmp_path / "run"
    common = (*COMMON, "checkpoint.every=10", "schedule.name=constant")
    run_launch(RECIPE, f"run.output_dir={run}", "run.max_steps=10", *common)
    broken = run / "checkpoints" / "step_00000015"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"partial")
    (run / "checkpoints" / "latest").write_text("step_00000015\n")
    proc = run_launch(RECIPE, f"run.output_dir={run}", "run.max_steps=20", *common)
    assert "resumed from step 10" in (run / "train.log").read_text(), proc.stderr
    assert not broken.exists()
    assert latest_step(run) == 20


def test_fresh_flag_starts_over(tmp_path):
    run = tmp_path / "run"
    run_launch(RECIPE, f"run.output_dir={run}", "run.max_steps=10", *COMMON)
    run_launch(RECIPE, f"run.output_dir={run}", "run.max_steps=10", *COMMON, fresh=True)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 11))
