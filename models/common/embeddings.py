"""Embeddings shared by the diffusion families."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.common.init import ParamInit
from models.common.patches import PatchEmbedND, unpatchify_nd


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


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) as [sin(p w), cos(p w)], w_i = 10000^(-i / (dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_2d_grid(dim: int, grid_size: int, base_size: int) -> torch.Tensor:
    """(grid_size * grid_size, dim) 2-D sin-cos embedding of a square grid (row-major),
    positions scaled so that ``base_size`` patches span the same range at any grid size.
    Half the channels encode the column, half the row (the SD3 / DiT layout)."""
    coords = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)
    cols, rows = torch.meshgrid(coords, coords, indexing="xy")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


class PatchEmbed(PatchEmbedND):
    """Non-overlapping p x p patches -> tokens, plus a 2-D sin-cos position embedding
    center-cropped from a ``max_grid`` x ``max_grid`` table, so any resolution (aspect
    bucket) up to max_grid * p pixels per side gets consistent positions.

    The 2-D :class:`PatchEmbedND` (same ``proj`` conv, same token order) with the table
    added; returns tokens and the (rows, cols) patch grid likewise."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, max_grid: int, base_grid: int):
        super().__init__(in_channels, dim, (patch_size, patch_size))
        self.patch_size = patch_size
        self.max_grid = max_grid
        self.register_buffer(
            "pos_table", sincos_2d_grid(dim, max_grid, base_grid)[None], persistent=False
        )
        self._table_args = (dim, max_grid, base_grid)

    def reset_pos_table(self) -> None:
        """Recompute the table (it is not a parameter; after meta-device builds)."""
        self.pos_table = sincos_2d_grid(*self._table_args)[None].to(self.proj.weight.device)

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens_BND, (rows, cols) = self.project(x_BCHW)
        if rows > self.max_grid or cols > self.max_grid:
            raise ValueError(
                f"{rows}x{cols} patches exceed the position table ({self.max_grid} per side)"
            )
        top, left = (self.max_grid - rows) // 2, (self.max_grid - cols) // 2
        table = self.pos_table.reshape(1, self.max_grid, self.max_grid, -1)[
            :, top : top + rows, left : left + cols
        ]
        # fp32 table added before rounding (as diffusers); contiguous, else the residual
        # stream would keep the conv's transposed layout through every block (slow)
        out_BND = (tokens_BND + table.reshape(1, rows * cols, -1)).to(tokens_BND.dtype)
        return out_BND.contiguous(), (rows, cols)


def unpatchify(
    tokens_BND: torch.Tensor, patch_size: int, channels: int, rows: int, cols: int
) -> torch.Tensor:
    """(B, rows*cols, p*p*C) -> (B, C, rows*p, cols*p) (:func:`unpatchify_nd` in 2-D)."""
    return unpatchify_nd(tokens_BND, (patch_size, patch_size), channels, (rows, cols))


class TimestepMLP(nn.Module):
    """Sinusoidal embedding of t in [0, 1] (x1000, cos first) -> MLP -> (B, dim)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.linear_2(
            nn.functional.silu(self.linear_1(timestep_embedding(t_B, self.freq_dim).to(dtype)))
        )

    def init_(self, init: ParamInit) -> None:
        """N(0, 0.02) weights (DiT's choice); biases as given."""
        init.normal_(self.linear_1.weight, 0.02)
        init.normal_(self.linear_2.weight, 0.02)


def rope_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotation angles (..., dim // 2) of positions (...), frequencies base^(-i / (dim/2))."""
    half = dim // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    return positions.float()[..., None] * inv_freq


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position tables for (L,) or (B, L) integer positions -> cos, sin, each
    (1 or B, L, 1, head_dim // 2) in fp32, to rotate (B, L, H, head_dim) queries / keys
    with :func:`apply_rope`. Computed per call from the positions (no table), so any
    position, repeated or out of order, is allowed."""
    angles = rope_angles(positions, head_dim, base)  # (L, half) or (B, L, half)
    if angles.dim() == 2:
        angles = angles[None]
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def grid_positions(shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """(N, A) integer coordinates of every cell of an A-axis grid, row-major (last axis
    fastest: the token order of :func:`models.common.patches.patchify`)."""
    axes = [torch.arange(n, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def rope_axes_dims(head_dim: int, num_axes: int) -> list[int]:
    """An even split of head_dim over the axes, the pairs left over going to the first
    axis (time, for video: head_dim 128 -> [44, 42, 42])."""
    if head_dim % 2 or head_dim < 2 * num_axes:
        raise ValueError(
            f"head_dim {head_dim} must be even and at least 2 per axis for {num_axes}-axis RoPE"
        )
    share = 2 * (head_dim // (2 * num_axes))
    return [head_dim - share * (num_axes - 1)] + [share] * (num_axes - 1)


def rope_cos_sin_nd(
    positions_NA: torch.Tensor,
    head_dim: int,
    axes_dims: Sequence[int] | None = None,
    base: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial rotary tables for tokens at A-axis coordinates (N, A) (1-D text or audio,
    2-D images, 3-D video: e.g. :func:`grid_positions`) -> cos, sin (1, N, 1, head_dim // 2)
    for :func:`apply_rope`. Axis a rotates ``axes_dims[a]`` channels of each head (even,
    summing to head_dim) with its own coordinate, so the attention score of two tokens
    depends only on their offset along each axis. One axis is :func:`rope_cos_sin`.
    ``axes_dims`` None: :func:`rope_axes_dims`."""
    if positions_NA.dim() != 2:
        raise ValueError(f"positions must be (N, axes), got {tuple(positions_NA.shape)}")
    if axes_dims is None:
        axes_dims = rope_axes_dims(head_dim, positions_NA.shape[1])
    if positions_NA.shape[1] != len(axes_dims):
        raise ValueError(
            f"positions must be (N, {len(axes_dims)}) for axes_dims {list(axes_dims)}, "
            f"got {tuple(positions_NA.shape)}"
        )
    if sum(axes_dims) != head_dim or any(d <= 0 or d % 2 for d in axes_dims):
        raise ValueError(
            f"axes_dims {list(axes_dims)} must be positive even widths summing to head_dim {head_dim}"
        )
    angles = torch.cat(
        [rope_angles(positions_NA[:, a], d, base) for a, d in enumerate(axes_dims)], dim=-1
    )
    return angles.cos()[None, :, None], angles.sin()[None, :, None]


def apply_rope(x_BLHK: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + K/2) of queries or keys by position angles (the
    "rotate half" layout of GPT-NeoX / LLaMA), in fp32, returned in x's dtype."""
    x1, x2 = x_BLHK.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x_BLHK.dtype)
