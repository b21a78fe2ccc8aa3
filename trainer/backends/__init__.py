"""Parallelism engines behind the training loop (see trainer.backends.base)."""

from __future__ import annotations

from typing import Any

import torch

from trainer.backends.base import Backend
from trainer.config import ParallelConfig


def _deepspeed_passthrough(extras: dict[str, Any]) -> list[tuple[str, str]]:
    from trainer.backends.deepspeed_backend import check_passthrough

    return check_passthrough(extras)


# the config check asks each backend about its own pass-through keys
ParallelConfig.PASSTHROUGH_CHECKS["deepspeed"] = _deepspeed_passthrough


def make_backend(
    parallel: ParallelConfig,
    *,
    grad_clip: float | None,
    device: torch.device,
    rank: int,
    world_size: int,
    micro_batch: int,
    accum_steps: int,
    local_rank: int = 0,
) -> Backend:
    """The backend ``parallel.backend`` names; DeepSpeed is imported only when chosen."""
    common = dict(device=device, rank=rank, world_size=world_size, grad_clip=grad_clip)
    if parallel.backend == "deepspeed":
        from trainer.backends.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(
            parallel,
            micro_batch=micro_batch,
            accum_steps=accum_steps,
            local_rank=local_rank,
            **common,
        )
    from trainer.backends.fsdp import FSDPBackend

    return FSDPBackend(parallel, **common)
