"""The KL-VAE: same function as diffusers' AutoencoderKL, adapters both ways, presets."""

from __future__ import annotations

import json

import pytest
import torch

from configlib import ConfigError, from_dict
from models.common.presets import count_params_on_meta
from models.kl_vae import (
    KLVAE,
    KLVAEConfig,
    build,
    config_from_diffusers,
    from_diffusers_state_dict,
    kl_divergence,
    load_diffusers_checkpoint,
    to_diffusers_state_dict,
)

diffusers = pytest.importorskip("diffusers")

TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 32],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    scaling_factor=0.5,
    shift_factor=0.1,
)


def reference(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(**{**TINY, **overrides}).eval()


def ours_from(ref) -> KLVAE:
    model = KLVAE(config_from_diffusers(dict(ref.config))).eval()
    model.load_state_dict(from_diffusers_state_dict(ref.state_dict()))
    return model


def images(batch: int = 2, height: int = 16, width: int = 24, seed: int = 1) -> torch.Tensor:
    return (
        torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    )


@pytest.mark.parametrize("overrides", [{}, {"use_quant_conv": False, "use_post_quant_conv": False}])
def test_same_function_as_diffusers(overrides):
    ref = reference(**overrides)
    ours = ours_from(ref)
    x = images()
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode_moments(x)
        assert torch.allclose(mean, dist.mean, atol=1e-5)
        assert torch.allclose(logvar, dist.logvar, atol=1e-5)
        z = torch.randn_like(mean)
        assert torch.allclose(ours.decode_raw(z), ref.decode(z).sample, atol=1e-5)
    assert ours.downsample == 4 and mean.shape == (2, 4, 4, 6)


def test_a_wrong_adapter_fails_parity(monkeypatch):
    # swapping q and k is the kind of mistake the parity check must catch
    import models.kl_vae as kl

    monkeypatch.setitem(kl._PART, "to_q", 1)
    monkeypatch.setitem(kl._PART, "to_k", 0)
    ref = reference()
    ours = ours_from(ref)
    x = images()
    with torch.no_grad():
        assert not torch.allclose(
            ours.encode_moments(x)[0], ref.encode(x).latent_dist.mean, atol=1e-4
        )


def test_round_trip_to_diffusers_and_legacy_names():
    ref = reference()
    ours = ours_from(ref)
    back = to_diffusers_state_dict(ours.state_dict())
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    # pre-0.14 diffusers checkpoints name the attention query/key/value/proj_attn
    legacy = {
        k.replace("to_q", "query")
        .replace("to_k", "key")
        .replace("to_v", "value")
        .replace("to_out.0", "proj_attn"): v
        for k, v in back.items()
    }
    assert {k: v.shape for k, v in from_diffusers_state_dict(legacy).items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }


def test_normalised_latents_use_scale_and_shift():
    ours = ours_from(reference())
    x = images()
    raw = ours.encode_raw(x)
    assert torch.allclose(ours.encode(x), (raw - 0.1) * 0.5)
    z = ours.encode(x)
    assert torch.allclose(ours.decode(z), ours.decode_raw(raw), atol=1e-5)


def test_load_diffusers_directory_and_pipeline(tmp_path):
    ref = reference(seed=3)
    ref.save_pretrained(tmp_path / "pipe" / "vae")
    for where in (tmp_path / "pipe", tmp_path / "pipe" / "vae"):
        cfg, state = load_diffusers_checkpoint(where)
        model = KLVAE(cfg)
        model.load_state_dict(state)
        assert cfg.scale == 0.5 and cfg.shift == 0.1 and cfg.latent_channels == 4
    # a config.json that does not describe the weights is named, not half-loaded
    config = json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text())
    config["latent_channels"] = 8
    (tmp_path / "pipe" / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="wrong shape"):
        load_diffusers_checkpoint(tmp_path / "pipe")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_diffusers_checkpoint(tmp_path / "nowhere")


def test_unsupported_diffusers_configs_are_rejected():
    with pytest.raises(ConfigError, match="act_fn"):
        config_from_diffusers({**TINY, "act_fn": "gelu"})
    with pytest.raises(ConfigError, match="use_quant_conv"):
        config_from_diffusers({**TINY, "use_quant_conv": False})


@pytest.mark.parametrize("size", ["sd", "sd3"])
def test_presets_match_diffusers_parameter_counts(size):
    cfg = KLVAEConfig(size=size)
    d = cfg.dims()
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=d["channels"],
            layers_per_block=2,
            latent_channels=d["latent_channels"],
            use_quant_conv=d["quant_conv"],
            use_post_quant_conv=d["quant_conv"],
        )
    assert count_params_on_meta(build, cfg) == sum(p.numel() for p in ref.parameters())
    assert d["channels"] == [128, 256, 512, 512]


def test_sd3_preset_latents_are_16_channel_f8():
    with torch.device("meta"):
        model = build(KLVAEConfig(size="sd3"))
    assert model.latent_shape(3, 1024, 768) == (16, 128, 96)
    assert (model.scale, model.shift) == (1.5305, 0.0609)


def test_bad_inputs_and_configs_are_clear():
    model = build(KLVAEConfig())
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 2"):
        model.encode_moments(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        model.encode_moments(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="expected latents"):
        model.decode_raw(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="norm_groups"):
        from_dict(KLVAEConfig, {"channels": [12, 24]})


def test_init_is_seeded_by_name_and_the_sample_is_the_posterior():
    a, b, c = build(KLVAEConfig()), build(KLVAEConfig()), build(KLVAEConfig())
    a.init_weights(5), b.init_weights(5), c.init_weights(6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.encoder.conv_in.weight, c.encoder.conv_in.weight)
    x = images(height=16, width=16)
    with torch.no_grad():
        recon, mean, logvar = a(x, generator=torch.Generator().manual_seed(0))
        again, _, _ = a(x, generator=torch.Generator().manual_seed(0))
        other, _, _ = a(x, generator=torch.Generator().manual_seed(1))
    assert recon.shape == x.shape and torch.equal(recon, again) and not torch.equal(recon, other)
    # the KL term is zero exactly at the prior and positive away from it
    zeros = torch.zeros(2, 4, 8, 8)
    assert torch.equal(kl_divergence(zeros, zeros), torch.zeros(2))
    assert (kl_divergence(mean, logvar) > 0).all()
