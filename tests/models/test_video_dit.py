"""The video DiT: shapes, the identity at initialisation, an image as a 1-frame video,
factorised attention that really keeps to frames and time lines, exact FLOPs against
PyTorch's FLOP counter, presets, and the one-line errors of recipes that do not fit."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from configlib import ConfigError
from models.common.cross_dit import AttentionGroups
from models.video_dit import VideoDiT, VideoDiTConfig, num_params
from trainer.config import check_world_size
from trainer.registry import load_config

TINY = "recipes/tiny/video_dit.yaml"


def tiny(attention: str = "full", patch=(1, 4, 4), shared: bool = False) -> VideoDiT:
    cfg = VideoDiTConfig(
        in_channels=3, patch_size=patch, context_dim=12, attention=attention,
        shared_modulation=shared,
    )  # fmt: skip
    model = VideoDiT(cfg)
    model.init_weights(0)
    return model


def perturbed(model: VideoDiT) -> VideoDiT:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def text(batch: int, tokens: int = 5) -> dict[str, torch.Tensor]:
    return {"context": torch.randn(batch, tokens, 12, generator=torch.Generator().manual_seed(2))}


def test_starts_at_zero_and_takes_clips_and_images():
    model = tiny()
    clip = torch.randn(2, 3, 4, 16, 16)
    out = model(clip, torch.rand(2), text(2))
    assert out.shape == clip.shape and torch.equal(out, torch.zeros_like(clip))
    image = torch.randn(2, 3, 1, 16, 16)  # an image is a 1-frame video (temporal patch 1)
    model, t = perturbed(model), torch.rand(2)
    assert model(image, t, text(2)).shape == image.shape
    # an image batch (B, C, H, W) runs as those 1-frame videos, for data.kind images
    assert torch.equal(model(image[:, :, 0], t, text(2)), model(image, t, text(2))[:, :, 0])
    with pytest.raises(ValueError, match=r"an image is a 1-frame video: it needs tubelets 1"):
        tiny(patch=(2, 4, 4))(image[:, :, 0], t, text(2))


def test_factorized_attention_keeps_to_frames_and_time_lines():
    groups = AttentionGroups(outer=3, inner=4, across_outer=False)
    x = torch.arange(2 * 12).float().reshape(2, 12, 1, 1)
    folded = groups.fold(x)
    assert folded.shape == (6, 4, 1, 1) and folded[1, :, 0, 0].tolist() == [4, 5, 6, 7]
    assert torch.equal(groups.unfold(folded.reshape(6, 4, 1)), x.reshape(2, 12, 1))
    lines = AttentionGroups(outer=3, inner=4, across_outer=True)
    assert lines.fold(x)[1, :, 0, 0].tolist() == [1, 5, 9] and lines.pairs() == 4 * 9
    assert torch.equal(lines.unfold(lines.fold(x).reshape(8, 3, 1)), x.reshape(2, 12, 1))
    # one block of spatial attention: a change in frame 0 cannot reach frame 2
    model = perturbed(tiny("factorized"))
    model.blocks = model.blocks[:1]
    clip = torch.randn(1, 3, 3, 16, 16)
    changed = clip.clone()
    changed[:, :, 0] += 1.0
    t = torch.rand(1)
    a, b = model(clip, t, text(1)), model(changed, t, text(1))
    assert torch.allclose(a[:, :, 2], b[:, :, 2]) and not torch.allclose(a[:, :, 0], b[:, :, 0])
    full = perturbed(tiny("full"))
    full.blocks = full.blocks[:1]
    assert not torch.allclose(full(clip, t, text(1))[:, :, 2], full(changed, t, text(1))[:, :, 2])


@pytest.mark.parametrize("attention", ["full", "factorized"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-block-adaln", "shared-modulation"])
def test_flops_per_sample_equal_the_flop_counter(attention, shared):
    model = tiny(attention, patch=(2, 4, 4), shared=shared)
    shape, tokens = (4, 16, 16), 5
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, *shape), torch.rand(1), text(1, tokens))
    assert model.flops_per_sample(shape, tokens) == 3 * counter.get_total_flops()


def test_presets_reach_reference_scale():
    assert 2.8e9 < num_params(VideoDiTConfig(size="3b")) < 3.2e9


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.num_frames=7", "model.patch_size=[2, 4, 4]"], "data.num_frames: 7 is not divisible by the temporal patch size 2"),
        (["data.resolutions=[[16, 18]]"], "data.resolutions[0]: [16, 18] is not divisible by the patch size 4x4"),
        (["data.kind=audio"], "data.kind: 'audio': a video_dit trains on kind 'video' or 'images'"),
        (["data.kind=images", "model.patch_size=[2, 4, 4]"],
         "model.patch_size: [2, 4, 4]: images are 1-frame videos, so the tubelets must be 1 frame long"),
        (["model.head_dim=31"], "model.head_dim: must be even for 3-D RoPE (got 31)"),
        (["parallel.context_parallel=3"], "parallel.context_parallel: 3 does not divide the model's 4 heads"),
        (["parallel.context_parallel=2", "parallel.backend=none"], "parallel.context_parallel: 2 needs parallel.backend fsdp2 (got 'none')"),
        (["parallel.context_parallel=2", "data.num_frames=1", "data.resolutions=[[12, 4]]"],
         "data.resolutions[0]: 3 tokens per sample are not divisible by parallel.context_parallel 2"),
    ],
)  # fmt: skip
def test_recipe_problems_are_one_line_each(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, overrides)
    assert message in str(info.value)


def test_context_parallel_needs_a_family_that_splits_and_a_dividing_world():
    with pytest.raises(ConfigError, match="'mmdit' does not split its sequence"):
        load_config("recipes/tiny/sd3_like.yaml", ["parallel.context_parallel=2"])
    cfg = load_config(TINY, ["parallel.context_parallel=2", "train.batch_size=6"])
    assert check_world_size(cfg, 4) == (3, 1)  # 2 data-parallel ranks of 3 samples
    with pytest.raises(ConfigError, match="context_parallel: 2 does not divide the 3 ranks"):
        check_world_size(cfg, 3)


def test_bad_clip_shapes_are_one_clear_error():
    model = tiny()
    expected = r"expected video \(B, 3, T, H, W\) or image \(B, 3, H, W\), got \(1, 4, 16, 16\)"
    with pytest.raises(ValueError, match=expected):
        model(torch.randn(1, 4, 16, 16), torch.rand(1), text(1))
    with pytest.raises(ValueError, match=r"input size \(2, 16, 18\) is not divisible by the patch"):
        model(torch.randn(1, 3, 2, 16, 18), torch.rand(1), text(1))


def test_shared_modulation_starts_at_zero_and_each_block_keeps_its_own_table():
    """adaLN-single: one t projection for all blocks plus a learnt (6, D) table per block.
    It starts as the identity like adaLN-zero, has fewer parameters, and a block's table
    changes only that block's modulation."""
    shared, per_block = tiny(shared=True), tiny()
    clip, t = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    assert torch.equal(shared(clip, t, text(2)), torch.zeros_like(clip))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    width, depth = shared.width, len(shared.blocks)
    assert (
        count(per_block) - count(shared)
        == (depth - 1) * 6 * width * (width + 1) - depth * 6 * width
    )
    assert all(b.mod is None and b.mod_table.shape == (6, width) for b in shared.blocks)
    model = perturbed(shared)
    before = model(clip, t, text(2))
    with torch.no_grad():
        model.blocks[-1].mod_table[2].add_(1.0)  # the last block's attention gate
    after = model(clip, t, text(2))
    assert not torch.allclose(before, after)
    model.blocks[-1].mod_table.grad = None
    model(clip, t, text(2)).square().mean().backward()
    assert all(
        b.mod_table.grad is not None and b.mod_table.grad.abs().sum() > 0 for b in model.blocks
    )
