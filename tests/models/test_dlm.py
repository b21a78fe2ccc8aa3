"""The text transformer of the diffusion LMs: shapes, KV cache, positions, per-token sigma,
attention masks, FSDP2 parity and the FLOPs formula."""

from __future__ import annotations

import warnings

import pytest
import torch

from models.common.init import ParamInit
from models.common.parallelize import ParallelPlan
from models.dlm import DLMConfig, KVCache, build, num_params, parallelize

V, L = 37, 12
ATOL = 2e-5


def make_model(time_conditioning: bool = True, seed: int = 9, **overrides):
    """A tiny DLM with random weights everywhere (init_weights zeroes the head and adaLN,
    which would hide most of what these tests look at)."""
    dims = {"width": 32, "depth": 2, "num_heads": 4, "cond_dim": 16, **overrides}
    cfg = DLMConfig(vocab_size=V, max_seq_len=16, time_conditioning=time_conditioning, **dims)
    if not time_conditioning:
        cfg.cond_dim = None
    model = build(cfg)
    model.init_weights(0)
    randomise(model, seed)
    return model.eval()


def randomise(model, seed: int) -> None:
    init = ParamInit(model, seed)
    for param in model.parameters():
        init.normal_(param, 0.2)


def tokens(batch: int = 2, length: int = L, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def causal(length: int) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool).tril()


def test_shapes_dtype_and_uniform_start():
    cfg = DLMConfig(vocab_size=V, max_seq_len=16)
    model = build(cfg)
    model.init_weights(0)
    x = tokens()
    for sigma in (torch.rand(2), torch.rand(2, L)):
        logits = model(x, sigma)
        assert logits.shape == (2, L, V) and logits.dtype == torch.float32
        # zero head: the untrained model predicts the uniform distribution (loss = ln V)
        assert torch.equal(logits, torch.zeros_like(logits))
    with pytest.raises(ValueError, match="pass sigma"):
        model(x)
    with pytest.raises(ValueError, match="sigma has shape"):
        model(x, torch.rand(3))
    with pytest.raises(ValueError, match="bool"):
        model(x, torch.rand(2), attn_mask=causal(L).float())
    # without time conditioning sigma is optional and ignored
    plain = make_model(time_conditioning=False)
    assert torch.equal(plain(x), plain(x, torch.rand(2)))
    assert plain.vocab_size == V and plain.max_seq_len == 16


def test_config_checks():
    assert DLMConfig(vocab_size=V, width=30, num_heads=4).check(set())[0][0] == "num_heads"
    assert "even" in DLMConfig(vocab_size=V, width=36, num_heads=4).check(set())[0][1]
    cfg = DLMConfig(vocab_size=V, time_conditioning=False, cond_dim=8)
    assert cfg.check({"time_conditioning", "cond_dim"}) == [
        ("cond_dim", "has no effect with time_conditioning: false")
    ]
    assert DLMConfig(vocab_size=V, size="small").check(set()) == []


@pytest.mark.parametrize("time_conditioning", [True, False])
def test_kv_cache_decoding_equals_causal_forward(time_conditioning):
    model = make_model(time_conditioning)
    x, sigma = tokens(), torch.tensor([0.3, 1.7])
    with torch.no_grad():
        full = model(x, sigma, attn_mask=causal(L))
        bidirectional = model(x, sigma)
        cache = model.new_kv_cache()
        prefill = 5  # a causal prefill, then one token at a time
        steps = [model(x[:, :prefill], sigma, attn_mask=causal(prefill), kv_cache=cache)]
        assert len(cache) == prefill
        for i in range(prefill, L):
            steps.append(model(x[:, i : i + 1], sigma, kv_cache=cache))
        decoded = torch.cat(steps, dim=1)
    assert len(cache) == L
    assert torch.allclose(decoded, full, atol=ATOL)
    # the comparison sees attention: bidirectional logits differ from the decoded ones
    assert (bidirectional[:, :-1] - decoded[:, :-1]).abs().max() > 1e-2


