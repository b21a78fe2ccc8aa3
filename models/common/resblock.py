"""The autoencoders' residual block: norm-SiLU-conv twice, plus the input (through a
kernel-1 conv when the widths differ).

The KL-VAE builds it from 2-D convs and GroupNorm, the causal video VAE from causal 3-D
convs and per-frame GroupNorm. Attribute names ``norm1`` / ``conv1`` / ``norm2`` /
``conv2`` / ``skip`` are part of the state-dict keys (checkpoints and the diffusers
mapping depend on them), and the construction order fixes seeded inits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

Factory = Callable[[int, int], nn.Module]


class ResBlock(nn.Module):
    """``norm(c)`` makes a norm over c channels, ``conv(cin, cout)`` the block's convs,
    ``skip(cin, cout)`` the kernel-1 projection used when cin != cout."""

    def __init__(self, cin: int, cout: int, *, norm: Callable[[int], nn.Module],
                 conv: Factory, skip: Factory):  # fmt: skip
        super().__init__()
        self.norm1, self.conv1 = norm(cin), conv(cin, cout)
        self.norm2, self.conv2 = norm(cout), conv(cout, cout)
        self.skip = skip(cin, cout) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h
