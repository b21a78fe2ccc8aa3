"""DC-AE: same function as diffusers' AutoencoderDC (res and linear-attention stages, a
space-to-channel stem, BatchNorm/ReLU decoder stages), presets, shortcuts, bad configs."""

from __future__ import annotations

import json

import pytest
import torch

from configlib import ConfigError, from_dict
from models.common.presets import count_params_on_meta
from models.dc_ae import DCAE, DCAEConfig, config_from_diffusers, load_diffusers_checkpoint

diffusers = pytest.importorskip("diffusers")

TINY = dict(
    in_channels=3,
    latent_channels=8,
    attention_head_dim=8,
    encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[16, 32, 64],
    decoder_block_out_channels=[16, 32, 64],
    encoder_layers_per_block=[1, 1, 2],
    decoder_layers_per_block=[1, 2, 1],
    encoder_qkv_multiscales=[[], [], [3]],
    decoder_qkv_multiscales=[[], [], [3]],
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.4,
)
# the published f32/f64 layout: a space-to-channel stem (no stage-0 blocks) and BatchNorm +
# ReLU in the decoder's high-resolution stages
STEM = dict(
    encoder_layers_per_block=[0, 1, 1],
    decoder_layers_per_block=[0, 1, 1],
    decoder_norm_types=["batch_norm", "batch_norm", "rms_norm"],
    decoder_act_fns=["relu", "relu", "silu"],
)


def reference(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderDC(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # non-trivial norms and BatchNorm statistics
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def ours_from(ref) -> DCAE:
    model = DCAE(config_from_diffusers(dict(ref.config))).eval()
    model.load_state_dict(ref.state_dict())
    return model


def images(batch=2, height=32, width=48, seed=1):
    return (
        torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    )


@pytest.mark.parametrize("overrides", [{}, STEM], ids=["res-vit", "stem-batchnorm"])
@pytest.mark.parametrize("size", [(32, 48), (8, 8)], ids=["linear-attn", "quadratic-attn"])
def test_same_function_as_diffusers(overrides, size):
    ref = reference(**overrides)
    ours = ours_from(ref)
    x = images(height=size[0], width=size[1])
    with torch.no_grad():
        z_ref = ref.encode(x).latent
        z = ours.encode_raw(x)
        torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ours.decode_raw(z), ref.decode(z_ref).sample, atol=1e-5, rtol=1e-5
        )
    assert ours.downsample == 4 and z.shape == (2, 8, size[0] // 4, size[1] // 4)
    # latent normalisation uses diffusers' scaling_factor
    torch.testing.assert_close(ours.encode(x), z * 0.4)


def test_parity_fails_for_a_wrong_adapter():
    """The parity test can fail: swapping the query and key projections changes the output."""
    ref = reference()
    state = dict(ref.state_dict())
    for key in [k for k in state if k.endswith("attn.to_q.weight")]:
        other = key.replace("to_q", "to_k")
        state[key], state[other] = state[other], state[key]
    ours = DCAE(config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(ours.encode_raw(images()), ref.encode(images()).latent, atol=1e-3)


def test_loads_a_saved_diffusers_directory(tmp_path):
    ref = reference(**STEM)
    ref.save_pretrained(tmp_path / "vae")
    cfg, state = load_diffusers_checkpoint(tmp_path)  # a pipeline root: finds vae/
    ours = DCAE(cfg).eval()
    ours.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_raw(images()), ref.encode(images()).latent)
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config["encoder_block_out_channels"] = [16, 32, 32]
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="decoder_block_out_channels"):
        load_diffusers_checkpoint(tmp_path)


def test_presets_match_diffusers_parameter_counts():
    """Our f32c32 preset is diffusers' AutoencoderDC with the same layout (all RMSNorm)."""
    from models.dc_ae import PRESETS

    d = PRESETS["f32c32"]
    kinds = ["ResBlock" if k == "res" else "EfficientViTBlock" for k in d["blocks"]]
    scales = [[] if k == "res" else d["qkv_kernels"] for k in d["blocks"]]
    with torch.device("meta"):
        ref = diffusers.AutoencoderDC(
            latent_channels=32, encoder_block_types=kinds, decoder_block_types=kinds,
            encoder_block_out_channels=d["channels"], decoder_block_out_channels=d["channels"],
            encoder_layers_per_block=d["encoder_layers"], decoder_layers_per_block=d["decoder_layers"],
            encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales,
        )  # fmt: skip
    ours = count_params_on_meta(DCAE, DCAEConfig(size="f32c32"))
    assert ours == sum(p.numel() for p in ref.parameters())
    assert DCAE(DCAEConfig(size="tiny")).downsample == 4
    with torch.device("meta"):
        assert DCAE(DCAEConfig(size="f32c32")).downsample == 32
        assert DCAE(DCAEConfig(size="f64c128")).downsample == 64


@pytest.mark.parametrize("cin, cout", [(4, 16), (4, 8), (8, 8)])
def test_space_channel_shortcuts_invert_each_other(cin, cout):
    """The residual shortcuts alone (convs zeroed) move space into channels and back:
    down then up returns a 2x2-block-constant image exactly, whatever the width ratio,
    so a deep stack starts from an identity-like path instead of learning one."""
    from models.dc_ae import ChannelToSpace, SpaceToChannel

    down, up = SpaceToChannel(cin, cout), ChannelToSpace(cout, cin)
    with torch.no_grad():
        for layer in (down, up):
            layer.conv.weight.zero_()
            layer.conv.bias.zero_()
        coarse = torch.randn(2, cin, 3, 5, generator=torch.Generator().manual_seed(0))
        x = coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        z = down(x)
        assert z.shape == (2, cout, 3, 5)
        torch.testing.assert_close(up(z), x)
        # and the down shortcut is an average: its channel mean is the image's block mean
        torch.testing.assert_close(z.mean(1), coarse.mean(1))


def test_forward_is_deterministic_and_rejects_noise():
    model = DCAE(DCAEConfig(size="tiny"))
    model.init_weights(0)
    x = images(height=16, width=16)
    recon, latent, logvar = model(x)
    assert recon.shape == x.shape and latent.shape == (2, 4, 4, 4) and logvar is None
    torch.testing.assert_close(model(x)[0], recon)
    with pytest.raises(ValueError, match="deterministic"):
        model(x, torch.zeros_like(latent))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        model(images(height=18, width=16))


def test_initialisation_is_seeded_by_name():
    a, b = DCAE(DCAEConfig(size="tiny")), DCAE(DCAEConfig(size="tiny"))
    a.init_weights(3)
    b.init_weights(3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, msg=name)
    b.init_weights(4)
    assert not torch.equal(a.encoder.conv_in.weight, b.encoder.conv_in.weight)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"encoder_layers": [1, 1]}, "encoder_layers: has 2 entries for 3 stages"),
        ({"decoder_layers": [1, 0, 1]}, "decoder_layers: must be >= 1 per stage"),
        ({"blocks": ["res", "res", "conv"]}, "blocks: stage 2: 'conv'"),
        ({"head_dim": 12}, "head_dim: 12 does not divide stage 2"),
        ({"latent_channels": 7}, "latent_channels: 7 does not divide"),
        ({"channels": [16, 48, 64]}, "channels: stages 0->1"),
        ({"decoder_norms": ["rms_norm", "layer_norm", "rms_norm"]}, "decoder_norms: stage 1"),
        ({"qkv_kernels": [4]}, "qkv_kernels: kernel sizes must be odd"),
    ],
)
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        from_dict(DCAEConfig, {"size": "tiny", **overrides})


