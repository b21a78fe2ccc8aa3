"""The shared building blocks for 1-D, 2-D and 3-D token grids: axial RoPE and patches."""

from __future__ import annotations

import pytest
import torch

from models.common.embeddings import (
    apply_rope,
    grid_positions,
    rope_cos_sin,
    rope_cos_sin_nd,
    unpatchify,
)
from models.common.patches import PatchEmbedND, patchify, unpatchify_nd


def test_one_axis_rope_is_the_1d_rope_bit_for_bit():
    positions = torch.arange(37)
    cos, sin = rope_cos_sin(positions, 32, base=500.0)
    cos_nd, sin_nd = rope_cos_sin_nd(positions[:, None], 32, [32], base=500.0)
    assert torch.equal(cos, cos_nd) and torch.equal(sin, sin_nd)


def scores(grid, axes_dims, q_at, k_at, seed=0):
    """Attention score of one fixed q and k placed at grid cells q_at / k_at."""
    head_dim = sum(axes_dims)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    positions = grid_positions(grid)
    cos, sin = rope_cos_sin_nd(positions, head_dim, axes_dims)
    x = torch.zeros(1, positions.shape[0], 1, head_dim)
    index = {tuple(p.tolist()): i for i, p in enumerate(positions)}
    x_q, x_k = x.clone(), x.clone()
    x_q[0, index[q_at], 0], x_k[0, index[k_at], 0] = q, k
    rq, rk = apply_rope(x_q, cos, sin), apply_rope(x_k, cos, sin)
    return float(rq[0, index[q_at], 0] @ rk[0, index[k_at], 0])


def test_3d_rope_scores_depend_only_on_the_offset_per_axis():
    grid, dims = (4, 5, 6), [8, 12, 12]
    a = scores(grid, dims, (0, 1, 2), (1, 3, 2))
    b = scores(grid, dims, (2, 2, 4), (3, 4, 4))  # same offset (1, 2, 0), moved
    c = scores(grid, dims, (2, 2, 4), (3, 4, 5))  # one step further along the last axis
    d = scores(grid, dims, (2, 2, 3), (3, 2, 5))  # offset (1, 0, 2): the last two swapped
    assert a == pytest.approx(b, abs=1e-5)
    assert abs(a - c) > 1e-3 and abs(a - d) > 1e-3


def test_3d_rope_on_a_line_rotates_only_that_axis_channels():
    # along the last axis of a (1, 1, W) grid, the first two axes' channels stay unrotated
    cos, sin = rope_cos_sin_nd(grid_positions((1, 1, 9)), 16, [4, 4, 8])
    assert torch.equal(cos[..., :4], torch.ones_like(cos[..., :4]))
    assert torch.equal(sin[..., :4], torch.zeros_like(sin[..., :4]))
    line_cos, line_sin = rope_cos_sin(torch.arange(9), 8)
    assert torch.equal(cos[..., 4:], line_cos) and torch.equal(sin[..., 4:], line_sin)


def test_rope_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="summing to head_dim 16"):
        rope_cos_sin_nd(grid_positions((2, 2)), 16, [6, 6])
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin_nd(grid_positions((2, 2)), 16, [7, 9])
    with pytest.raises(ValueError, match=r"positions must be \(N, 3\)"):
        rope_cos_sin_nd(grid_positions((2, 2)), 16, [4, 4, 8])


@pytest.mark.parametrize(
    "shape, patch",
    [((2, 3, 12), (4,)), ((2, 3, 8, 6), (2, 3)), ((2, 4, 3, 8, 6), (1, 2, 2))],
)
def test_patchify_round_trips_in_1d_2d_3d(shape, patch):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    tokens = patchify(x, patch)
    grid = tuple(s // p for s, p in zip(shape[2:], patch, strict=True))
    assert tokens.shape == (
        shape[0],
        torch.Size(grid).numel(),
        shape[1] * torch.Size(patch).numel(),
    )
    assert torch.equal(unpatchify_nd(tokens, patch, shape[1], grid), x)
    # each token holds exactly the values of its own patch
    first = x[(slice(None), slice(None), *[slice(0, p) for p in patch])]
    assert torch.equal(tokens[:, 0].sort().values, first.reshape(shape[0], -1).sort().values)


def test_2d_unpatchify_is_the_nd_one():
    tokens = torch.randn(2, 12, 2 * 2 * 5)
    out = unpatchify(tokens, 2, 5, 3, 4)
    assert out.shape == (2, 5, 6, 8) and torch.equal(out, unpatchify_nd(tokens, (2, 2), 5, (3, 4)))
    assert torch.equal(patchify(out, (2, 2)), tokens)


@pytest.mark.parametrize("patch", [(2,), (2, 2), (1, 2, 2)])
def test_patch_embed_nd_is_a_linear_map_of_each_patch(patch):
    embed = PatchEmbedND(3, 8, patch)
    x = torch.randn(2, 3, *[4 * p for p in patch])
    tokens, grid = embed(x)
    assert grid == (4,) * len(patch) and tokens.shape == (2, 4 ** len(patch), 8)
    # the same map as a matrix on the flattened (channel, offsets) patch
    weight = embed.proj.weight.reshape(8, -1)
    ref = patchify(x, patch)  # (B, N, offsets..., C) layout
    k = len(patch)
    ref = (
        ref.reshape(2, 4**k, *patch, 3).permute(0, 1, k + 2, *range(2, k + 2)).reshape(2, 4**k, -1)
    )
    assert torch.allclose(tokens, ref @ weight.T + embed.proj.bias, atol=1e-5)


def test_patch_sizes_that_do_not_divide_are_clear_errors():
    with pytest.raises(ValueError, match=r"not divisible by the patch size \(1, 2, 2\)"):
        PatchEmbedND(3, 8, (1, 2, 2))(torch.zeros(1, 3, 3, 5, 4))
    with pytest.raises(ValueError, match="1-D, 2-D or 3-D"):
        PatchEmbedND(3, 8, (1, 1, 1, 1))
    with pytest.raises(ValueError, match="do not fit"):
        unpatchify_nd(torch.zeros(1, 5, 12), (2, 2), 3, (2, 3))
