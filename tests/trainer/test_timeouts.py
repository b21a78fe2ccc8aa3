"""A hung rank must not hang the job: with cluster.timeout_s the other ranks' collectives
fail, the rank that notices prints one line naming itself, the step and the key, exits
with code 124, and the local supervisor stops the remaining ranks at once (a SIGSTOPped
one included) so that a scheduler can restart the job."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import psutil
import pytest
import torch.distributed as dist
from conftest import REPO, launch_cmd, launch_env

from trainer import distributed as D
from trainer.signals import EXIT_COLLECTIVE_TIMEOUT

TIMEOUT_S = 10  # the smallest cluster.timeout_s allowed


def test_only_collective_timeouts_are_reported_as_such(monkeypatch):
    monkeypatch.setattr(D, "current_step", 7)
    gloo = RuntimeError(
        "[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] "
        "Timed out waiting 10000ms for recv operation to complete"
    )
    message = D.report_timeout(gloo, rank=3, timeout_s=10)
    assert message.startswith("rank 3: a collective did not complete within ")
    assert "cluster.timeout_s=10s at step 7" in message
    monkeypatch.setattr(D, "current_step", None)
    store = dist.DistStoreError("wait timeout after 10000ms, keys: /default_pg/0//cpu//0")
    assert "cluster.timeout_s=10s during setup" in D.report_timeout(store, rank=0, timeout_s=10)
    # timeouts that have nothing to do with the process group stay ordinary errors
    s3 = RuntimeError("Read timeout on endpoint URL: http://127.0.0.1:9000/bucket/shard.tar")
    assert D.report_timeout(s3, rank=0, timeout_s=10) is None
    assert D.report_timeout(ValueError("gloo timed out"), rank=0, timeout_s=10) is None
    assert D.report_timeout(RuntimeError("gloo: connection reset"), 0, 10) is None


def _logged_steps(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


@pytest.mark.e2e
def test_a_stopped_rank_times_out_and_the_job_stops(tmp_path):
    run_dir = tmp_path / "run"
    cmd = launch_cmd(
        REPO / "recipes" / "tiny" / "flow2d.yaml",
        "run.max_steps=100000",  # never reached: the test stops it
        f"run.output_dir={run_dir}",
        f"cluster.timeout_s={TIMEOUT_S}",
        "eval.every=0",
        "train.log_every=5",
        "logging.progress_bar=false",
    )
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        supervisor = subprocess.Popen(
            cmd, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL, stderr=stderr
        )
    ranks: dict[int, psutil.Process] = {}
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _logged_steps(run_dir):
            assert supervisor.poll() is None, stderr_path.read_text()[-4000:]
            time.sleep(0.2)
        ranks = {int(p.environ()["RANK"]): p for p in psutil.Process(supervisor.pid).children()}
        assert sorted(ranks) == [0, 1]
        ranks[1].suspend()  # SIGSTOP: alive, connected, silent
        stopped_at = time.monotonic()
        seen_step = max(_logged_steps(run_dir))
        code = supervisor.wait(timeout=TIMEOUT_S + 60)
        elapsed = time.monotonic() - stopped_at
    finally:
        for proc in (*ranks.values(), supervisor):
            try:
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        supervisor.wait(timeout=30)
    err = stderr_path.read_text()
    assert code == EXIT_COLLECTIVE_TIMEOUT, err[-4000:]
    # the timeout fired, and the job went down right after it (no 30 s grace for the rest)
    assert TIMEOUT_S - 1 <= elapsed <= TIMEOUT_S + 20, (elapsed, err[-4000:])
    reports = re.findall(
        rf"^error: rank 0: a collective did not complete within cluster.timeout_s={TIMEOUT_S}s "
        r"at step (\d+)",
        err,
        flags=re.M,
    )
    assert len(reports) == 1 and int(reports[0]) >= seen_step, err[-4000:]
    assert "Traceback" not in err, err[-4000:]  # one line, not a wall of C++ frames
    assert "launch: rank 0 exited with code 124; stopping" in err
    assert not psutil.pid_exists(ranks[1].pid)  # the supervisor killed and reaped it
    # the details stay in the rank's own log file
    assert "Timed out" in (run_dir / "logs" / "rank_00000.log").read_text()
