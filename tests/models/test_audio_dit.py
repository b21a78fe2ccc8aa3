"""The audio DiT: shapes, the identity at initialisation, timing and text reaching the
output, exact FLOPs against a hand count and PyTorch's FLOP counter, presets, and the
one-line errors of recipes that do not fit."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from configlib import ConfigError
from models.audio_dit import AudioDiT, AudioDiTConfig, num_params
from models.common.cross_dit import CrossDiTBlock
from models.common.embeddings import rope_cos_sin_nd
from trainer.registry import load_config

TINY = "recipes/tiny/audio_dit.yaml"


def tiny(**kw) -> AudioDiT:
    cfg = AudioDiTConfig(in_channels=2, patch_size=4, context_dim=12, seconds_max=4.0, **kw)
    model = AudioDiT(cfg)
    model.init_weights(0)
    return model


def cond(batch: int, text: int = 5, total: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "context": torch.randn(batch, text, 12, generator=gen),
        "seconds_start": torch.zeros(batch),
        "seconds_total": torch.full((batch,), total),
    }


def perturbed(model: AudioDiT) -> AudioDiT:
    """Every weight non-zero, so each input can reach the output."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_starts_as_zero_velocity_and_blocks_as_identity():
    model = tiny()
    x = torch.randn(3, 2, 32)
    out = model(x, torch.rand(3), cond(3))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    block = model.blocks[0]
    tokens, context, vec = torch.randn(3, 8, 128), torch.randn(3, 7, 128), torch.randn(3, 128)
    rope = rope_cos_sin_nd(torch.arange(8)[:, None], 32)
    assert isinstance(block, CrossDiTBlock) and torch.equal(
        block(tokens, context, vec, rope), tokens
    )


def test_timing_and_text_reach_every_frame_and_lengths_vary():
    model = perturbed(tiny())
    x, t = torch.randn(2, 2, 32), torch.rand(2)
    base = model(x, t, cond(2, total=1.0))
    longer = model(x, t, cond(2, total=2.0))
    assert (base - longer).abs().amax(dim=1).min() > 0  # every frame sees seconds_total
    no_text = {k: v for k, v in cond(2).items() if k != "context"}
    assert not torch.allclose(model(x, t, no_text), base)
    # 1-D RoPE and sin-cos positions take any length the patches divide
    assert model(torch.randn(2, 2, 48), t, cond(2)).shape == (2, 2, 48)


def test_bad_inputs_are_one_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match=r"needs the timing condition \['seconds_total'\]"):
        model(torch.randn(1, 2, 32), torch.rand(1), {"seconds_start": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"expected latents \(B, 2, T\), got \(1, 3, 32\)"):
        model(torch.randn(1, 3, 32), torch.rand(1), cond(1))
    with pytest.raises(ValueError, match=r"input size \(30,\) is not divisible by the patch size"):
        model(torch.randn(1, 2, 30), torch.rand(1), cond(1))


def test_flops_per_sample_hand_count_and_flop_counter():
    model = tiny()
    frames, text = 32, 5
    width, depth, hidden, ch, patch, ctx_dim = 128, 3, 512, 2, 4, 12
    n, ctx = frames // patch, text + 2
    d2 = width * width
    per_token = 2 * width * ch * patch  # patch embed + head
    per_token_blocks = depth * (3 * d2 + d2 + d2 + d2 + 2 * width * hidden)  # qkv, out, q, o, MLP
    per_sample = 3 * (256 * width + d2) + depth * 6 * d2 + 2 * d2  # t/start/total MLPs, mods
    forward = 2 * (
        (per_token + per_token_blocks) * n
        + depth * 2 * d2 * ctx
        + ctx_dim * width * text
        + per_sample
    )
    forward += depth * 4 * width * (n * n + n * ctx)
    assert model.flops_per_sample(frames, text) == 3 * forward
    # PyTorch's counter over one forward (attention on the math path, counted as matmuls)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, ch, frames), torch.rand(1), cond(1, text))
    assert counter.get_total_flops() == forward
    assert model.flops_per_sample() == model.flops_per_sample(1024, 128)


def test_reference_preset_is_stable_audio_scale():
    count = num_params(AudioDiTConfig(size="stable_audio"))
    # Stable Audio Open's DiT width and depth (~1.06B there); adaLN-zero adds 6 D^2 per block
    assert 1.2e9 < count < 1.3e9, count


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.patch_size=48"], "data.window_seconds: 2.0 s is 8000 samples, not divisible by model.patch_size 48"),
        (["objective.autoencoder.channels=2"], "objective.autoencoder.channels: 2 differs from data.audio_channels (1)"),
        (["data.kind=images"], "data.kind: 'images': an audio_dit trains on kind 'audio'"),
        (["model.head_dim=31"], "model.head_dim: must be even for RoPE (got 31)"),
    ],
)  # fmt: skip
def test_recipe_problems_are_one_line_each(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, overrides)
    assert message in str(info.value)


def test_other_models_cannot_take_audio_data():
    with pytest.raises(ConfigError) as info:
        load_config("recipes/tiny/sd3_like.yaml", ["data.kind=audio"])
    assert "model.name: 'mmdit' cannot model 'audio' data: use audio_dit" in str(info.value)


def test_shared_modulation_starts_at_zero_and_counts_its_flops():
    """adaLN-single in the audio DiT too: the identity at init, trainable per-block
    tables, and FLOPs per sample that still equal PyTorch's counter."""
    model, per_block = tiny(shared_modulation=True), tiny()
    x = torch.randn(2, 2, 32)
    assert torch.equal(model(x, torch.rand(2), cond(2)), torch.zeros_like(x))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) < count(per_block)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model(x, torch.rand(2), cond(2)).square().mean().backward()
    assert all(b.mod_table.grad.abs().sum() > 0 for b in model.blocks)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 2, 32), torch.rand(1), cond(1, 5))
    assert model.flops_per_sample(32, 5) == 3 * counter.get_total_flops()
