"""FSDP2 (and the unsharded single-process ``none``): per-block ``fully_shard``, DTensor
EMA shadows, DCP checkpoints that reshard on load."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from models.common.context_parallel import enable_context_parallel
from trainer.backends.base import Backend, build_initialised, make_optimizer, parallel_plan
from trainer.config import OptimizerConfig
from trainer.ema import EMA
from trainer.warm_start import Start

log = logging.getLogger("trainer")


class FSDPBackend(Backend):
    def __init__(self, parallel, **kwargs):
        super().__init__(parallel, **kwargs)
        self.mesh = None
        self.context_group = None
        if parallel.backend == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh

            # FSDP2 shards over every rank (the flattened dp x cp mesh, as torchtitan's
            # dp_shard_cp); the cp axis of the 2-D mesh is the group a sample's tokens
            # are split over (context_parallel ranks in a row)
            self.mesh = init_device_mesh(self.device.type, (self.world_size,))
            cp = parallel.context_parallel
            if cp > 1:
                mesh_2d = init_device_mesh(
                    self.device.type, (self.world_size // cp, cp), mesh_dim_names=("dp", "cp")
                )
                self.context_group = mesh_2d.get_group("cp")

    # ------------------------------------------------------------------------- build
    def build_model(self, family, model_cfg, opt_cfg: OptimizerConfig, start: Start) -> nn.Module:
        model = build_initialised(
            family, model_cfg, parallel_plan(self.parallel), self.mesh, self.device, start
        )
        if self.context_group is not None:
            enable_context_parallel(model, self.context_group)
        if self.parallel.backend == "none" and self.parallel.mixed_precision != "fp32":
            log.info("parallel.backend 'none': mixed precision through autocast")
        self.flops_per_sample = getattr(model, "flops_per_sample", lambda: None)()
        self.modules["model"] = model
        self.optimizers["model"] = make_optimizer(model.parameters(), opt_cfg, self.device)
        return model

    def add_module(self, name: str, extra, opt_cfg: OptimizerConfig) -> nn.Module:
        module = extra.module.to(self.device)
        if extra.trainable:
            if self.parallel.backend == "fsdp2":
                from torch.distributed.fsdp import fully_shard

                fully_shard(module, mesh=self.mesh)
            self.optimizers[name] = make_optimizer(module.parameters(), opt_cfg, self.device)
        else:
            module.requires_grad_(False).eval()
            if self.parallel.backend == "fsdp2" and hasattr(module, "shard_for"):
                module.shard_for(self.mesh)  # large frozen encoders: sharded like the model
        self.modules[name] = module
        return module

    def make_ema(self, decay: float) -> EMA:
        return EMA(self.modules["model"], decay)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.modules["model"].parameters())

    # ------------------------------------------------------------------------- steps
    def autocast(self):
        p = self.parallel
        if p.backend == "none" and p.mixed_precision != "fp32":
            from models.common.parallelize import DTYPES

            return torch.autocast(self.device.type, dtype=DTYPES[p.mixed_precision])
        return super().autocast()

    def begin_phase(self, name: str) -> dict[str, nn.Module]:
        self.optimizers[name].zero_grad(set_to_none=True)
        return self.modules

    def backward(self, name: str, loss: torch.Tensor, index: int, count: int) -> None:
        module = self.modules[name]
        if hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(index == count - 1)  # reduce once, at the end
        (loss / count).backward()

    def finish_phase(self, name: str, loss_finite: bool) -> tuple[float, bool]:
        module, opt = self.modules[name], self.optimizers[name]
        clip = self.grad_clip if self.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in module.parameters() if p.grad is not None], clip
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        applied = loss_finite and bool(torch.isfinite(grad_norm))
        if applied:
            opt.step()
        else:
            opt.zero_grad(set_to_none=True)
        return float(grad_norm), applied

    def reshard(self) -> None:
        """Return every FSDP2 module to its sharded state.

        A forward under no_grad (a critic scoring generator samples, evaluation) leaves
        modules with reshard_after_forward=False unsharded; EMA updates, checkpoints and
        the memory budget all expect sharded parameters between steps.
        """
        if self.parallel.backend != "fsdp2":
            return
        from torch.distributed.fsdp import FSDPModule

        for module in self.modules.values():
            for sub in module.modules():
                if isinstance(sub, FSDPModule):
                    sub.reshard()

    # ------------------------------------------------------------------- checkpoints
    def checkpoint_state(self, ema) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        model = self.modules["model"]
        state: dict[str, Any] = {"model": get_model_state_dict(model), "optim": {}}
        for name, opt in self.optimizers.items():
            state["optim"][name] = get_optimizer_state_dict(self.modules[name], opt)
        for name, module in self.modules.items():
            if name != "model" and name in self.optimizers:
                state[f"module_{name}"] = get_model_state_dict(module)
        if ema is not None:
            state["ema"] = ema.state_dict()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(self.modules["model"], state["model"])
        for name, opt in self.optimizers.items():
            if name != "model":
                set_model_state_dict(self.modules[name], state[f"module_{name}"])
            set_optimizer_state_dict(self.modules[name], opt, state["optim"][name])
