"""``python -m cluster.slurm submit RECIPE.yaml --nodes N [options] [dotted.key=value ...]``

Write a commented sbatch script for a multi-node run to ``<run.output_dir>/slurm/job.sbatch``
and submit it. The job starts one ``trainer.launch`` per node with ``srun``; each one
starts ``--procs-per-node`` ranks (global rank = node_rank * P + local_rank), and all of
them meet at the first node of the allocation. The time-limit warning (``--signal``) or
``scancel --signal=USR1 JOB`` makes every rank checkpoint and exit 75; the script then
requeues the job, and the requeued job resumes from ``latest``.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from configlib import ConfigError
from trainer.signals import EXIT_CONFIG_ERROR, EXIT_FAILED, EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]


class SubmitError(Exception):
    """A problem with the submission itself (not the recipe): one line for the user."""


@dataclass(frozen=True)
class JobSpec:
    """Everything the batch script needs; paths are absolute."""

    recipe: Path
    overrides: list[str]  # the user's, then the ones submit adds (num_workers, output_dir)
    output_dir: Path
    nodes: int
    procs_per_node: int
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    job_name: str = "genflow"
    signal_lead_s: int = 120
    sbatch_args: list[str] = field(default_factory=list)
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)
    repo: Path = REPO

    @property
    def slurm_dir(self) -> Path:
        return self.output_dir / "slurm"

    @property
    def script_path(self) -> Path:
        return self.slurm_dir / "job.sbatch"


def render_script(spec: JobSpec) -> str:
    """The batch script for ``spec``: plain bash, commented for the person who reads it."""
    q = shlex.quote
    world = spec.nodes * spec.procs_per_node
    directives = [
        ("job-name", spec.job_name, None),
        ("nodes", spec.nodes, None),
        ("ntasks-per-node", 1, "one launcher per node; it starts the node's ranks itself"),
        ("gpus-per-node", spec.gpus_per_node or None, None),
        ("cpus-per-task", spec.cpus_per_task, None),
        ("partition", spec.partition, None),
        ("time", spec.time, None),
        ("account", spec.account, None),
        ("qos", spec.qos, None),
        ("mem", spec.mem, None),
        ("requeue", True, "the job may be requeued (by the end of this script, or preemption)"),
        (
            "signal",
            f"B:USR1@{spec.signal_lead_s}",
            f"SIGUSR1 to this shell {spec.signal_lead_s} s before the time limit (trapped below)",
        ),
        ("open-mode", "append", "a requeued job appends to the same log"),
        ("output", spec.slurm_dir / "%j.out", None),
        ("chdir", spec.workdir, None),
    ]
    lines = [
        "#!/bin/bash",
        "# genflow training job, written by `python -m cluster.slurm submit`; submit it again",
        f"# unchanged with: sbatch {spec.script_path}",
        "#",
        f"# recipe:    {spec.recipe}",
        f"# overrides: {' '.join(spec.overrides)}",
        f"# run dir:   {spec.output_dir}",
        f"# ranks:     {spec.nodes} node(s) x {spec.procs_per_node} = {world}",
        "#",
    ]
    for key, value, why in directives:
        if value is None or value is False:
            continue
        if why:
            lines.append(f"# {why}")
        lines.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}")
    if spec.sbatch_args:
        lines.append("# extra arguments given with --sbatch-arg")
        lines += [f"#SBATCH {arg}" for arg in spec.sbatch_args]

    srun = [
        "srun",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
    ]
    # srun does not inherit these from the allocation (SLURM >= 22.05 for cpus-per-task)
    if spec.cpus_per_task:
        srun.append(f"--cpus-per-task={spec.cpus_per_task}")
    if spec.gpus_per_node:
        srun.append(f"--gpus-per-node={spec.gpus_per_node}")
    command = [" ".join(srun), f"{q(spec.python)} -m trainer.launch {q(str(spec.recipe))}"]
    command += [q(override) for override in spec.overrides]
    srun_lines = " \\\n    ".join(command)

    lines += [
        "",
        "set -uo pipefail  # no -e: the exit status of srun is examined below",
        f"export PYTHONPATH={q(str(spec.repo))}${{PYTHONPATH:+:$PYTHONPATH}}",
        "export PYTHONUNBUFFERED=1",
        "",
        "# Rendezvous: global rank 0 runs on the first node of the allocation and serves the",
        "# torch.distributed TCPStore there; every node derives the same port from the job id.",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "export MASTER_ADDR MASTER_PORT",
        'say() { echo "[genflow $(date +%FT%T)] $*"; }',
        'say "job $SLURM_JOB_ID start $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST,'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
        "# SIGUSR1 (the time-limit warning above, or `scancel --batch --signal=USR1 JOB`)",
        "# reaches only this shell: pass it to srun, which signals every process of the step.",
        "# SIGTERM means Slurm itself is ending the job (scancel, time limit, preemption) and",
        "# has signalled the step already: remember it, and stay alive until srun returns.",
        'SRUN_PID=""',
        "TERMINATED=0",
        'trap \'say "SIGUSR1: asking every rank to checkpoint and stop";'
        ' kill -USR1 "$SRUN_PID" 2>/dev/null\' USR1',
        "trap 'say \"SIGTERM: Slurm is ending the job\"; TERMINATED=1' TERM",
        "",
        "# One trainer.launch per node (not torchrun): it starts the node's ranks with",
        "# RANK = SLURM_NODEID * P + local rank, WORLD_SIZE = N * P (cluster.num_workers = P),",
        "# forwards SIGUSR1 / SIGTERM to them, and exits with their code, so 75 (checkpoint",
        "# saved) reaches srun. torchrun's agent dies on SIGUSR1, gives its workers a fixed",
        "# grace period on SIGTERM, and reports any non-zero rank exit as its own failure (1).",
        "# --kill-on-bad-exit=1: one failed node takes the whole step down at once.",
        f"{srun_lines} &",
        "SRUN_PID=$!",
        "# `wait` returns early whenever a trapped signal arrives; bash remembers the status",
        'while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done',
        'wait "$SRUN_PID"',
        "STATUS=$?",
        "",
        "case $STATUS in",
        "  0)",
        '    say "training finished"',
        "    exit 0 ;;",
        f"  {EXIT_PREEMPTED})",
        "    # every rank saved a checkpoint and stopped: run again from it",
        '    if [ "$TERMINATED" = 1 ]; then',
        '      say "checkpoint saved; not requeueing a job Slurm is ending'
        ' (preempted jobs are requeued by Slurm itself)"',
        f"      exit {EXIT_PREEMPTED}",
        "    fi",
        '    say "checkpoint saved; requeueing job $SLURM_JOB_ID to resume from it"',
        '    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi',
        f'    say "scontrol requeue failed; resubmit with: sbatch {spec.script_path}"',
        f"    exit {EXIT_PREEMPTED} ;;",
        "  *)",
        '    say "training failed (exit status $STATUS)"',
        '    exit "$STATUS" ;;',
        "esac",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m cluster.slurm submit", description=__doc__.splitlines()[0]
    )
    if not argv or argv[0] != "submit":
        p.error("the only command is 'submit': python -m cluster.slurm submit RECIPE.yaml ...")
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of recipe fields")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs to request per node")
    p.add_argument(
        "--procs-per-node",
        type=int,
        help="ranks per node (cluster.num_workers); default: --gpus-per-node, or 1 without GPUs",
    )
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node launcher (all its ranks)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", help="time limit, e.g. 2-00:00:00")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--qos", help="SLURM quality of service")
    p.add_argument("--mem", help="memory per node, e.g. 400G")
    p.add_argument("--job-name", help="job name (default: genflow-<recipe name>)")
    p.add_argument(
        "--signal-lead-s",
        type=int,
        default=120,
        help="seconds before the time limit at which ranks checkpoint and the job requeues",
    )
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra #SBATCH line, e.g. --sbatch-arg=--exclusive (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="write the script; do not submit")
    # options and dotted.key=value overrides may come in any order
    return p.parse_intermixed_args(argv[1:])


def build_spec(args: argparse.Namespace) -> JobSpec:
    """Validate the arguments and the recipe (ConfigError / SubmitError) into a JobSpec."""
    for name in ("nodes", "procs_per_node", "cpus_per_task", "signal_lead_s"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SubmitError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    procs = args.procs_per_node or args.gpus_per_node or 1
    if args.gpus_per_node and procs > args.gpus_per_node:
        raise SubmitError(
            f"--procs-per-node {procs} exceeds --gpus-per-node {args.gpus_per_node}:"
            " ranks would share GPUs"
        )
    if any(o.split("=", 1)[0] == "cluster.num_workers" for o in args.overrides):
        raise SubmitError("set ranks per node with --procs-per-node, not cluster.num_workers")
    recipe = Path(args.recipe).resolve()

    from trainer.registry import load_config

    overrides = [*args.overrides, f"cluster.num_workers={procs}"]
    cfg = load_config(recipe, overrides)
    if cfg.cluster.launcher not in ("auto", "slurm"):
        raise SubmitError(
            f"cluster.launcher is {cfg.cluster.launcher!r}; a SLURM job needs 'auto' or 'slurm'"
        )
    output_dir = Path(cfg.run.output_dir).resolve()
    # an absolute run directory: the job's working directory must not matter
    overrides = [o for o in overrides if o.split("=", 1)[0] != "run.output_dir"]
    return JobSpec(
        recipe=recipe,
        overrides=[*overrides, f"run.output_dir={output_dir}"],
        output_dir=output_dir,
        nodes=args.nodes,
        procs_per_node=procs,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        time=args.time,
        account=args.account,
        qos=args.qos,
        mem=args.mem,
        job_name=args.job_name or f"genflow-{recipe.stem}",
        signal_lead_s=args.signal_lead_s,
        sbatch_args=list(args.sbatch_arg),
    )


def write_script(spec: JobSpec) -> Path:
    """Write ``<output_dir>/slurm/job.sbatch`` (complete or not at all); return its path."""
    spec.slurm_dir.mkdir(parents=True, exist_ok=True)
    tmp = spec.script_path.with_suffix(".sbatch.tmp")
    tmp.write_text(render_script(spec))
    tmp.chmod(0o755)
    tmp.replace(spec.script_path)  # never a half-written script under the final name
    return spec.script_path


def sbatch(script: Path) -> str:
    """Submit ``script``; return the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise SubmitError(
            "sbatch not found on PATH: run this on a SLURM login node"
            f" (the script is written: {script}; --dry-run only writes it)"
        )
    proc = subprocess.run([exe, "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        raise SubmitError(f"sbatch rejected {script}: {detail}")
    # --parsable prints "jobid" or "jobid;cluster"
    return proc.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = build_spec(args)
    except (ConfigError, SubmitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    script = write_script(spec)
    if args.dry_run:
        print(script)
        return 0
    try:
        job_id = sbatch(script)
    except SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    with open(spec.slurm_dir / "jobs.txt", "a") as jobs:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        jobs.write(f"{job_id}\t{stamp}\t{script}\n")
    print(job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
