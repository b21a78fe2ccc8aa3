"""Size presets are plain data next to each model; a config's explicit fields win."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def resolve_preset(presets: dict[str, dict[str, int]], size: str, config: Any) -> dict[str, int]:
    """The preset's dimensions, each replaced by the config's field of that name when set."""
    dims = dict(presets[size])
    for key in dims:
        if getattr(config, key) is not None:
            dims[key] = getattr(config, key)
    return dims


def count_params_on_meta(build: Callable[[Any], nn.Module], config: Any) -> int:
    """Parameters of ``build(config)``, built on the meta device (no memory, any size)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build(config).parameters())
