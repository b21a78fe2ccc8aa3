"""Process-group setup for one rank, whatever started it."""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from cluster.env import DistEnv

# The optimizer step this rank is working on (training it or saving its checkpoint), set by
# the training loop each step so that a collective timeout can say where it happened. None
# during setup and resume.
current_step: int | None = None


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("cluster.device is 'cuda' but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(env: DistEnv, device: torch.device, timeout_s: int) -> None:
    """Join the process group (a private in-memory one for a single process)."""
    if dist.is_initialized():
        return
    # On GPUs, CPU tensors (flags, checkpoint bookkeeping) still need a backend: gloo.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.world_size == 1 and not env.master_addr:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
        return
    os.environ.setdefault("MASTER_ADDR", env.master_addr or "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )


def report_timeout(err: BaseException, rank: int, timeout_s: int) -> str | None:
    """One line for a collective or rendezvous that outlived ``cluster.timeout_s`` (its
    traceback goes to the rank's log files only); None when ``err`` is anything else.

    gloo raises a plain RuntimeError ("Timed out waiting 10000ms for recv operation"), the
    store a DistStoreError ("wait timeout"), nccl (blocking wait) a DistBackendError; so the
    test is on the text, restricted to errors that come from torch.distributed.
    """
    text = str(err).lower()
    timed_out = "timed out" in text or "timeout" in text
    from_dist = isinstance(err, dist.DistError) or "gloo" in text or "nccl" in text
    if not (isinstance(err, RuntimeError) and timed_out and from_dist):
        return None
    logging.getLogger("trainer").info("collective timeout", exc_info=err)
    where = "during setup" if current_step is None else f"at step {current_step}"
    return (
        f"rank {rank}: a collective did not complete within cluster.timeout_s={timeout_s}s "
        f"{where}: another rank is hung, stopped or dead; exiting so the job can be restarted "
        "(it resumes from the latest checkpoint)"
    )


def all_mean(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when the flag is true on any rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_nanmean(sums: dict[str, list[float]], device: torch.device) -> dict[str, float]:
    """{key: [sum, count]} per rank -> {key: global mean, NaN where no rank had data}.

    One collective for all keys; every rank must pass the same keys (objectives report
    a fixed key set and use NaN for "no data").
    """
    keys = sorted(sums)
    if not keys:
        return {}
    t = torch.tensor([[sums[k][0], sums[k][1]] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return {
        k: (float(t[i, 0] / t[i, 1]) if t[i, 1] > 0 else float("nan")) for i, k in enumerate(keys)
    }
