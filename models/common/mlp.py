"""The transformer MLP shared by the families: Linear -> GELU (tanh) -> Linear.

Attribute names ``fc1`` / ``fc2`` are part of the state-dict keys (checkpoints and the
diffusers adapter depend on them). Shapes: B batch, N tokens, D width, F hidden width.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FeedForward(nn.Module):
    """D -> F -> D with the tanh-approximated GELU (SD3 / DiT / GPT-2's choice)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BND), approximate="tanh"))
