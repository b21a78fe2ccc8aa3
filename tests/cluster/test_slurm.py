"""SLURM batch runs: the sbatch script, the submit CLI, node-rank detection, and whole jobs
on a real single-host slurmctld + slurmd (completion, USR1 -> checkpoint -> requeue ->
resume, and a scancel that must not be requeued)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, launch_env, read_metrics
from slurm_cluster import SlurmUnavailable, start_slurm

from cluster import slurm as slurm_cli
from cluster.env import detect, free_port, slurm_node

RECIPE = REPO / "recipes" / "tiny" / "flow2d.yaml"
QUIET = ("logging.progress_bar=false", "eval.every=0")


# ---------------------------------------------------------------------------- the script
def _dry_run(tmp_path: Path, *args: str) -> str:
    out = tmp_path / "run"
    assert slurm_cli.main(["submit", *args, "--dry-run", f"run.output_dir={out}"]) == 0
    return (out / "slurm" / "job.sbatch").read_text()


def test_script_for_two_gpu_nodes(tmp_path):
    """Directives, the per-node srun launch, rendezvous, signal trap and requeue are all there,
    with absolute paths, and bash accepts the script."""
    recipe = REPO / "recipes" / "sd3_like.yaml"
    text = _dry_run(
        tmp_path,
        str(recipe),
        "--nodes=2",
        "--gpus-per-node=8",
        "--cpus-per-task=32",
        "--time=1-00:00:00",
        "--signal-lead-s=300",
        "--sbatch-arg=--exclusive",
        "train.batch_size=64",
    )
    run = tmp_path / "run"
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={run}/slurm/%j.out",
        f"#SBATCH --chdir={Path.cwd()}",
        "#SBATCH --exclusive",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=32"
        " --gpus-per-node=8 \\",
        f"    {sys.executable} -m trainer.launch {recipe} \\",
        "    cluster.num_workers=8 \\",
        f"    run.output_dir={run} &",
        'scontrol requeue "$SLURM_JOB_ID"',
    ):
        assert line in text, line
    assert re.search(r"^trap .*kill -USR1 \"\$SRUN_PID\".* USR1$", text, re.M)
    assert "  75)" in text
    # all #SBATCH lines come before the first command (sbatch stops reading at it)
    body = [ln for ln in text.splitlines()[1:] if ln and not ln.startswith("#")]
    assert text.index(body[0]) > text.rindex("#SBATCH")
    subprocess.run(["bash", "-n", str(run / "slurm" / "job.sbatch")], check=True)


def test_example_sbatch_is_what_submit_writes(tmp_path):
    """cluster/example.sbatch is the generator's output (machine paths replaced)."""
    text = _dry_run(
        tmp_path,
        str(REPO / "recipes" / "sd3_like.yaml"),
        "--nodes=2",
        "--gpus-per-node=8",
        "--cpus-per-task=96",
        "--partition=gpu",
        "--time=2-00:00:00",
        "--sbatch-arg=--exclusive",
    )
    text = (
        text.replace(str(tmp_path / "run"), "/path/to/genflow/runs/sd3_like")
        .replace(sys.executable, "/path/to/genflow/.venv/bin/python")
        .replace(str(REPO), "/path/to/genflow")
        .replace(str(Path.cwd()), "/path/to/genflow")
    )
    assert (REPO / "cluster" / "example.sbatch").read_text() == text


def test_procs_per_node_defaults_and_checks(tmp_path, capsys):
    assert "cluster.num_workers=1 " in _dry_run(tmp_path, str(RECIPE), "--nodes=2")
    assert "cluster.num_workers=4 " in _dry_run(
        tmp_path, str(RECIPE), "--nodes=1", "--gpus-per-node=4"
    )
    capsys.readouterr()
    code = slurm_cli.main(
        ["submit", str(RECIPE), "--nodes=1", "--gpus-per-node=4", "--procs-per-node=8"]
    )
    assert code == 2 and "ranks would share GPUs" in capsys.readouterr().err
    code = slurm_cli.main(["submit", str(RECIPE), "--nodes=1", "cluster.num_workers=3"])
    assert code == 2 and "--procs-per-node" in capsys.readouterr().err


