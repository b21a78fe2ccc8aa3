"""Frozen text encoders: tiny random-init T5 and CLIP give the documented shapes, are
frozen and deterministic, load bit-identically from local checkpoints, refuse a missing
path instead of going random, agree with open_clip's own forward, and shard with FSDP2
without changing their outputs."""

from __future__ import annotations

import json
import random

import pytest
import torch

from configlib import ConfigError, from_dict
from data_pipeline.text_encoders import (
    ClipTextEncoder,
    ClipTextEncoderConfig,
    T5EncoderConfig,
    T5TextEncoder,
    shard_frozen_module,
)
from data_pipeline.tokenizer import train_tokenizer

TEXTS = ["a photo of the digit seven", "the red cat sleeps", "a garden"]
# open_clip's bundled tokenizer covers any text; the T5 tests' tokenizer is trained on these words.
_VOCABULARY = (
    "a photo of the digit seven red cat sleeps garden one two blue dog runs big small "
    "river mountain painting quiet golden morning window forest pilot dragon violin "
    "lantern teacher robot curious ancient hungry purple silver brave tiny eats finds "
    "builds"
)
WORDS = _VOCABULARY.split()
TINY_CLIP_ARCH = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(WORDS, k=6)) for _ in range(2000)))
    # unigram, like T5's own: transformers' T5Tokenizer converts it to the same segmentation
    train_tokenizer([str(corpus)], str(folder / "spm"), 64, progress=False)
    return str(folder / "spm.model")


def t5_config(spm_model: str, **kwargs) -> T5EncoderConfig:
    return T5EncoderConfig(random_init=True, tokenizer_path=spm_model, max_length=12, **kwargs)


def clip_config(**kwargs) -> ClipTextEncoderConfig:
    kwargs.setdefault("random_init", True)
    return ClipTextEncoderConfig(arch="ViT-L-14", max_length=16, **kwargs)


def _assert_frozen(encoder: torch.nn.Module) -> None:
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()  # a parent switching to train mode must not turn on dropout here
    assert not any(m.training for m in encoder.modules())


def test_t5_random_init_shapes_frozen_deterministic(spm_model):
    encoder = T5TextEncoder(t5_config(spm_model))
    _assert_frozen(encoder)
    out = encoder(TEXTS)
    assert set(out) == {"sequence", "mask"}
    assert out["sequence"].shape == (3, 12, 32) and out["sequence"].dtype == torch.float32
    assert out["mask"].shape == (3, 12) and out["mask"].dtype == torch.bool
    # mask: the text's pieces plus </s>, then padding; a long text is cut, keeping </s>
    lengths = [min(len(encoder.batcher.tokenizer.encode(t)) + 1, 12) for t in TEXTS]
    assert out["mask"].sum(1).tolist() == lengths and lengths[0] == 12
    ids, _ = encoder.batcher(TEXTS, 12)
    assert ids[0, -1] == encoder.batcher.tokenizer.eos_id
    assert not out["sequence"].requires_grad
    assert torch.equal(encoder(TEXTS)["sequence"], out["sequence"])
    # the seed decides the weights: same seed, same encoder; another seed, another one
    assert torch.equal(T5TextEncoder(t5_config(spm_model))(TEXTS)["sequence"], out["sequence"])
    other = T5TextEncoder(t5_config(spm_model, seed=1))(TEXTS)["sequence"]
    assert not torch.allclose(other, out["sequence"])
    # padding does not leak into real tokens: a text alone gives what it gives in a batch
    alone = encoder(TEXTS[2:])["sequence"][0]
    assert torch.allclose(alone[: lengths[2]], out["sequence"][2, : lengths[2]], atol=1e-6)