def test_frozen_cache_truncate_and_reorder():
    """BD3-LM's pattern: denoise a block against a frozen prefix, then commit it."""
    model = make_model()
    x, sigma = tokens(length=8), torch.tensor([0.5, 2.0])
    block_causal = torch.ones(8, 8, dtype=torch.bool)
    block_causal[:4, 4:] = False  # block 0 sees itself, block 1 sees both
    with torch.no_grad():
        reference = model(x, sigma, attn_mask=block_causal)
        cache = model.new_kv_cache()
        model(x[:, :4], sigma, kv_cache=cache)
        cache.frozen = True
        for _ in range(2):  # repeated denoising passes leave the cache alone
            second = model(x[:, 4:], sigma, kv_cache=cache)
            assert len(cache) == 4
        assert torch.allclose(second, reference[:, 4:], atol=ATOL)
        cache.frozen = False
        model(x[:, 4:], sigma, kv_cache=cache)
        assert len(cache) == 8
        # truncate back to block 0 and decode block 1 again: same result
        cache.truncate(4)
        cache.frozen = True
        assert torch.allclose(model(x[:, 4:], sigma, kv_cache=cache), second, atol=ATOL)
        # reorder: swapping the sequences swaps the outputs
        cache.reorder(torch.tensor([1, 0]))
        swapped = model(x[[1, 0], 4:], sigma[[1, 0]], kv_cache=cache)
        assert torch.allclose(swapped, second[[1, 0]], atol=ATOL)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(9)
    assert isinstance(cache, KVCache)


def test_positions_travel_with_tokens():
    model = make_model()
    x, sigma = tokens(), torch.tensor([0.3, 1.7])
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(x, sigma)
        # bidirectional attention with RoPE: permuting tokens with their positions permutes
        # the outputs ...
        moved = model(x[:, perm], sigma, positions=perm)
        # ... and only relative positions matter
        shifted = model(x, sigma, positions=torch.arange(L) + 37)
        # per-row positions: row 1 shifted, row 0 permuted
        rows = model(x, sigma, positions=torch.stack([torch.arange(L), torch.arange(L) + 5]))
        forgot = model(x[:, perm], sigma)  # baseline: permuted tokens at default positions
    assert torch.allclose(moved, base[:, perm], atol=ATOL)
    assert torch.allclose(shifted, base, atol=1e-4)
    assert torch.allclose(rows, base, atol=1e-4)
    assert (forgot - base[:, perm]).abs().max() > 1e-2


def test_repeated_positions_for_bd3lm_training_pass():
    """x_t ++ x_0 with positions arange(L) twice: the x_0 half seen only by itself equals a
    plain forward of x_0."""
    model = make_model()
    x_t, x_0, sigma = tokens(seed=1), tokens(seed=2), torch.tensor([0.3, 1.7])
    mask = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    mask[:, L:] = True  # everything sees x_0; x_0 sees only x_0
    mask[:L, :L] = True
    both = model(
        torch.cat([x_t, x_0], 1), sigma, attn_mask=mask, positions=torch.arange(L).repeat(2)
    )
    assert torch.allclose(both[:, L:], model(x_0, sigma), atol=ATOL)


def test_per_token_sigma():
    model = make_model()
    x = tokens()
    sigma_B = torch.tensor([0.3, 1.7])
    with torch.no_grad():
        per_sequence = model(x, sigma_B)
        per_token = model(x, sigma_B[:, None].expand(2, L).contiguous())
        other = model(x, torch.tensor([0.3, 1.0]))
    assert torch.allclose(per_token, per_sequence, atol=ATOL)
    assert (other[1] - per_sequence[1]).abs().max() > 1e-2  # sigma matters
    # two blocks with their own levels, attention kept inside each block: each half equals
    # a per-sequence forward of that half at its level (each token got its own sigma)
    half = L // 2
    levels = torch.tensor([[0.1, 2.5], [1.2, 0.4]])
    sigma_BL = levels.repeat_interleave(half, dim=1)
    block_diag = torch.zeros(L, L, dtype=torch.bool)
    block_diag[:half, :half] = block_diag[half:, half:] = True
    with torch.no_grad():
        mixed = model(x, sigma_BL, attn_mask=block_diag)
        first = model(x[:, :half], levels[:, 0])
        second = model(x[:, half:], levels[:, 1], positions=torch.arange(half, L))
    assert torch.allclose(mixed[:, :half], first, atol=ATOL)
    assert torch.allclose(mixed[:, half:], second, atol=ATOL)


