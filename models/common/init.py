"""Weight initialisation that gives the same weights whatever the sharding.

Each parameter draws from its own generator, seeded by (run seed, parameter name), on a
full-size CPU tensor; a sharded (DTensor) parameter then keeps its local slice. So a
model initialised on 1 rank, on 8 ranks, or unsharded for a reference check is the same
model, and the order in which a family initialises its parameters does not matter.
Only one full parameter exists at a time, so this scales to multi-billion models.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
from torch import nn


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


class ParamInit:
    """Initialisers over named parameters of ``model`` (sharded or not)."""

    def __init__(self, model: nn.Module, seed: int):
        self.seed = seed
        self.names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}

    def _fill(self, param: torch.Tensor, make: Callable[[torch.Generator], torch.Tensor]) -> None:
        name = self.names[id(param)]
        gen = torch.Generator(device="cpu").manual_seed(_param_seed(self.seed, name))
        full = make(gen).to(dtype=param.dtype)
        assert tuple(full.shape) == tuple(param.shape), (name, full.shape, param.shape)
        with torch.no_grad():
            try:
                from torch.distributed.tensor import DTensor, distribute_tensor
            except ImportError:  # pragma: no cover - torch without distributed
                DTensor = ()  # noqa: N806
            if isinstance(param, DTensor):
                local = distribute_tensor(
                    full.to(param.device), param.device_mesh, param.placements, src_data_rank=None
                ).to_local()
                param.to_local().copy_(local)
            else:
                param.copy_(full.to(param.device))

    def normal_(self, param: torch.Tensor, std: float, mean: float = 0.0) -> None:
        self._fill(param, lambda g: torch.randn(param.shape, generator=g) * std + mean)

    def uniform_(self, param: torch.Tensor, low: float, high: float) -> None:
        self._fill(param, lambda g: torch.rand(param.shape, generator=g) * (high - low) + low)

    def trunc_normal_(self, param: torch.Tensor, std: float) -> None:
        self._fill(
            param, lambda g: (torch.randn(param.shape, generator=g) * std).clamp_(-2 * std, 2 * std)
        )

    def zeros_(self, param: torch.Tensor) -> None:
        self._fill(param, lambda g: torch.zeros(param.shape))

    def ones_(self, param: torch.Tensor) -> None:
        self._fill(param, lambda g: torch.ones(param.shape))

    def xavier_uniform_(self, param: torch.Tensor, parts: int = 1) -> None:
        """Xavier-uniform; ``parts`` > 1 for a fused projection of that many matrices stacked
        along dim 0 (e.g. q/k/v), each initialised as if it were its own matrix."""
        fan_out, fan_in = param.shape[0] // parts, math.prod(param.shape[1:])
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        self.uniform_(param, -bound, bound)

    def linear_(self, layer: nn.Linear, std: float | None = None) -> None:
        """Normal(std) weights (default: xavier-uniform) and zero bias."""
        if std is None:
            self.xavier_uniform_(layer.weight)
        else:
            self.normal_(layer.weight, std)
        if layer.bias is not None:
            self.zeros_(layer.bias)

    def layer_norm_(self, norm: nn.Module) -> None:
        if getattr(norm, "weight", None) is not None:
            self.ones_(norm.weight)
        if getattr(norm, "bias", None) is not None:
            self.zeros_(norm.bias)

    def own_init_(self, model: nn.Module, *kinds: type[nn.Module]) -> None:
        """Every module of ``kinds`` in ``model`` initialised by its own ``init_(self)``
        (the shared blocks know their initialisation: e.g. fused q/k/v, adaLN-zero)."""
        for module in model.modules():
            if isinstance(module, kinds):
                module.init_(self)

    def torch_defaults_(self, model: nn.Module, norms: tuple[type[nn.Module], ...]) -> None:
        """PyTorch's own default for every conv and Linear (weight and bias uniform within
        1 / sqrt(fan_in)) and ``layer_norm_`` for every module of ``norms``; BatchNorm
        running statistics start fresh (the conv autoencoders' initialisation)."""
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                bound = 1.0 / math.sqrt(math.prod(module.weight.shape[1:]))
                self.uniform_(module.weight, -bound, bound)
                if module.bias is not None:
                    self.uniform_(module.bias, -bound, bound)
            elif isinstance(module, norms):
                self.layer_norm_(module)
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()

    def defaults_(self, model: nn.Module) -> None:
        """Every Linear as ``linear_`` (xavier-uniform, zero bias), every LayerNorm /
        RMSNorm as ``layer_norm_``; families then override the special cases (a later
        fill replaces an earlier one; each parameter's values depend only on its name)."""
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self.linear_(module)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                self.layer_norm_(module)
