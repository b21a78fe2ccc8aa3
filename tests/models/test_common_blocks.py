"""The shared transformer building blocks: axial RoPE and patches for 1-D, 2-D and 3-D
token grids, adaLN-zero modulation, and masked / joint attention."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.common.attention import QKVProjection, attention, joint_attention
from models.common.embeddings import (
    PatchEmbed,
    apply_rope,
    grid_positions,
    rope_axes_dims,
    rope_cos_sin,
    rope_cos_sin_nd,
    unpatchify,
)
from models.common.init import ParamInit
from models.common.mlp import FeedForward
from models.common.modulation import (
    AdaLNModulation,
    AdaLNZeroResidual,
    gated_residual,
    modulate,
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


def test_2d_rope_scores_depend_only_on_the_offset_and_default_split():
    assert rope_axes_dims(128, 3) == [44, 42, 42] and rope_axes_dims(64, 2) == [32, 32]
    assert rope_axes_dims(16, 1) == [16]
    grid, dims = (6, 7), rope_axes_dims(16, 2)
    a = scores(grid, dims, (0, 1), (2, 4))
    assert a == pytest.approx(scores(grid, dims, (3, 2), (5, 5)), abs=1e-5)
    assert abs(a - scores(grid, dims, (3, 2), (5, 4))) > 1e-3
    # the default split is the one used when axes_dims is left out
    positions = grid_positions((3, 4, 5))
    default = rope_cos_sin_nd(positions, 24)
    explicit = rope_cos_sin_nd(positions, 24, rope_axes_dims(24, 3))
    assert all(torch.equal(x, y) for x, y in zip(default, explicit, strict=True))
    with pytest.raises(ValueError, match="at least 2 per axis"):
        rope_cos_sin_nd(positions, 4)
    with pytest.raises(ValueError, match=r"positions must be \(N, axes\)"):
        rope_cos_sin_nd(torch.arange(5), 8)


def test_3d_rope_on_a_line_is_the_1d_rope_of_that_axis():
    # the whole head on the last axis: a (1, 1, W) grid is exactly the 1-D RoPE over W
    cos, sin = rope_cos_sin_nd(grid_positions((1, 1, 11)), 16, [2, 2, 12])
    line_cos, line_sin = rope_cos_sin(torch.arange(11), 12)
    assert torch.equal(cos[..., 2:], line_cos) and torch.equal(sin[..., 2:], line_sin)
    x = torch.randn(1, 11, 3, 16, generator=torch.Generator().manual_seed(0))
    rotated = apply_rope(x, cos, sin)
    # channel pairs (i, i + 8) for i < 2 are the first two axes': unrotated at coordinate 0
    assert torch.equal(rotated[..., [0, 1, 8, 9]], x[..., [0, 1, 8, 9]])
    assert not torch.allclose(rotated[:, 1:], x[:, 1:])


@pytest.mark.parametrize("patch", [(4,), (2, 3), (1, 2, 2)])
def test_patch_embed_with_an_identity_projection_round_trips(patch):
    channels = 3
    dim = channels * math.prod(patch)
    embed = PatchEmbedND(channels, dim, patch)
    with torch.no_grad():
        # token feature (offsets..., channel), the patchify layout
        eye = torch.eye(dim).reshape(dim, *patch, channels).movedim(-1, 1)
        embed.proj.weight.copy_(eye)
        embed.proj.bias.zero_()
    x = torch.randn(2, channels, *[3 * p for p in patch])
    tokens, grid = embed(x)
    assert tokens.is_contiguous()
    assert torch.allclose(tokens, patchify(x, patch), atol=1e-6)
    assert torch.allclose(unpatchify_nd(tokens, patch, channels, grid), x, atol=1e-6)


def test_2d_patch_embed_is_the_nd_one_plus_the_position_table():
    embed = PatchEmbed(4, 8, 2, max_grid=6, base_grid=4)
    x = torch.randn(2, 4, 8, 6)
    tokens, grid = embed(x)
    plain, plain_grid = PatchEmbedND.forward(embed, x)
    assert grid == plain_grid == (4, 3) and tokens.is_contiguous()
    table = embed.pos_table.reshape(6, 6, 8)[1:5, 1:4].reshape(1, 12, 8)  # centre crop
    assert torch.equal(tokens, plain + table)
    with pytest.raises(ValueError, match=r"\(8, 7\) is not divisible by the patch size \(2, 2\)"):
        embed(torch.randn(1, 4, 8, 7))
    with pytest.raises(ValueError, match="exceed the position table"):
        embed(torch.randn(1, 4, 14, 2))


def test_modulate_and_gate_per_sample_equal_per_token():
    g = torch.Generator().manual_seed(0)
    x, shift, scale, gate, y = (
        torch.randn(s, generator=g) for s in [(2, 5, 4)] + [(2, 4)] * 3 + [(2, 5, 4)]
    )
    per_token = [m[:, None].expand(2, 5, 4) for m in (shift, scale, gate)]
    assert torch.equal(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    assert torch.equal(modulate(x, shift, scale), modulate(x, *per_token[:2]))
    assert torch.equal(gated_residual(x, gate, y), x + gate[:, None] * y)
    assert torch.equal(gated_residual(x, gate, y), gated_residual(x, per_token[2], y))


@pytest.mark.parametrize("per_token", [False, True])
def test_adaln_zero_residual_is_identity_at_init_only(per_token):
    block = AdaLNZeroResidual(8, FeedForward(8, 16), cond_dim=6)
    init = ParamInit(block, seed=0)
    init.defaults_(block)
    init.own_init_(block, AdaLNModulation)
    assert block.mod.linear.weight.abs().sum() == 0 and block.mod.linear.bias.abs().sum() == 0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=g)
    c = torch.randn(2, 5, 6, generator=g) if per_token else torch.randn(2, 6, generator=g)
    assert torch.equal(block(x, c), x)
    # the body alone is not the identity, so the zero gate is what made it one
    assert not torch.allclose(block.body(x), torch.zeros_like(x))
    with torch.no_grad():
        block.mod.linear.bias[16:].fill_(0.5)  # gate only: the branch switches on
    out = block(x, c)
    assert not torch.allclose(out, x)
    expected = x + 0.5 * block.body(block.norm(x))
    assert torch.allclose(out, expected, atol=1e-6)
    with torch.no_grad():
        block.mod.linear.weight.normal_(generator=g)  # now c matters
    assert not torch.allclose(block(x, c), block(x, c + 1))


def test_adaln_zero_init_reaches_every_modulation_and_nothing_else():
    model = nn.ModuleDict(
        {
            "a": AdaLNModulation(4, 2),
            "b": nn.Sequential(AdaLNModulation(4, 6, cond_dim=3)),
            "c": nn.Linear(4, 4),
        }
    )
    init = ParamInit(model, seed=0)
    init.defaults_(model)
    init.own_init_(model, AdaLNModulation)
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if not n.startswith("c."))
    assert model["c"].weight.abs().sum() > 0
    chunks = model["b"][0](torch.randn(2, 3))
    assert len(chunks) == 6 and all(ch.shape == (2, 4) and not ch.any() for ch in chunks)


def reference_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(K)) v written out, (B, H, N, K) -> (B, N, H * K)."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    out = logits.softmax(-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def test_attention_with_a_mask_matches_the_written_out_softmax():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 4, generator=g)
    k, v = torch.randn(2, 3, 7, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    mask = torch.ones(5, 7, dtype=torch.bool).tril(2)  # 2 cached keys, then causal
    out = attention(q, k, v, mask)
    assert out.shape == (2, 5, 12)
    assert torch.allclose(out, reference_attention(q, k, v, mask), atol=1e-5)
    # the mask matters: full attention gives a different answer
    assert not torch.allclose(out, reference_attention(q, k, v), atol=1e-3)
    assert torch.allclose(attention(q, k, v), reference_attention(q, k, v), atol=1e-5)


def test_joint_attention_is_one_attention_over_the_joined_streams():
    g = torch.Generator().manual_seed(0)
    streams = [tuple(torch.randn(2, n, 3, 4, generator=g) for _ in range(3)) for n in (5, 2)]
    image, text = joint_attention(streams)
    joined = [torch.cat([s[i] for s in streams], 1).transpose(1, 2) for i in range(3)]
    ref = reference_attention(*joined)
    assert image.shape == (2, 5, 12) and text.shape == (2, 2, 12)
    assert torch.allclose(torch.cat([image, text], 1), ref, atol=1e-5)


def test_own_init_uses_each_blocks_initialisation():
    model = nn.ModuleDict(
        {"qkv": QKVProjection(16, 2, qk_norm=False), "patch": PatchEmbedND(3, 16, (2, 2, 2))}
    )
    init = ParamInit(model, seed=0)
    init.defaults_(model)  # fused q/k/v as one (48, 16) matrix: bound sqrt(6 / 64)
    one_matrix = model["qkv"].qkv.weight.abs().max().item()
    init.own_init_(model, QKVProjection, PatchEmbedND)
    # q, k, v each as a (16, 16) matrix: bound sqrt(6 / 32), same draws scaled up
    each = model["qkv"].qkv.weight.abs().max().item()
    assert one_matrix <= math.sqrt(6 / 64) < each <= math.sqrt(6 / 32)
    assert each == pytest.approx(one_matrix * math.sqrt(2), rel=1e-5)
    patch = model["patch"].proj
    assert patch.weight.abs().max() <= math.sqrt(6 / (16 + 3 * 8)) and not patch.bias.any()


@pytest.mark.parametrize("family", ["kl_vae", "video_vae"])
def test_both_vaes_residual_block_is_the_shared_one_with_its_keys(family):
    """The KL-VAE (2-D) and the causal video VAE (3-D) build the shared block; its keys
    are what checkpoints and the diffusers mapping read, the skip projects only between
    widths, and the block is the written-out norm-SiLU-conv twice plus the input."""
    import importlib

    from models.common.resblock import ResBlock

    module = importlib.import_module(f"models.{family}")
    same, wider = module.ResBlock(8, 8, 4), module.ResBlock(8, 16, 4)
    assert isinstance(same, ResBlock) and isinstance(wider, ResBlock)
    keys = {f"{n}.{p}" for n in ("norm1", "conv1", "norm2", "conv2") for p in ("weight", "bias")}
    assert set(same.state_dict()) == keys
    assert set(wider.state_dict()) == keys | {"skip.weight", "skip.bias"}
    x = torch.randn(2, 8, *((3, 6, 6) if family == "video_vae" else (6, 6)))
    for block in (same, wider):
        h = block.conv1(torch.nn.functional.silu(block.norm1(x)))
        h = block.conv2(torch.nn.functional.silu(block.norm2(h)))
        expected = h + (x if block is same else block.skip(x))
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