def test_attn_mask_blocks_information():
    model = make_model()
    x, sigma = tokens(), torch.tensor([0.3, 1.7])
    idx = torch.arange(L)
    mask = (idx[:, None] - idx[None]).abs() <= 1  # a band: each token sees its neighbours
    mask[0, L - 1] = True  # and one long-range edge
    j = 4  # perturb token j: with 2 blocks, information spreads 2 hops along the mask
    reach = mask.float()
    reach = ((reach @ reach + reach) > 0)[:, j]
    changed = x.clone()
    changed[:, j] = (changed[:, j] + 1) % V
    with torch.no_grad():
        delta = (model(changed, sigma, attn_mask=mask) - model(x, sigma, attn_mask=mask)).abs()
        delta_full = (model(changed, sigma) - model(x, sigma)).abs()
    per_position = delta.amax(dim=(0, 2))
    assert torch.all(per_position[~reach] == 0), per_position
    assert torch.all(per_position[reach] > 1e-4)
    assert (~reach).any() and torch.all(delta_full.amax(dim=(0, 2)) > 1e-4)  # baseline
    # gradients: logits at a query reach only the tokens it may see (1 block, 1 hop)
    one = make_model(depth=1)
    embedded = {}

    def keep(module, args, out):
        out.retain_grad()
        embedded["x"] = out

    one.embed.register_forward_hook(keep)
    one(x, sigma, attn_mask=mask)[:, 7].sum().backward()
    grad_seen = embedded["x"].grad.abs().amax(dim=(0, 2)) > 0
    assert torch.equal(grad_seen, mask[7])


def _fsdp_worker(rank: int, init_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = DLMConfig(vocab_size=V, max_seq_len=16, width=32, depth=2, num_heads=4, cond_dim=16)
        mesh = init_device_mesh("cpu", (2,))
        plain = build(cfg)
        plain.init_weights(3)
        reference = {k: v.clone() for k, v in plain.state_dict().items()}
        randomise(plain, 5)
        x, sigma_BL = tokens(), torch.rand(2, L, generator=torch.Generator().manual_seed(4))
        mask = causal(L)
        out_plain = plain(x, sigma_BL, attn_mask=mask)
        assert out_plain.abs().max() > 0.5
        out_plain.square().mean().backward()
        for checkpointing in (False, True):
            with torch.device("meta"):
                sharded = build(cfg)
            plan = ParallelPlan(activation_checkpointing=checkpointing)
            sharded = parallelize(sharded, plan, mesh)
            sharded.to_empty(device="cpu")
            sharded.init_weights(3)
            assert isinstance(sharded.blocks[0].qkv.qkv.weight, DTensor)
            for name, value in sharded.state_dict().items():
                assert torch.equal(value.full_tensor(), reference[name]), name
            randomise(sharded, 5)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out_sharded = sharded(x, sigma_BL, attn_mask=mask)
                out_sharded.square().mean().backward()
            # no wrapped module (block or root) returns a view that FSDP2 warns about
            assert not [w for w in caught if "view" in str(w.message)], caught
            assert torch.allclose(out_sharded, out_plain, atol=ATOL)
            for name in ("blocks.1.qkv.qkv.weight", "embed.weight", "time_embed.linear_1.weight"):
                grad = sharded.get_parameter(name).grad.full_tensor()
                assert torch.allclose(grad, plain.get_parameter(name).grad, atol=ATOL), name
        with torch.no_grad():  # KV-cache decoding through the sharded model
            cache = sharded.new_kv_cache()
            sigma_B = sigma_BL[:, 0]
            steps = [sharded(x[:, i : i + 1], sigma_B, kv_cache=cache) for i in range(L)]
            full = plain(x, sigma_B, attn_mask=mask)
        assert torch.allclose(torch.cat(steps, 1), full, atol=ATOL)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_ranks_match_single_process(tmp_path):
    """Sharded init equals unsharded init; outputs, gradients (with and without activation
    checkpointing) and KV-cache decoding equal the single-process model's."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)


@pytest.mark.parametrize("time_conditioning", [True, False])
def test_flops_per_token_matches_flop_counter(time_conditioning):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model(time_conditioning)
    model.train()
    batch, length = 3, 16
    x, sigma = tokens(batch, length), torch.rand(batch)
    # the math backend decomposes attention into counted matmuls
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward_count:
        model(x, sigma)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as train_count:
        model(x, sigma).sum().backward()
    per_sample = model.flops_per_token(length) * length
    assert forward_count.get_total_flops() * 3 == pytest.approx(per_sample * batch, rel=1e-9)
    # backward = 2x forward for every matmul but the sigma embedding's first layer, whose
    # input (fixed sinusoids) needs no gradient
    missing = 0 if not time_conditioning else 2 * model.time_embed.linear_1.weight.numel() * batch
    assert train_count.get_total_flops() + missing == pytest.approx(per_sample * batch, rel=1e-9)
    assert model.flops_per_sample() == model.flops_per_token(16) * 16


def test_preset_parameter_counts():
    counts = {
        size: num_params(DLMConfig(size=size, vocab_size=50258)) for size in ("tiny", "small", "1b")
    }
    assert 10e6 < counts["tiny"] < 20e6
    assert 160e6 < counts["small"] < 180e6  # MDLM / SEDD "small": 12 x 768, untied head
    assert 0.95e9 < counts["1b"] < 1.15e9
