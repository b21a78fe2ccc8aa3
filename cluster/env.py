"""Where am I running? Turn torchrun / SLURM / plain-local environments into one DistEnv."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    kind: str  # "single" | "torchrun" | "slurm" | "local-parent"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = ""
    master_port: int = 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def detect(launcher: str = "auto", environ: dict[str, str] | None = None) -> DistEnv:
    """Read the environment; ``launcher`` forces a kind instead of auto-detection."""
    env = os.environ if environ is None else environ
    has_torchrun = "RANK" in env and "WORLD_SIZE" in env
    has_slurm = (
        "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env.get("SLURM_NTASKS", "1")) > 1
    )
    # a rank started by trainer.launch's supervisor (locally or one per SLURM node) always
    # reads RANK / WORLD_SIZE: the SLURM_* variables it inherits describe its node's launcher
    supervised = env.get("GENFLOW_LOCAL_SUPERVISOR") == "1" and has_torchrun
    if launcher == "torchrun" or (launcher == "auto" and has_torchrun) or supervised:
        if not has_torchrun:
            raise RuntimeError("cluster.launcher is 'torchrun' but RANK / WORLD_SIZE are not set")
        return DistEnv(
            "torchrun",
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if launcher == "slurm" or (launcher == "auto" and has_slurm):
        if "SLURM_PROCID" not in env:
            raise RuntimeError(
                "cluster.launcher is 'slurm' but SLURM_PROCID is not set (run under srun)"
            )
        return DistEnv(
            "slurm",
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=int(
                env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_GPUS_ON_NODE", "1")).split("(")[0]
            ),
            master_addr=_slurm_master_addr(env),
            master_port=_slurm_master_port(env),
        )
    return DistEnv("single")


def _slurm_master_addr(env) -> str:
    return env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))


def _slurm_master_port(env) -> int:
    # the same rule as cluster/slurm.py's batch script: every node derives the same port
    return int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


@dataclass(frozen=True)
class SlurmNode:
    """This node's place in a SLURM job step that runs one launcher per node."""

    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int


def slurm_node(launcher: str = "auto", environ: dict[str, str] | None = None) -> SlurmNode | None:
    """The node's place when this process is the one task of an ``srun`` step on its node
    (cluster/slurm.py's batch script), else None. Such a launcher starts ``cluster.num_workers``
    ranks on its node: global rank = node_rank * num_workers + local rank."""
    env = os.environ if environ is None else environ
    if launcher not in ("auto", "slurm") or env.get("GENFLOW_LOCAL_SUPERVISOR") == "1":
        return None
    if "SLURM_STEP_ID" not in env or "SLURM_NODEID" not in env:
        return None  # not inside an srun step (e.g. the batch shell itself)
    num_nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
    num_tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if num_tasks != num_nodes:
        return None  # one task per rank: detect() reads SLURM_PROCID / SLURM_NTASKS instead
    return SlurmNode(
        node_rank=int(env["SLURM_NODEID"]),
        num_nodes=num_nodes,
        master_addr=_slurm_master_addr(env),
        master_port=_slurm_master_port(env),
    )
