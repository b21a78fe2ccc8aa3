"""Embeddings shared by the diffusion families."""

from __future__ import annotations

import math

import torch


def timestep_embedding(
    t_B: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0
) -> torch.Tensor:
    """Sinusoidal embedding of continuous timesteps t in [0, 1] -> (B, dim).

    t is multiplied by ``scale`` first so that the frequencies used for integer DDPM
    steps (0..1000) also resolve continuous flow-matching times.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half
    )
    args = (t_B.float() * scale)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
