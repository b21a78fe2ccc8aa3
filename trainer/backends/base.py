"""What the training loop asks of a parallelism engine.

The loop (trainer.loop) owns the shape of a step: batches, phases, logging, the EMA's
cadence, when to checkpoint. A backend owns everything that depends on the engine:
materialising and wrapping the model and the objective's extra modules, their torch
optimizers (the LR schedulers drive their param groups), backward with gradient
accumulation, clipping and the optimizer step, skipped on every rank when the loss or
the gradient norm is not finite, where the EMA lives, and how the sharded state is
written into and read from a checkpoint step directory (``shards``, used by
trainer.checkpoint.CheckpointManager).

Backends: ``fsdp2`` and ``none`` (trainer.backends.fsdp), ``deepspeed``
(trainer.backends.deepspeed_backend).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from models.common.parallelize import ParallelPlan
from trainer.config import OptimizerConfig, ParallelConfig
from trainer.warm_start import Start, apply_trainable, check_fits, load_into


def make_optimizer(params, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = cfg.fused if cfg.fused is not None else device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused,
    )


def parallel_plan(parallel: ParallelConfig) -> ParallelPlan:
    return ParallelPlan(
        backend=parallel.backend,
        param_dtype=parallel.mixed_precision,
        reduce_dtype=parallel.reduce_dtype,
        reshard_after_forward=parallel.reshard_after_forward,
        activation_checkpointing=parallel.activation_checkpointing,
        compile=parallel.compile,
    )


def build_initialised(
    family, model_cfg: Any, plan: ParallelPlan, mesh, device: torch.device, start: Start
) -> nn.Module:
    """Build on meta, freeze what ``start.trainable`` leaves out, parallelize (shard /
    checkpoint / compile), materialise, initialise, then load ``start.state`` if given.

    ``init_weights`` draws each parameter from a generator seeded by its name, so the
    weights are the same under every backend and world size.
    """
    with torch.device("meta"):
        model = family.build(model_cfg)
    if start.state is not None:
        check_fits(model, start.state, start.source)
    start.frozen = apply_trainable(model, start.trainable)  # before sharding: plain names
    model = family.parallelize(model, plan, mesh)
    model.to_empty(device=device)
    model.init_weights(start.seed)
    if start.state is not None:
        load_into(model, start.state)
    return model


class Backend(ABC):
    """One rank's view of the engine; every method is called on every rank."""

    def __init__(
        self,
        parallel: ParallelConfig,
        *,
        device: torch.device,
        rank: int,
        world_size: int,
        grad_clip: float | None,
    ):
        self.parallel = parallel
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.grad_clip = grad_clip
        self.modules: dict[str, nn.Module] = {}  # as objectives call them
        self.optimizers: dict[str, torch.optim.Optimizer] = {}  # the LR lives in their groups
        self.flops_per_sample: float | None = None
        self.shards: Any = None  # checkpoint writer/reader of the sharded state; None: DCP

    def expect_resume(self, meta: dict[str, Any] | None) -> None:  # noqa: B027 - most need none
        """Called before ``build_model`` with the completion record (meta.json) of the
        checkpoint the run will resume from, or None (an engine may have to be built for
        the checkpoint it loads)."""

    @abstractmethod
    def build_model(
        self, family, model_cfg: Any, opt_cfg: OptimizerConfig, start: Start
    ) -> nn.Module:
        """Build, initialise (or load ``start.state``) and wrap the model, frozen outside
        ``start.trainable``; registers it as modules['model']."""

    @abstractmethod
    def add_module(self, name: str, extra, opt_cfg: OptimizerConfig) -> nn.Module:
        """Place an objective's extra module (trainable: with its own optimizer)."""

    @abstractmethod
    def make_ema(self, decay: float):
        """An EMA of the model's trainable weights (copy_from_model, update, swapped_in)."""

    def autocast(self):
        return contextlib.nullcontext()

    @abstractmethod
    def begin_phase(self, name: str) -> dict[str, nn.Module]:
        """Before the micro-batches of a phase that updates modules[name]; returns the
        modules the objective uses in this phase."""

    @abstractmethod
    def backward(self, name: str, loss: torch.Tensor, index: int, count: int) -> None:
        """Backward of micro-batch ``index`` of ``count``; gradients average over them."""

    @abstractmethod
    def finish_phase(self, name: str, loss_finite: bool) -> tuple[float, bool]:
        """Clip and step modules[name] unless anything is non-finite on any rank.

        ``loss_finite``: the loss averaged over ranks is finite. Returns (gradient norm
        before clipping, whether the update was applied).
        """

    def reshard(self) -> None:  # noqa: B027 - nothing to do where nothing stays gathered
        """Return modules to their sharded state after forwards outside training steps."""

    @abstractmethod
    def checkpoint_state(self, ema) -> Any:
        """What ``shards`` saves and loads in place."""

    def restore(self, state: Any) -> None:  # noqa: B027 - in-place loading is enough
        """Apply a state that ``shards.load`` filled in place (when that is not enough)."""

    @abstractmethod
    def num_params(self) -> int:
        """Parameters of the model (all of them, not this rank's part)."""
