"""MMDiT against diffusers' SD3Transformer2DModel (the published reference), the state-dict
adapter, shapes, sizes, FLOPs, init and FSDP2 equivalence."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models import mmdit_diffusers as adapter
from models.common.init import ParamInit
from models.common.parallelize import ParallelPlan
from models.mmdit import MMDiTConfig, build, num_params, parallelize
from models.mmdit_diffusers import (
    config_from_diffusers,
    config_to_diffusers,
    from_diffusers_state_dict,
    load_diffusers_checkpoint,
    to_diffusers_state_dict,
)

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5
TINY_DIFFUSERS = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 20,
    "out_channels": 4,
    "pos_embed_max_size": 16,
}


def reference_model(qk_norm: str | None = "rms_norm", seed: int = 0):
    """Tiny diffusers SD3 transformer, every parameter perturbed (no zero-init hides a
    mismatch: gates, output projection and modulations all matter)."""
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**TINY_DIFFUSERS, qk_norm=qk_norm).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def inputs(height: int = 8, width: int = 12, batch: int = 2, text_tokens: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=gen)
    t = torch.rand(batch, generator=gen)
    context = torch.randn(batch, text_tokens, 24, generator=gen)
    pooled = torch.randn(batch, 20, generator=gen)
    return x, t, context, pooled


def run_reference(model, x, t, context, pooled) -> torch.Tensor:
    # diffusers' SD3 transformer takes timestep = t * 1000; ours takes t in [0, 1]
    return model(
        x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t * 1000
    ).sample


def ours_from(reference):
    model = build(config_from_diffusers(dict(reference.config))).eval()
    model.load_state_dict(from_diffusers_state_dict(reference.state_dict()), strict=True)
    return model


def parity_error(reference, sizes=((8, 12), (30, 6))) -> float:
    """Max |ours - diffusers| over non-square inputs (different crops of the position table)."""
    ours = ours_from(reference)
    error = 0.0
    for size in sizes:
        x, t, context, pooled = inputs(*size)
        with torch.no_grad():
            theirs = run_reference(reference, x, t, context, pooled)
            mine = ours(x, t, {"context": context, "pooled": pooled})
        assert mine.shape == theirs.shape == x.shape
        assert theirs.abs().max() > 0.5  # a live output, not a zero-initialised one
        error = max(error, (mine - theirs).abs().max().item())
    return error


@pytest.mark.parametrize("qk_norm", ["rms_norm", None])
def test_same_output_as_diffusers(qk_norm):
    assert parity_error(reference_model(qk_norm)) <= ATOL


def test_broken_adapter_fails_parity(monkeypatch):
    reference = reference_model("rms_norm")
    monkeypatch.setitem(
        adapter._BLOCK_FUSED, "x_qkv.qkv", ("attn.to_k", "attn.to_q", "attn.to_v")
    )  # q and k swapped in the image stream
    assert parity_error(reference) > 100 * ATOL


def test_broken_time_convention_fails_parity():
    reference = reference_model("rms_norm")
    ours = ours_from(reference)
    x, t, context, pooled = inputs()
    with torch.no_grad():
        theirs = run_reference(reference, x, t, context, pooled)
        mine = ours(x, t * 1000, {"context": context, "pooled": pooled})  # t in diffusers' units
    assert (mine - theirs).abs().max() > 100 * ATOL


def test_round_trip_and_export_to_diffusers():
    reference = reference_model("rms_norm")
    sd = reference.state_dict()
    cfg = config_from_diffusers(dict(reference.config))
    back = to_diffusers_state_dict(from_diffusers_state_dict(sd), cfg)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key
    diffusers.SD3Transformer2DModel(**config_to_diffusers(cfg)).load_state_dict(back, strict=True)
    # the other way: our own initialised (and perturbed) weights run in diffusers
    ours = build(cfg).eval()
    ours.init_weights(0)
    init = ParamInit(ours, 5)
    for param in ours.parameters():
        init.normal_(param, 0.1)
    exported = diffusers.SD3Transformer2DModel(**config_to_diffusers(cfg)).eval()
    exported.load_state_dict(to_diffusers_state_dict(ours.state_dict(), cfg), strict=True)
    x, t, context, pooled = inputs(12, 8)
    with torch.no_grad():
        mine = ours(x, t, {"context": context, "pooled": pooled})
        theirs = run_reference(exported, x, t, context, pooled)
    assert (mine - theirs).abs().max() <= ATOL


def test_load_diffusers_checkpoint_directories(tmp_path):
    reference = reference_model(None)
    reference.save_pretrained(tmp_path / "single")
    reference.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="40KB")
    assert (tmp_path / "pipe" / "transformer" / adapter.WEIGHTS_INDEX_NAME).exists()
    expected = from_diffusers_state_dict(reference.state_dict())
    sources = [
        tmp_path / "single",
        tmp_path / "single" / adapter.WEIGHTS_NAME,
        tmp_path / "pipe",  # pipeline directory: transformer/ subfolder, sharded
    ]
    for source in sources:
        cfg, state = load_diffusers_checkpoint(source)
        assert cfg == config_from_diffusers(
            json.loads((tmp_path / "single" / "config.json").read_text())
        )
        assert sorted(state) == sorted(expected)
        for key, value in expected.items():
            assert torch.equal(state[key], value), (source, key)
    model = build(cfg)
    model.load_state_dict(state, strict=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_diffusers_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(dict(reference.config)))
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_diffusers_checkpoint(tmp_path / "empty")


def test_config_from_diffusers():
    cfg = config_from_diffusers(
        {**TINY_DIFFUSERS, "qk_norm": "rms_norm", "_class_name": "SD3Transformer2DModel"}
    )
    assert cfg.dims() == {"depth": 3, "num_heads": 2, "head_dim": 16}
    assert (cfg.context_dim, cfg.pooled_dim, cfg.pos_max_grid, cfg.pos_base_grid) == (24, 20, 16, 4)
    assert cfg.qk_norm and not config_from_diffusers(TINY_DIFFUSERS).qk_norm
    assert config_to_diffusers(cfg) == {
        **TINY_DIFFUSERS,
        "qk_norm": "rms_norm",
        "dual_attention_layers": (),
    }
    # SD3.5-large-like dims pick the 8b preset
    large = {
        "num_layers": 38,
        "num_attention_heads": 38,
        "caption_projection_dim": 2432,
        "qk_norm": "rms_norm",
    }
    assert config_from_diffusers(large).size == "8b"
    bad = {
        **TINY_DIFFUSERS,
        "caption_projection_dim": 48,
        "dual_attention_layers": [0, 1],
        "qk_norm": "layer_norm",
        "use_rope": True,
    }
    with pytest.raises(ValueError) as err:
        config_from_diffusers(bad)
    for fragment in (
        "caption_projection_dim 48",
        "dual_attention_layers",
        "'layer_norm'",
        "use_rope",
    ):
        assert fragment in str(err.value)


def test_adapter_rejects_unknown_keys():
    sd = reference_model(None).state_dict()
    with pytest.raises(ValueError, match="attn2"):
        from_diffusers_state_dict({**sd, "transformer_blocks.0.attn2.to_q.weight": torch.zeros(1)})
    del sd["transformer_blocks.1.attn.to_k.bias"]
    with pytest.raises(ValueError, match="q/k/v"):
        from_diffusers_state_dict(sd)


@pytest.mark.parametrize("size", [(8, 12), (12, 8), (16, 16), (4, 32), (32, 2), (2, 2)])
def test_shapes_for_aspect_ratios(size):
    model = build(config_from_diffusers(TINY_DIFFUSERS))
    model.init_weights(0)
    x, t, context, pooled = inputs(*size, batch=3, text_tokens=5)
    out = model(x, t, {"context": context, "pooled": pooled})
    assert out.shape == x.shape


def test_inputs_larger_than_the_position_table_raise():
    model = build(config_from_diffusers(TINY_DIFFUSERS))  # table 16 x 16 patches = 32 x 32 latents
    model.init_weights(0)
    for size in [(34, 8), (8, 34)]:
        x, t, context, pooled = inputs(*size)
        with pytest.raises(ValueError, match="exceed the position table"):
            model(x, t, {"context": context, "pooled": pooled})


def test_preset_parameter_counts_match_diffusers():
    for size, expected in [("sd3_medium", 2.0e9), ("8b", 8.0e9)]:
        cfg = MMDiTConfig(size=size)
        count = num_params(cfg)
        assert abs(count - expected) / expected < 0.10, (size, count)
        with torch.device("meta"):
            reference = diffusers.SD3Transformer2DModel(**config_to_diffusers(cfg))
        assert count == sum(p.numel() for p in reference.parameters()), size


def test_flops_per_sample_hand_count():
    depth, width, ctx_dim, pooled_dim, channels, patch = 2, 32, 24, 20, 4, 2
    cfg = MMDiTConfig(
        size="tiny",
        in_channels=channels,
        patch_size=patch,
        context_dim=ctx_dim,
        pooled_dim=pooled_dim,
    )
    model = build(cfg)
    assert cfg.dims() == {"depth": depth, "num_heads": 2, "head_dim": 16}
    image_tokens, text_tokens = 24, 7
    d2 = width * width
    per_stream_block = 3 * d2 + d2 + 2 * 4 * d2  # qkv, out, MLP
    image_w = depth * per_stream_block + 2 * width * channels * patch * patch  # + patchify, head
    text_w = (depth - 1) * per_stream_block + 3 * d2 + ctx_dim * width  # last block: qkv only
    vector_w = 256 * width + d2 + pooled_dim * width + d2  # time MLP, pooled MLP
    vector_w += depth * 6 * d2 + (depth - 1) * 6 * d2 + 2 * d2 + 2 * d2  # x_mod, c_mod, final
    seq = image_tokens + text_tokens
    forward = (
        2 * (image_w * image_tokens + text_w * text_tokens + vector_w)
        + depth * 4 * seq * seq * width
    )
    assert model.flops_per_sample(image_tokens, text_tokens) == 3 * forward
    assert model.flops_per_sample() == model.flops_per_sample((128 // 2) ** 2, 333)


def test_init_weights_is_identity_at_start():
    model = build(config_from_diffusers({**TINY_DIFFUSERS, "qk_norm": "rms_norm"}))
    model.init_weights(0)
    x, t, context, pooled = inputs()
    assert torch.equal(model(x, t, {"context": context, "pooled": pooled}), torch.zeros_like(x))
    tokens, text, vec = torch.randn(2, 24, 32), torch.randn(2, 7, 32), torch.randn(2, 32)
    out_tokens, out_text = model.blocks[0](tokens, text, vec)
    assert torch.equal(out_tokens, tokens) and torch.equal(out_text, text)
    last_tokens, last_text = model.blocks[-1](tokens, text, vec)
    assert torch.equal(last_tokens, tokens) and last_text is None
    # fused q/k/v: each of the three matrices xavier-initialised on its own
    qkv = model.blocks[0].x_qkv.qkv.weight
    assert math.sqrt(6 / (4 * 32)) < qkv.abs().max() <= math.sqrt(6 / (2 * 32))
    assert model.patch_embed.pos_table.abs().max() > 0


@pytest.fixture
def gloo_group():
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    yield init_device_mesh("cpu", (1,))
    if created:
        dist.destroy_process_group()


def sharded_model(cfg: MMDiTConfig, plan: ParallelPlan, mesh, seed: int = 3):
    with torch.device("meta"):
        model = build(cfg)
    model = parallelize(model, plan, mesh)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


def randomise(model, seed: int = 9) -> None:
    """Same random weights whatever the sharding (ParamInit draws per parameter name)."""
    init = ParamInit(model, seed)
    with torch.no_grad():
        for param in model.parameters():
            init.normal_(param, 0.1)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fsdp2_one_rank_matches_unsharded(gloo_group, checkpointing):
    from torch.distributed.tensor import DTensor

    cfg = config_from_diffusers({**TINY_DIFFUSERS, "qk_norm": "rms_norm"})
    plan = ParallelPlan(activation_checkpointing=checkpointing)
    sharded = sharded_model(cfg, plan, gloo_group)
    plain = build(cfg)
    plain.init_weights(3)
    assert isinstance(sharded.blocks[0].x_qkv.qkv.weight, DTensor)
    for (name, a), (_, b) in zip(sharded.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a.full_tensor(), b), name
    assert torch.equal(sharded.patch_embed.pos_table, plain.patch_embed.pos_table)
    randomise(sharded)
    randomise(plain)
    x, t, context, pooled = inputs()
    cond = {"context": context, "pooled": pooled}
    out_sharded, out_plain = sharded(x, t, cond), plain(x, t, cond)
    assert out_plain.abs().max() > 0.5
    assert torch.allclose(out_sharded, out_plain, atol=ATOL)
    out_sharded.square().mean().backward()
    out_plain.square().mean().backward()
    grad = sharded.blocks[1].c_qkv.qkv.weight.grad.full_tensor()
    assert torch.allclose(grad, plain.blocks[1].c_qkv.qkv.weight.grad, atol=ATOL)


def test_fsdp2_bf16_keeps_time_in_fp32(gloo_group, monkeypatch):
    """bf16 parameters must not round t: 0.899 and 0.9 are the same bf16 number."""
    cfg = config_from_diffusers(TINY_DIFFUSERS)
    assert torch.tensor(0.899).bfloat16() == torch.tensor(0.9).bfloat16()

    def time_sensitivity(model) -> float:
        randomise(model)
        x, _, context, pooled = inputs(batch=1)
        cond = {"context": context, "pooled": pooled}
        with torch.no_grad():
            a, b = model(x, torch.tensor([0.899]), cond), model(x, torch.tensor([0.9]), cond)
        assert a.dtype == torch.bfloat16
        return (a.float() - b.float()).abs().max().item()

    plan = ParallelPlan(param_dtype="bf16")
    assert time_sensitivity(sharded_model(cfg, plan, gloo_group)) > 0
    # baseline: FSDP2 casting the root's inputs (t included) to bf16 loses the difference
    import models.common.parallelize as parallelize_module

    original = parallelize_module.apply_parallelism
    monkeypatch.setattr(
        parallelize_module,
        "apply_parallelism",
        lambda *args, **kwargs: original(*args, **{**kwargs, "cast_root_inputs": True}),
    )
    assert time_sensitivity(sharded_model(cfg, plan, gloo_group)) == 0
