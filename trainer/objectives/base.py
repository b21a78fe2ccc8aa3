"""What the training loop needs from an objective.

The loop owns optimisation; the objective owns the maths. An objective may declare
*phases*: each phase updates one trainable module group with its own optimizer, every
``every`` steps (e.g. a GAN discriminator, DMD2's fake-score network). It may also own
frozen companion modules (text encoders, teachers, a DPO reference, a REPA target).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


def sample_seed(seed: int, step: int, index: int) -> int:
    """A per-(step, sample) seed; distinct streams for distinct arguments."""
    return (seed * 0x9E3779B1 + step * 0x85EBCA77 + index * 0xC2B2AE3D) % (2**63 - 1)


@dataclass(frozen=True)
class Phase:
    """One optimisation phase: which trainable module it updates and how often."""

    name: str
    module: str = "model"
    every: int = 1


@dataclass
class ExtraModule:
    """A module the objective brings besides the model.

    Trainable ones get their own AdamW (``lr`` etc. from ``optimizer``) and are sharded
    like the model; frozen ones are moved to the device and never receive gradients.
    """

    module: nn.Module
    trainable: bool
    optimizer: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalContext:
    """What an evaluation may use: the (EMA) modules, the data source, where to write."""

    modules: dict[str, nn.Module]
    data: Any
    out_dir: Path | None
    step: int
    num_samples: int
    sample_steps: int
    device: torch.device
    rank: int
    world_size: int
    guidance: float = 1.0
    text_checks: tuple[str, ...] = ()  # language models: checks of decoded samples
    gen_ppl_run: str | None = None  # language models: AR run that scores samples
    # another run's (model, objective) on this device, from its run dir; the loop passes
    # trainer.sample's loader (an objective never imports the layer that runs it)
    load_run: Callable[[str], tuple[nn.Module, Objective]] | None = None


class Objective(ABC):
    """Base class: single phase on the model, no extra modules, no evaluation."""

    def phases(self) -> list[Phase]:
        return [Phase("model")]

    def extra_modules(self) -> dict[str, ExtraModule]:
        return {}

    def model_problems(self, model_cfg: Any) -> list[str]:
        """What makes the recipe's ``model`` section unfit for this objective (checked once
        the objective is built, before any data is read): one line per problem."""
        return []

    @abstractmethod
    def loss(
        self, phase: str, modules: dict[str, nn.Module], batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, logs) for one micro-batch of ``phase``; every objective defines it."""

    def condition(
        self, modules: dict[str, nn.Module], batch: dict[str, Any], *, training: bool, step: int = 0
    ) -> dict[str, torch.Tensor] | None:
        """Conditioning for the network, or None for unconditional models.

        When the objective owns a frozen ``conditioner`` module (text encoders and their
        assembly), it turns the batch (captions, or precomputed embeddings) into the
        network's ``cond`` dict; with ``training`` it also applies the per-encoder
        condition dropout used for classifier-free guidance, drawn from (step, sample).
        """
        conditioner = modules.get("conditioner")
        if conditioner is None:
            return None
        return conditioner(batch, training=training, step=step)

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless by default
        """Restore what ``state_dict`` returned; objectives without state keep nothing."""
