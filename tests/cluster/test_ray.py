"""Ray Train launch: `ray job submit -- python -m trainer.launch RECIPE` on a real Ray head
started here on loopback (private temp dir, ports and auth token), the tiny SD3-like recipe
on 2 Ray Train workers; a worker SIGKILLed mid-run is replaced and the run resumes from the
latest checkpoint. Plus the cheap rules: detection, path resolution, config keys."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, launch_env, read_metrics

from cluster.ray_train import in_ray_job, resolve_output_paths
from configlib import ConfigError
from trainer.registry import load_config

RECIPE = "recipes/tiny/sd3_like.yaml"  # relative: the job runs in its working-dir copy
VENV_BIN = Path(sys.executable).parent
MARKER = "GENFLOW_TEST_RAY_HEAD"  # in the environment of our head and what it starts
# keep the working-dir upload to the code (Ray also honours .gitignore)
EXCLUDES = [".venv", ".git", "data", "runs", "**/__pycache__", ".ruff_cache", ".pytest_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# How long a job may take to reach a point (a step, a checkpoint, its end). A job alone
# gets there in about a minute; under `make test` it shares 2 cores with the LM module's
# background training runs, and a 240 s bound once ran out before the first checkpoint.
JOB_WAIT_S = 600
pytestmark = pytest.mark.timeout(3 * JOB_WAIT_S)  # a test waits on up to two such bounds


# ------------------------------------------------------------------------- cheap rules


def test_ray_job_is_detected_from_the_job_supervisor_variable():
    assert in_ray_job({"RAY_JOB_CONFIG_JSON_ENV_VAR": '{"runtime_env": {}}'})
    # a plain shell with RAY_ADDRESS (e.g. the one that ran `ray job submit`) is not a job
    assert not in_ray_job({"RAY_ADDRESS": "http://127.0.0.1:8265"})


def test_output_paths_must_be_absolute_inside_a_ray_job(tmp_path):
    cfg = load_config(REPO / RECIPE, ["checkpoint.dir=ckpts"])
    with pytest.raises(ConfigError) as err:
        resolve_output_paths(cfg, in_job=True, cwd="/tmp/ray/session/working_dir_files/pkg")
    text = str(err.value)
    assert "run.output_dir: 'runs/tiny/sd3_like' is relative" in text
    assert "checkpoint.dir: 'ckpts' is relative" in text
    # outside a job, relative paths mean the launching directory
    out = resolve_output_paths(cfg, in_job=False, cwd=str(tmp_path))
    assert out.run.output_dir == str(tmp_path / "runs/tiny/sd3_like")
    assert out.checkpoint.dir == str(tmp_path / "ckpts")
    cfg = load_config(REPO / RECIPE, [f"run.output_dir={tmp_path}", "checkpoint.dir=s3://b/run"])
    out = resolve_output_paths(cfg, in_job=True, cwd="/elsewhere")
    assert (out.run.output_dir, out.checkpoint.dir) == (str(tmp_path), "s3://b/run")


def test_ray_only_keys_are_rejected_under_another_launcher():
    with pytest.raises(ConfigError, match="cluster.max_failures: has no effect unless"):
        load_config(REPO / RECIPE, ["cluster.launcher=slurm", "cluster.max_failures=2"])
    cfg = load_config(REPO / RECIPE, ["cluster.launcher=ray", "cluster.max_failures=2"])
    assert cfg.cluster.max_failures == 2


def test_driver_forwards_the_first_stop_signal_and_yields_to_the_old_handler_on_the_second(
    monkeypatch, capsys
):
    """The first SIGTERM asks the workers to stop (through the flag); a second one gets the
    handler that was there before (Ray's: exit at once), as does SIGTERM after uninstall."""
    import ray

    from cluster.ray_train import _DriverStop

    asked, seen = [], []

    class Method:
        def remote(self, reason):
            asked.append(reason)
            return reason

    class Flag:
        request = Method()

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        stop = _DriverStop(Flag()).install()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 10
        while not asked and time.time() < deadline:
            time.sleep(0.01)
        assert stop.reason == "SIGTERM" and asked == ["SIGTERM"] and seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert seen == [signal.SIGTERM] and asked == ["SIGTERM"]
        stop.uninstall()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert seen == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "received SIGTERM: the workers will checkpoint and stop" in capsys.readouterr().err


# ------------------------------------------------------------------ a real Ray head


@dataclass
class Head:
    dashboard: str
    env: dict[str, str]
    marker: str
    token: str
    temp_dir: str


def _title(proc) -> str:
    try:
        return (proc.cmdline() or [""])[0]
    except Exception:
        return ""


def _head_processes(head: Head, title: str | None = None) -> list:
    """Processes of our head: its marker variable, or (where setproctitle overwrote the
    environment, e.g. the dashboard agent) our private temp dir in their command line or
    open files (every Ray process logs there)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or title not in (None, _title(proc)):
                continue
            ours = (
                proc.environ().get(MARKER) == head.marker
                or head.temp_dir in " ".join(proc.cmdline())
                or any(f.path.startswith(head.temp_dir) for f in proc.open_files())
            )
        except psutil.Error:  # gone or not readable
            continue
        if ours:
            found.append(proc)
    return found


def _stop_head(head: Head) -> None:
    """`ray stop` would stop every Ray on this machine (other test sessions' too): kill
    only the processes of our head (nothing of it is kept, so no graceful stop needed)."""
    import psutil

    procs = _head_processes(head)
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    deadline = time.time() + 10
    while time.time() < deadline and _alive(procs):
        time.sleep(0.1)


def _alive(procs: list) -> list:
    import psutil

    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            pass
    return alive


@pytest.fixture(scope="module")
def ray_head():
    from cluster.env import free_port

    temp_dir = tempfile.mkdtemp(prefix="gf-ray-", dir="/tmp")  # short: Ray's socket paths
    marker, token = secrets.token_hex(8), secrets.token_hex(32)
    env = launch_env()
    env.pop("PYTHONPATH")  # the job must run the code it uploaded, not this checkout
    env.update(
        {
            MARKER: marker,
            # the head's python (and `python` in job entrypoints) is this virtualenv's
            "PATH": f"{VENV_BIN}{os.pathsep}{env['PATH']}",
            # a single-node cluster: keep every Ray address on loopback instead of eth0
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # our own token: independent of ~/.ray/auth_token and of other sessions
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    dashboard_port = free_port()
    head = Head(f"http://127.0.0.1:{dashboard_port}", env, marker, token, temp_dir)
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true",
        "--num-cpus=4",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
    ]
    # every port a head opens, away from the defaults other Ray heads on this machine use
    for flag in (
        "ray-client-server-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
        "node-manager-port",
        "object-manager-port",
    ):
        cmd.append(f"--{flag}={free_port()}")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"ray start failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
        yield head
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Digit shards and a caption tokenizer, as `make demo` builds them (absolute paths)."""
    root = tmp_path_factory.mktemp("ray_inputs")
    shards, tok = root / "digits16", root / "tok" / "captions"
    build = f"data_pipeline.build builtin:digits --out {shards} --size 16 --shard-size 300"
    tokenizer = (
        f"data_pipeline.tokenizer train --input {shards} --out {tok} --vocab-size 40 "
        "--model-type bpe"
    )
    for args in (build, tokenizer):
        proc = subprocess.run(
            [sys.executable, "-m", *args.split()],
            cwd=REPO,
            env=launch_env(),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return [f"data.urls={shards}", f"objective.conditioning.t5.tokenizer_path={tok}.model"]


def submit(head: Head, *overrides: str, env_vars: dict[str, str] | None = None) -> str:
    """`ray job submit --no-wait` exactly as a user types it; returns the submission id."""
    submission_id = f"genflow-test-{secrets.token_hex(4)}"
    cmd = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--address",
        head.dashboard,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": EXCLUDES, **({"env_vars": env_vars} if env_vars else {})}),
        "--submission-id",
        submission_id,
        "--no-wait",
        "--",
        "python",
        "-m",
        "trainer.launch",
        RECIPE,
        *overrides,
    ]
    proc = subprocess.run(cmd, env=head.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ray job submit failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return submission_id


def job_client(head: Head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard, headers={"Authorization": f"Bearer {head.token}"})


def wait_for_job(client, submission_id: str, timeout: float) -> tuple[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL:
            return status, client.get_job_logs(submission_id)
        time.sleep(1)
    client.stop_job(submission_id)
    raise AssertionError(
        f"job still running after {timeout}s:\n{client.get_job_logs(submission_id)[-6000:]}"
    )


def run_overrides(run_dir: Path, inputs: list[str], *extra: str) -> list[str]:
    return [
        *inputs,
        f"run.output_dir={run_dir}",
        "eval.every=0",
        "logging.progress_bar=false",
        "train.log_every=5",
        "checkpoint.every=10",
        *extra,
    ]


@pytest.mark.e2e
def test_ray_job_trains_on_two_workers_and_survives_a_killed_one(ray_head, inputs, tmp_path):
    """One submission checks both the plain path and recovery (a second job would double
    the ~30 s of Ray start-up this test already spends twice)."""
    from trainer.checkpoint import CheckpointStore

    run_dir, max_steps = tmp_path / "run", 30
    overrides = run_overrides(
        run_dir, inputs, f"run.max_steps={max_steps}", "cluster.max_failures=1"
    )
    client = job_client(ray_head)
    submission_id = submit(ray_head, *overrides)
    store = CheckpointStore(str(run_dir / "checkpoints"))
    deadline = time.time() + JOB_WAIT_S
    killed_after = victim = None
    while killed_after is None and time.time() < deadline:
        status = str(client.get_job_status(submission_id).value)
        assert status not in TERMINAL, client.get_job_logs(submission_id)[-6000:]
        latest = store.latest_step() if (run_dir / "checkpoints").exists() else None
        if latest:
            workers = _head_processes(ray_head, "ray::RayTrainWorker")
            assert len(workers) == 2, workers
            victim = workers[1]
            victim.send_signal(signal.SIGKILL)
            killed_after = latest
        time.sleep(0.2)
    assert killed_after is not None, "no checkpoint appeared"
    assert 0 < killed_after < max_steps
    gone_by = time.time() + 10
    while _alive([victim]) and time.time() < gone_by:
        time.sleep(0.1)
    assert not _alive([victim])

    status, logs = wait_for_job(client, submission_id, timeout=JOB_WAIT_S)
    assert status == "SUCCEEDED", logs[-8000:]
    expect = (
        f"ray: 2 workers x {{'CPU': 1.0}} (gloo, timeout 1800s, max_failures 1), run dir {run_dir}"
    )
    assert expect in logs
    assert f"steps 0 -> {max_steps}" in logs  # rank 0's console reaches the job logs
    # the replacement workers resumed from the checkpoint that existed at the kill (or later)
    resumed = [int(s) for s in re.findall(rf"resuming: .* steps (\d+) -> {max_steps}", logs)]
    assert len(resumed) == 1 and resumed[0] >= killed_after, logs[-8000:]
    # each logged step exactly once: records after the resumed checkpoint were dropped
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(5, max_steps + 1, 5)), steps
    assert store.latest_step() == max_steps and store.is_complete(max_steps)
    # INFO lines stay in the per-rank log files, out of the job logs
    assert "checkpoint took" not in logs
    assert "checkpoint took" in (run_dir / "logs" / "rank_00001.log").read_text()
    # Ray Train's own run state lands beside ours, not in ~/ray_results
    assert (run_dir / "ray_train").is_dir()


@pytest.mark.e2e
def test_ray_job_stop_checkpoints_and_the_next_submission_resumes(ray_head, inputs, tmp_path):
    """`ray job stop` (SIGTERM to the driver) reaches the workers, which run the loop where
    no signal can reach it: they checkpoint at the next step boundary (there is no periodic
    checkpoint to fall back on) and a second submission of the same command resumes there."""
    from trainer.checkpoint import CheckpointStore

    run_dir = tmp_path / "run"
    never = "checkpoint.every=1000000"
    client = job_client(ray_head)
    # the stop's grace period (3 s by default) is read from the job's runtime env
    submission_id = submit(
        ray_head,
        *run_overrides(run_dir, inputs, "run.max_steps=1000000", never),
        env_vars={"RAY_JOB_STOP_WAIT_TIME_S": "120"},
    )
    deadline = time.time() + JOB_WAIT_S
    while time.time() < deadline:
        status = str(client.get_job_status(submission_id).value)
        assert status not in TERMINAL, client.get_job_logs(submission_id)[-6000:]
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(r.get("step", 0) >= 10 for r in read_metrics(run_dir)):
            break
        time.sleep(0.5)
    else:
        client.stop_job(submission_id)
        raise AssertionError(f"the job logged no step >= 10 in {JOB_WAIT_S} s")

    stop = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "stop", "--address", ray_head.dashboard, submission_id],
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert stop.returncode == 0, stop.stderr[-3000:]
    status, logs = wait_for_job(client, submission_id, timeout=JOB_WAIT_S)
    assert status == "STOPPED", logs[-6000:]
    store = CheckpointStore(str(run_dir / "checkpoints"))
    stopped = store.latest_step()
    assert stopped is not None and stopped >= 10 and store.is_complete(stopped), logs[-6000:]
    assert "received SIGTERM: the workers will checkpoint and stop" in logs
    assert "killed after RAY_JOB_STOP_WAIT_TIME_S=120 s" in logs  # the driver sees the grace
    rank0 = (run_dir / "logs" / "rank_00000.log").read_text()
    assert f"stopped at step {stopped} on SIGTERM on the Ray driver" in rank0, rank0[-3000:]
    assert "stopped on SIGTERM: checkpoint saved" in logs

    resume_to = stopped + 5
    submission_id = submit(
        ray_head, *run_overrides(run_dir, inputs, f"run.max_steps={resume_to}", never)
    )
    status, logs = wait_for_job(client, submission_id, timeout=JOB_WAIT_S)
    assert status == "SUCCEEDED", logs[-8000:]
    assert re.search(rf"resuming: .* steps {stopped} -> {resume_to}", logs), logs[-8000:]
    assert store.latest_step() == resume_to


def failed_job_logs(ray_head, inputs, tmp_path, replaced: str, override: str) -> str:
    """Submit a 5-step job with ``override`` in place of the input starting with
    ``replaced``, under cluster.max_failures=-1 (restart forever); it must fail."""
    given = [o for o in inputs if not o.startswith(replaced)]
    overrides = run_overrides(
        tmp_path / "run", given, "run.max_steps=5", override, "cluster.max_failures=-1"
    )
    client = job_client(ray_head)
    submission_id = submit(ray_head, *overrides)
    status, logs = wait_for_job(client, submission_id, timeout=JOB_WAIT_S)
    assert status == "FAILED", logs[-6000:]
    return logs


@pytest.mark.e2e
def test_a_mistake_no_restart_can_fix_ends_the_job_with_the_ranks_error(ray_head, inputs, tmp_path):
    """Shards that do not exist, under cluster.max_failures=-1 (restart forever): the job
    ends after one restart, with the rank's one-line error, instead of looping."""
    missing = tmp_path / "no_shards"
    logs = failed_job_logs(ray_head, inputs, tmp_path, "data.urls=", f"data.urls={missing}")
    assert re.search(rf"error: rank \d: .*{missing}.* \(not retried", logs), logs[-6000:]
    assert "Ray Train gave up" not in logs


@pytest.mark.e2e
def test_a_missing_encoder_tokenizer_ends_the_job_with_one_line_and_no_traceback(
    ray_head, inputs, tmp_path
):
    """A T5 tokenizer folder that is not at its path: the driver only warns (the workers'
    nodes may have it), every rank meets the same InputError, and the job ends after the
    first attempt with the key named once and no worker traceback in the logs."""
    missing = tmp_path / "t5-tokenizer"
    key = "objective.conditioning.t5"
    logs = failed_job_logs(
        ray_head, inputs, tmp_path, f"{key}.tokenizer_path=", f"{key}.tokenizer_path={missing}"
    )
    key = "objective.conditioning.t5"
    assert f"warning: {key}.tokenizer_path: {missing} does not exist (on this node" in logs
    errors = [line for line in logs.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, logs[-6000:]
    assert re.fullmatch(
        rf"error: rank \d: {key}: T5 tokenizer {missing} does not exist "
        r"\(not retried: a restart cannot fix it\)",
        errors[0],
    ), errors
    assert "Traceback" not in logs, logs[-6000:]
