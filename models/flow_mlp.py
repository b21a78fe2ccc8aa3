"""A small time-conditioned residual MLP: the velocity/score network of the 2-D test model.

Shapes: B batch, D data dimension, H hidden width, E time-embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from configlib import option
from models.common.embeddings import timestep_embedding
from models.common.init import ParamInit
from models.common.parallelize import ParallelPlan, apply_parallelism
from models.common.presets import resolve_preset

PRESETS = {
    "tiny": {"hidden_dim": 128, "num_blocks": 3, "time_embed_dim": 64},
    "small": {"hidden_dim": 512, "num_blocks": 6, "time_embed_dim": 128},
    "100m": {"hidden_dim": 1536, "num_blocks": 10, "time_embed_dim": 256},
}


@dataclass
class FlowMLPConfig:
    name: str = option("flow_mlp", "Model family.")
    size: str = option(
        "tiny", "Size preset (hidden_dim, num_blocks, time_embed_dim).", choices=PRESETS
    )
    data_dim: int = option(2, "Dimension of each data point.", ge=1)
    hidden_dim: int | None = option(
        None, "Width of the residual stream; overrides the preset.", ge=8
    )
    num_blocks: int | None = option(None, "Residual blocks; overrides the preset.", ge=1)
    time_embed_dim: int | None = option(
        None, "Width of the sinusoidal time embedding; overrides the preset.", ge=4
    )

    def resolved(self) -> dict[str, int]:
        return resolve_preset(PRESETS, self.size, self)


class ResidualBlock(nn.Module):
    """LayerNorm -> (1 + scale, shift) time modulation -> MLP, added to the stream."""

    def __init__(self, hidden_dim: int, time_embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False)
        self.modulation = nn.Linear(time_embed_dim, 2 * hidden_dim)
        self.fc1 = nn.Linear(hidden_dim, 2 * hidden_dim)
        self.fc2 = nn.Linear(2 * hidden_dim, hidden_dim)

    def forward(self, h_BH: torch.Tensor, temb_BE: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(temb_BE).chunk(2, dim=-1)
        x = self.norm(h_BH) * (1 + scale) + shift
        return h_BH + self.fc2(torch.nn.functional.silu(self.fc1(x)))


class FlowMLP(nn.Module):
    def __init__(self, cfg: FlowMLPConfig):
        super().__init__()
        dims = cfg.resolved()
        self.data_dim = cfg.data_dim
        self.time_embed_dim = dims["time_embed_dim"]
        hidden = dims["hidden_dim"]
        self.time_mlp = nn.Sequential(
            nn.Linear(self.time_embed_dim, self.time_embed_dim),
            nn.SiLU(),
            nn.Linear(self.time_embed_dim, self.time_embed_dim),
        )
        self.in_proj = nn.Linear(cfg.data_dim, hidden)
        self.blocks = nn.ModuleList(
            ResidualBlock(hidden, self.time_embed_dim) for _ in range(dims["num_blocks"])
        )
        self.out_norm = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, cfg.data_dim)

    def forward(self, x: torch.Tensor, t_B: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        """x: (B, D) points, or (B, ...) images flattened to D = prod(...) and reshaped back."""
        x_BD = x.reshape(x.shape[0], -1)
        temb = self.time_mlp(timestep_embedding(t_B, self.time_embed_dim).to(x_BD.dtype))
        h = self.in_proj(x_BD)
        for block in self.blocks:
            h = block(h, temb)
        out = self.out_proj(self.out_norm(h))
        # a fresh tensor, not a view: FSDP2 hooks the module output for backward
        return out if x.dim() == 2 else out.reshape(x.shape).clone()

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        init = ParamInit(self, seed)
        init.defaults_(self)
        for block in self.blocks:  # start each block near identity
            init.zeros_(block.fc2.weight)
            init.zeros_(block.modulation.weight)

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample: 2 (mul+add) x 3 (forward + 2x backward) per weight."""
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * matmul_params


def build(cfg: FlowMLPConfig) -> FlowMLP:
    return FlowMLP(cfg)


def parallelize(model: FlowMLP, plan: ParallelPlan, mesh=None) -> FlowMLP:
    return apply_parallelism(model, list(model.blocks), plan, mesh)
