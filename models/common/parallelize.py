"""Apply parallelism to a model built on the meta device, in the order the design asks:
shard each block with FSDP2, then activation checkpointing, then compile; the caller then
materialises (``to_empty``) and initialises. Families only say which modules are blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ParallelPlan:
    """The few parallelism choices a family's parallelize step needs."""

    backend: str = "fsdp2"  # "fsdp2" | "deepspeed" | "none"
    param_dtype: str = "fp32"
    reduce_dtype: str = "fp32"
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    compile: bool = False


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _input_caster(dtype: torch.dtype):
    def cast(value):
        return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value

    def hook(module, args, kwargs):
        from torch.utils._pytree import tree_map

        return tree_map(cast, args), tree_map(cast, kwargs)

    return hook


def apply_parallelism(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    plan: ParallelPlan,
    mesh=None,
    *,
    cast_root_inputs: bool = True,
) -> nn.Module:
    """Shard ``blocks`` and the root with FSDP2 (when asked), then checkpoint, then compile.

    Activation checkpointing and compile wrap each block's ``forward`` in place, so
    parameter names and state-dict keys are the same under every plan.

    With ``cast_root_inputs`` False, FSDP2 leaves the model's own inputs in their dtype
    (blocks still get theirs cast): for a model that casts them itself and must keep
    some in fp32, such as a diffusion time t in [0, 1], which bf16 would round to
    steps of 1/256 near t = 1.
    """
    if plan.backend == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(
            param_dtype=DTYPES[plan.param_dtype], reduce_dtype=DTYPES[plan.reduce_dtype]
        )
        for block in blocks:
            fully_shard(
                block, mesh=mesh, mp_policy=policy, reshard_after_forward=plan.reshard_after_forward
            )
        root_policy = MixedPrecisionPolicy(
            param_dtype=DTYPES[plan.param_dtype],
            reduce_dtype=DTYPES[plan.reduce_dtype],
            cast_forward_inputs=cast_root_inputs,
        )
        # The root's parameters are needed again right after forward (output head) -> keep them.
        fully_shard(model, mesh=mesh, mp_policy=root_policy, reshard_after_forward=False)
    elif plan.backend == "deepspeed":  # its engine partitions later, after initialisation
        if cast_root_inputs and plan.param_dtype != "fp32":
            # DeepSpeed stores bf16/fp16 weights but, unlike FSDP2's policy, leaves inputs as given
            caster = _input_caster(DTYPES[plan.param_dtype])
            model.register_forward_pre_hook(caster, with_kwargs=True)
    elif plan.backend != "none":
        raise ValueError(f"unknown parallel backend {plan.backend!r}")
    if plan.activation_checkpointing:
        for block in blocks:
            block.forward = _checkpointed(block.forward)
    if plan.compile:
        for block in blocks:
            block.forward = torch.compile(block.forward)
    return model


@contextlib.contextmanager
def gathered_for_inference(module: nn.Module):
    """Hold every FSDP2 unit of ``module`` unsharded inside the block.

    Forward passes then run without collectives, so ranks may call the model a different
    number of times (samplers that skip steps where nothing changed, each rank sampling
    its own share). Every rank must enter and leave the block together. Parameters are
    resharded and each unit's reshard-after-forward setting restored on exit.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    reshard_flags = []
    for unit in units:
        group = unit._get_fsdp_state()._fsdp_param_group
        reshard_flags.append(group is not None and group.post_forward_mesh_info is not None)
        unit.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield module
    finally:
        for unit, flag in zip(units, reshard_flags, strict=True):
            unit.set_reshard_after_forward(flag)
            unit.reshard()


def parallelize_blocks_keeping_input_dtypes(model: nn.Module, plan: ParallelPlan, mesh=None):
    """:func:`apply_parallelism` over ``model.blocks`` with the root's inputs left in their
    dtype: the parallelize step of a transformer whose forward casts its own inputs and
    keeps its diffusion time / noise level in fp32 for the sinusoids (bf16 would round it)."""
    return apply_parallelism(model, list(model.blocks), plan, mesh, cast_root_inputs=False)
