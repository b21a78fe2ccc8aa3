"""Exponential moving average of weights, sharded exactly like the model.

The shadow copy holds one tensor per parameter with the parameter's own type: under
FSDP2 each shadow is a DTensor with the same placement, so every rank keeps only its
shard and nothing is ever gathered whole. Updates work on the local shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = {n: p.detach().clone() for n, p in self.named}

    @torch.no_grad()
    def copy_from_model(self) -> None:
        for name, param in self.named:
            _local(self.shadow[name]).copy_(_local(param))

    @torch.no_grad()
    def update(self) -> None:
        shadows = [_local(self.shadow[n]) for n, _ in self.named]
        params = [_local(p).to(s.dtype) for (_, p), s in zip(self.named, shadows)]
        torch._foreach_lerp_(shadows, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow  # loaded in place by DCP

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (for evaluation/sampling)."""
        backup = [_local(p).clone() for _, p in self.named]
        for name, param in self.named:
            _local(param).copy_(_local(self.shadow[name]))
        try:
            yield
        finally:
            for (_, param), saved in zip(self.named, backup):
                _local(param).copy_(saved)