def _export(model: DCAE, path, model_section: dict, **meta) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"model": json.dumps(model_section), **meta})


def test_an_exported_dc_ae_is_a_frozen_autoencoder(tmp_path):
    """A DC-AE file from trainer.export (metadata names the family) loads through the same
    autoencoder section as the KL-VAE; the family and the architecture must agree."""
    from models.autoencoders import (
        PretrainedDCAEConfig,
        PretrainedKLVAEConfig,
        build_autoencoder,
        pretrained_config,
    )

    trained = DCAE(DCAEConfig(size="tiny"))
    trained.init_weights(5)
    path = tmp_path / "dcae.safetensors"
    _export(trained, path, {"name": "dc_ae", "size": "tiny"}, latent_scale="0.5")
    cfg = pretrained_config(path)
    assert isinstance(cfg, PretrainedDCAEConfig)
    frozen = build_autoencoder(cfg)
    x = images(height=16, width=16)
    with torch.no_grad():
        torch.testing.assert_close(frozen.encode(x), trained.encode_raw(x) * 0.5)
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match="holds a dc_ae model, not a kl_vae"):
        build_autoencoder(from_dict(PretrainedKLVAEConfig, {"path": str(path)}))
    with pytest.raises(ValueError, match="latent_channels: recipe 8, .* 4"):
        build_autoencoder(
            from_dict(PretrainedDCAEConfig, {"path": str(path), "latent_channels": 8})
        )
    # a diffusers AutoencoderDC directory goes through the same section
    ref = reference()
    ref.save_pretrained(tmp_path / "diffusers")
    loaded = build_autoencoder(
        from_dict(PretrainedDCAEConfig, {"path": str(tmp_path / "diffusers")})
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(images()), ref.encode(images()).latent * 0.4)
    random = build_autoencoder(from_dict(PretrainedDCAEConfig, {"random_init": True, "seed": 2}))
    assert random.latent_channels == 4