def test_clip_random_init_shapes_frozen_deterministic():
    encoder = ClipTextEncoder(clip_config())
    _assert_frozen(encoder)
    assert not hasattr(encoder, "visual")
    out = encoder(TEXTS)
    assert set(out) == {"sequence", "pooled", "mask"}
    assert out["sequence"].shape == (3, 16, 32) and out["pooled"].shape == (3, 32)
    # start token, the words, end token
    assert out["mask"].sum(1).tolist() == [len(t.split()) + 2 for t in TEXTS]
    assert torch.equal(encoder(TEXTS)["pooled"], out["pooled"])
    assert torch.equal(ClipTextEncoder(clip_config())(TEXTS)["pooled"], out["pooled"])
    assert not torch.allclose(ClipTextEncoder(clip_config(seed=1))(TEXTS)["pooled"], out["pooled"])
    final = ClipTextEncoder(clip_config(hidden_layer="final"))(TEXTS)["sequence"]
    assert not torch.allclose(final, out["sequence"])


def test_bf16_is_the_same_encoder_in_bf16(spm_model):
    for make in (
        lambda **kw: T5TextEncoder(t5_config(spm_model, **kw)),
        lambda **kw: ClipTextEncoder(clip_config(**kw)),
    ):
        full, half = make(), make(dtype="bf16")
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
        out_full, out_half = full(TEXTS), half(TEXTS)
        for key in ("sequence", "pooled"):
            if key in out_full:
                assert out_half[key].dtype == torch.bfloat16
                assert torch.allclose(out_half[key].float(), out_full[key], atol=0.1, rtol=0.05)
                assert not torch.equal(out_half[key].float(), out_full[key])


def test_t5_loads_from_a_saved_directory(tmp_path, spm_model):
    from transformers import T5Tokenizer

    reference = T5TextEncoder(t5_config(spm_model))
    folder = tmp_path / "t5"
    reference.model.save_pretrained(folder)
    loaded = T5TextEncoder(
        T5EncoderConfig(path=str(folder), tokenizer_path=spm_model, max_length=12)
    )
    assert torch.equal(loaded(TEXTS)["sequence"], reference(TEXTS)["sequence"])
    assert torch.equal(loaded(TEXTS)["mask"], reference(TEXTS)["mask"])
    # without tokenizer_path the tokenizer saved next to the weights is used
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "spiece.model").write_bytes(open(spm_model, "rb").read())
    T5Tokenizer.from_pretrained(str(tmp_path / "spm"), extra_ids=0).save_pretrained(folder)
    own = T5TextEncoder(T5EncoderConfig(path=str(folder), max_length=12))
    assert torch.equal(own(TEXTS)["sequence"], reference(TEXTS)["sequence"])
    bf16 = T5TextEncoder(T5EncoderConfig(path=str(folder), dtype="bf16", max_length=12))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_clip_loads_a_checkpoint_and_matches_open_clip(tmp_path):
    import open_clip

    arch_file = tmp_path / "tiny-clip-test.json"
    arch_file.write_text(json.dumps(TINY_CLIP_ARCH))
    open_clip.add_model_config(arch_file)
    torch.manual_seed(3)
    model = open_clip.create_model("tiny-clip-test").eval()
    checkpoint = tmp_path / "clip.pt"
    torch.save(model.state_dict(), checkpoint)

    encoder = ClipTextEncoder(ClipTextEncoderConfig(arch=str(arch_file), path=str(checkpoint)))
    out = encoder(TEXTS)
    tokens = open_clip.get_tokenizer("tiny-clip-test")(TEXTS)
    with torch.no_grad():
        pooled = model.encode_text(tokens)
        penultimate = model.forward_intermediates(text=tokens, text_indices=[1])[
            "text_intermediates"
        ][0]
    assert out["pooled"].shape == (3, 24) and out["sequence"].shape == (3, 77, 32)
    assert torch.allclose(out["pooled"], pooled, atol=1e-5)
    assert torch.allclose(out["sequence"], penultimate, atol=1e-5)
    # a shorter max_length only drops padding: the causal tower sees the same tokens
    short = ClipTextEncoder(
        ClipTextEncoderConfig(arch=str(arch_file), path=str(checkpoint), max_length=12)
    )
    assert torch.allclose(short(TEXTS)["pooled"], pooled, atol=1e-5)
    # baseline: random weights of the same architecture do not match
    random_tower = ClipTextEncoder(
        ClipTextEncoderConfig(arch=str(arch_file), random_init=True, size="full")
    )
    assert not torch.allclose(random_tower(TEXTS)["pooled"], pooled, atol=1e-3)