def test_bad_recipe_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    code = slurm_cli.main(
        ["submit", str(RECIPE), "--nodes=1", "train.batch_sise=3", f"run.output_dir={run}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "train.batch_sise" in err and err.startswith("error:")
    assert not run.exists()


def test_missing_sbatch_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    run = tmp_path / "run"
    code = slurm_cli.main(["submit", str(RECIPE), "--nodes=1", f"run.output_dir={run}"])
    err = capsys.readouterr().err
    assert code == 1 and "sbatch not found on PATH" in err
    assert (run / "slurm" / "job.sbatch").exists() and not (run / "slurm" / "jobs.txt").exists()


# ------------------------------------------------------------------------ env detection
STEP = {  # what srun sets for task 1 of `srun --nodes=2 --ntasks-per-node=1`
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu-a,gpu-b",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "MASTER_ADDR": "gpu-a",
}


def test_node_rank_and_rendezvous_from_slurm_variables():
    node = slurm_node("auto", STEP)
    assert node is not None
    assert (node.node_rank, node.num_nodes, node.master_addr) == (1, 2, "gpu-a")
    assert node.master_port == 20000 + 4242  # the batch script's rule
    assert slurm_node("slurm", STEP) == node
    # the batch shell itself (no step), one task per rank, or another launcher: not a node
    assert slurm_node("auto", {k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"}) is None
    assert slurm_node("auto", {**STEP, "SLURM_STEP_NUM_TASKS": "16"}) is None
    assert slurm_node("torchrun", STEP) is None
    assert slurm_node("auto", {**STEP, "GENFLOW_LOCAL_SUPERVISOR": "1"}) is None


def test_a_supervised_rank_reads_its_rank_not_the_node_task():
    """Ranks inherit the node launcher's SLURM_PROCID; they must use RANK / WORLD_SIZE."""
    child = {**STEP, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_PORT": "20123"}
    child["GENFLOW_LOCAL_SUPERVISOR"] = "1"
    for launcher in ("auto", "slurm", "local"):  # 'local' ranks used to re-spawn ranks
        env = detect(launcher, child)
        assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1), launcher
        assert (env.master_addr, env.master_port) == ("gpu-a", 20123)
    # without the supervisor mark, a forced 'slurm' launcher reads the task's own rank
    plain = {k: v for k, v in child.items() if k != "GENFLOW_LOCAL_SUPERVISOR"}
    assert detect("slurm", plain).rank == 1


@pytest.mark.e2e
def test_two_node_launchers_form_one_world(tmp_path):
    """Two launchers as srun starts them on two nodes (SLURM_NODEID 0 and 1), 2 ranks each,
    form one 4-rank world at node 0's address. SIGUSR1 to node 1's launcher alone stops
    all four ranks at one step with a 4-rank checkpoint; both launchers exit 75."""
    run = tmp_path / "run"
    port = free_port()
    procs = []
    for node in range(2):
        env = {
            **launch_env(),
            **STEP,
            "SLURM_NODEID": str(node),
            "SLURM_PROCID": str(node),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [sys.executable, "-m", "trainer.launch", str(RECIPE), f"run.output_dir={run}"]
        cmd += ["run.max_steps=100000", "train.log_every=1", "checkpoint.every=100000", *QUIET]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < 3:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no progress"
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGUSR1)
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], "\n".join(e[-3000:] for e in errs)
    assert f"node 1 of 2: ranks 2..3 of 4, rendezvous 127.0.0.1:{port}" in errs[1]
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{steps[-1]:08d}" and steps == list(range(1, steps[-1] + 1))
    ckpt = run / "checkpoints" / latest
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 4
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == [f"rank_0000{r}.pt" for r in range(4)]


# ---------------------------------------------------------------- on a real SLURM cluster
@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = start_slurm()
    except SlurmUnavailable as err:
        pytest.skip(f"no SLURM: {err}")
    yield cluster
    cluster.stop()


def _submit(slurm, run: Path, *args: str) -> str:
    env = {**launch_env(), **slurm.env}
    cmd = [sys.executable, "-m", "cluster.slurm", "submit", str(RECIPE), f"run.output_dir={run}"]
    proc = subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert job_id.isdigit() and (run / "slurm" / "jobs.txt").read_text().startswith(job_id)
    return job_id


def _job_log(run: Path, job_id: str) -> str:
    path = run / "slurm" / f"{job_id}.out"
    return path.read_text() if path.exists() else "(no log yet)"


def _wait_for_step(slurm, run: Path, job_id: str, step: int, timeout: float = 150) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists():
            steps = [r["step"] for r in read_metrics(run) if "loss" in r]
            if steps and steps[-1] >= step:
                return steps[-1]
        state = slurm.job(job_id)["JobState"]
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            raise AssertionError(f"job ended ({state}) early:\n{_job_log(run, job_id)}")
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout}s:\n{_job_log(run, job_id)}")


def _complete_checkpoint(run: Path) -> int:
    step = int((run / "checkpoints" / "latest").read_text().strip()[5:])
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    for name in ("meta.json", ".metadata", "rank_00000.pt", "rank_00001.pt", "trainer.pt"):
        assert (ckpt / name).exists(), name
    return step


@pytest.mark.e2e
def test_sbatch_rejection_shows_its_reason(slurm, tmp_path):
    env = {**launch_env(), **slurm.env}
    cmd = [sys.executable, "-m", "cluster.slurm", "submit", str(RECIPE), "--nodes=1"]
    cmd += ["--partition=nosuch", f"run.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "sbatch rejected" in proc.stderr and "invalid partition" in proc.stderr.lower()


@pytest.mark.e2e
def test_job_trains_to_the_end(slurm, tmp_path):
    """1 node x 2 ranks through sbatch -> srun -> node launcher: metrics to max_steps and a
    complete final checkpoint; the log shows the node launcher's rank layout."""
    run = tmp_path / "run"
    job_id = _submit(slurm, run, "--nodes=1", "--procs-per-node=2", "train.log_every=5", *QUIET)
    info = slurm.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=180)
    log = _job_log(run, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log + slurm.logs()
    assert "node 0 of 1: ranks 0..1 of 2" in log and "training finished" in log
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [5, 10, 15, 20]
    assert _complete_checkpoint(run) == 20
    meta = json.loads((run / "checkpoints" / "step_00000020" / "meta.json").read_text())
    assert meta["world_size"] == 2


@pytest.mark.e2e
def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    """USR1 to the job's processes (scancel --signal), then to the batch shell only (what
    --signal=B:USR1@lead delivers before the time limit, passed on by the script's trap):
    each time every rank checkpoints and exits 75, the script requeues, the requeued job
    resumes from that checkpoint. No step is trained twice; the run reaches max_steps."""
    run = tmp_path / "run"
    max_steps = 150
    job_id = _submit(
        slurm,
        run,
        "--nodes=1",
        "--procs-per-node=2",
        f"run.max_steps={max_steps}",
        "train.log_every=1",
        "checkpoint.every=1000",
        *QUIET,
    )
    _wait_for_step(slurm, run, job_id, 3)
    slurm.run("scancel", "--signal=USR1", job_id)
    slurm.wait_for(job_id, {"PENDING"}, timeout=120)
    first = _complete_checkpoint(run)
    assert 3 <= first < max_steps

    _wait_for_step(slurm, run, job_id, first + 3)
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    info = slurm.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=240)
    log = _job_log(run, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log + slurm.logs()
    assert log.count("requeueing job") == 2 and "SIGUSR1: asking every rank" in log
    resumed = [
        int(s) for s in re.findall(r"resumed from step (\d+)", (run / "train.log").read_text())
    ]
    assert resumed[0] == first and first < resumed[1] < max_steps, resumed
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == list(range(1, max_steps + 1))  # each step once, in order
    assert _complete_checkpoint(run) == max_steps


@pytest.mark.e2e
def test_scancel_checkpoints_but_is_not_requeued(slurm, tmp_path):
    """A plain scancel (SIGTERM to everything) still gets a checkpoint, but the job stays
    cancelled: the script must not requeue a job Slurm is ending."""
    run = tmp_path / "run"
    args = ("--nodes=1", "--procs-per-node=2", "run.max_steps=100000", "checkpoint.every=100000")
    job_id = _submit(slurm, run, *args, "train.log_every=1", *QUIET)
    _wait_for_step(slurm, run, job_id, 3)
    slurm.run("scancel", job_id)
    deadline = time.time() + 120  # the batch shell decides after srun returns
    while not re.search(r"(not )?requeueing", _job_log(run, job_id)) and time.time() < deadline:
        time.sleep(0.5)
    log = _job_log(run, job_id)
    info = slurm.wait_for(job_id, {"CANCELLED"}, timeout=60)
    assert info["Restarts"] == "0" and "not requeueing" in log, log
    assert "requeueing job" not in log
    assert _complete_checkpoint(run) >= 3
