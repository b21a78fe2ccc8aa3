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
    if launcher == "torchrun" or (launcher == "auto" and has_torchrun):
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
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            "slurm",
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=int(
                env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_GPUS_ON_NODE", 1)).split("(")[0]
            ),
            master_addr=env.get("MASTER_ADDR")
            or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
        )
    return DistEnv("single")