def test_missing_path_is_an_error_not_random_weights(tmp_path, spm_model):
    missing = tmp_path / "no-such-t5"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
        T5TextEncoder(T5EncoderConfig(path=str(missing), tokenizer_path=spm_model))
    with pytest.raises(FileNotFoundError, match="clip.safetensors does not exist"):
        ClipTextEncoder(ClipTextEncoderConfig(path=str(tmp_path / "clip.safetensors")))
    with pytest.raises(ValueError, match="random_init: true"):
        T5TextEncoder(T5EncoderConfig())
    with pytest.raises(ValueError, match="random_init: true"):
        ClipTextEncoder(ClipTextEncoderConfig())


def test_config_checks_report_each_mistake():
    with pytest.raises(ConfigError) as err:
        from_dict(T5EncoderConfig, {"size": "tiny", "max_length": 64})
    assert "path: missing: set path to a local transformers T5 directory" in str(err.value)
    assert "size: has no effect unless random_init is true" in str(err.value)
    with pytest.raises(ConfigError) as err:
        from_dict(T5EncoderConfig, {"path": "/models/t5", "random_init": True})
    assert "path: cannot be combined with random_init" in str(err.value)
    assert "tokenizer_path: required with random_init" in str(err.value)
    with pytest.raises(ConfigError) as err:
        from_dict(ClipTextEncoderConfig, {"arch": "ViT-L14", "path": "/m/clip.pt", "seed": 3})
    assert "did you mean 'ViT-L-14'" in str(err.value) and "seed: has no effect" in str(err.value)
    with pytest.raises(ConfigError, match="exceeds the context length 77"):
        from_dict(ClipTextEncoderConfig, {"random_init": True, "max_length": 100})
    with pytest.raises(ConfigError, match="not supported"):
        from_dict(ClipTextEncoderConfig, {"arch": "coca_ViT-B-32", "random_init": True})
    ok = from_dict(
        ClipTextEncoderConfig,
        {"arch": "ViT-bigG-14", "path": "/m/bigG.safetensors", "dtype": "bf16"},
    )
    assert ok.dtype == "bf16"


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_sharded_encoders_match_unsharded(one_rank_group, spm_model):
    from torch.distributed.tensor import DTensor

    for encoder in (
        T5TextEncoder(t5_config(spm_model)),
        ClipTextEncoder(clip_config(dtype="bf16")),
    ):
        reference = encoder(TEXTS)
        shard_frozen_module(encoder, one_rank_group)
        layer = encoder.transformer_layers()[0]
        assert all(isinstance(p, DTensor) for p in layer.parameters())
        out = encoder(TEXTS)
        for key, value in reference.items():
            assert torch.equal(out[key], value), key
        # after forward every weight is back to its shard, the root's embedding included
        assert all(isinstance(p, DTensor) for p in encoder.parameters())
        _assert_frozen(encoder)


def _two_rank_worker(rank: int, init_file: str, spm_model: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        # every rank builds the same random encoder from the seed, then keeps half of it
        encoder = T5TextEncoder(t5_config(spm_model))
        reference = encoder(TEXTS)
        full = {n: p.detach().clone() for n, p in encoder.named_parameters()}
        shard_frozen_module(encoder, mesh)
        for name, param in encoder.named_parameters():
            chunks = full[name].chunk(2)  # FSDP2 shards dim 0 as torch.chunk does
            expected = chunks[rank] if rank < len(chunks) else full[name][:0]
            assert torch.equal(param.to_local(), expected), name
        out = encoder(TEXTS)
        assert torch.equal(out["sequence"], reference["sequence"])
        assert torch.equal(out["mask"], reference["mask"])
        # no rank tears gloo down while its peer may still hold a connection open: an
        # early teardown aborted rank 0 in C++ ("terminate called without an active
        # exception") once in CI
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_each_hold_half_and_agree_with_unsharded(tmp_path, spm_model):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), spm_model), nprocs=2, join=True)
