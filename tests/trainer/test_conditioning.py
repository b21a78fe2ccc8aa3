"""SD3-style conditioning: context/pooled assembly, padding, CFG dropout per encoder."""

from __future__ import annotations

import pytest
import torch

from configlib import ConfigError, from_dict
from trainer.objectives.conditioning import ConditioningConfig, TextConditioner


def precomputed(context_dim=16, **extra) -> TextConditioner:
    cfg = from_dict(
        ConditioningConfig, {"source": "precomputed", "context_dim": context_dim, **extra}
    )
    return TextConditioner(cfg, seed=0)


def batch(n=4, index_start=0):
    return {
        "clip": torch.randn(n, 5, 6),
        "clip_pooled": torch.randn(n, 6),
        "t5": torch.randn(n, 7, 10),
        "index": torch.arange(index_start, index_start + n),
    }


def test_context_is_padded_clip_then_t5_and_pooled_is_clip():
    cond = precomputed()
    b = batch()
    out = cond(b, training=False)
    assert out["context"].shape == (4, 5 + 7, 16)
    assert (
        torch.equal(out["context"][:, :5, :6], b["clip"]) and (out["context"][:, :5, 6:] == 0).all()
    )
    assert (
        torch.equal(out["context"][:, 5:, :10], b["t5"]) and (out["context"][:, 5:, 10:] == 0).all()
    )
    assert torch.equal(out["pooled"], b["clip_pooled"])


def test_too_wide_embeddings_are_an_error():
    with pytest.raises(ValueError, match="exceeds conditioning.context_dim"):
        precomputed(context_dim=8)(batch(), training=False)


def test_dropout_rates_are_independent_per_encoder_and_deterministic():
    cond = precomputed(clip_drop_prob=0.3, t5_drop_prob=0.6)
    b = batch(n=4000)
    out = cond(b, training=True, step=3)
    clip_dropped = (out["pooled"] == 0).all(dim=1).float()
    t5_dropped = (out["context"][:, 5:] == 0).flatten(1).all(dim=1).float()
    assert abs(clip_dropped.mean() - 0.3) < 0.03 and abs(t5_dropped.mean() - 0.6) < 0.03
    both = (clip_dropped * t5_dropped).mean()
    assert abs(both - 0.18) < 0.03  # independent
    again = cond(b, training=True, step=3)
    assert torch.equal(again["context"], out["context"])  # same (step, sample) -> same drops
    other = cond(b, training=True, step=4)
    assert not torch.equal(other["context"], out["context"])


def test_drop_of_a_sample_does_not_depend_on_its_batch_mates():
    cond = precomputed(clip_drop_prob=0.5, t5_drop_prob=0.5)
    full = batch(n=8)
    alone = {k: v[5:6] for k, v in full.items()}
    a = cond(full, training=True, step=1)["context"][5]
    b = cond(alone, training=True, step=1)["context"][0]
    assert torch.equal(a, b)  # so any split over ranks gives the same training data


def test_no_drop_at_inference_and_validation_of_sources():
    out = precomputed(clip_drop_prob=1.0, t5_drop_prob=1.0)(batch(), training=False)
    assert (out["pooled"] != 0).any()
    with pytest.raises(ConfigError, match="at least one text encoder"):
        from_dict(ConditioningConfig, {"source": "encoders"})
    with pytest.raises(ConfigError, match="no effect when source is 'precomputed'"):
        from_dict(ConditioningConfig, {"source": "precomputed", "shard_encoders": True})


def test_prompts_give_conditional_and_all_zero_unconditional_inputs():
    cfg = from_dict(
        ConditioningConfig,
        {
            "clip": [{"arch": "ViT-L-14", "random_init": True, "size": "tiny", "max_length": 16}],
            "context_dim": 32,
        },
    )
    cond = TextConditioner(cfg, seed=0)
    c, u = cond.for_prompts(
        ["a photo of the digit one", "a photo of the digit two"], torch.device("cpu")
    )
    assert c["context"].shape == (2, 16, 32) and c["pooled"].shape == (2, 32)
    assert not torch.equal(c["pooled"][0], c["pooled"][1])
    assert (u["context"] == 0).all() and (u["pooled"] == 0).all()
