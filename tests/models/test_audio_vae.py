"""The 1-D audio VAE: shapes through the shared Autoencoder interface, one-line errors for
lengths and recipes that do not fit, and the multi-resolution STFT loss against a direct
numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configlib import ConfigError
from models.audio_vae import AudioVAE, AudioVAEConfig
from models.autoencoders import build_autoencoder, pretrained_config
from trainer.objectives.autoencoding import snr, stft_distance
from trainer.registry import load_config


def test_shapes_through_the_autoencoder_interface():
    model = AudioVAE(AudioVAEConfig())
    model.init_weights(0)
    assert model.downsample == 32 and model.latent_shape(1, 8000) == (8, 250)
    audio = torch.randn(2, 1, 8000).clamp(-1, 1)
    recon, mean, logvar = model(audio, torch.zeros(2, 8, 250))
    assert recon.shape == audio.shape and mean.shape == logvar.shape == (2, 8, 250)
    assert model.decode(model.encode(audio)).shape == audio.shape
    with pytest.raises(
        ValueError, match="^length 8001 is not divisible by the downsampling factor 32$"
    ):
        model.encode(torch.zeros(1, 1, 8001))
    with pytest.raises(ValueError, match=r"expected audio \(B, 1, T\), got \(1, 2, 64\)"):
        model.encode(torch.zeros(1, 2, 64))
    stable = AudioVAE(AudioVAEConfig(size="stable_audio", in_channels=2))
    assert stable.downsample == 2048 and stable.latent_channels == 64


def test_odd_strides_keep_lengths_exact():
    model = AudioVAE(AudioVAEConfig(channels=[8, 8, 8], strides=[3, 5], latent_channels=2))
    model.init_weights(1)
    audio = torch.randn(1, 1, 15 * 7)
    assert model(audio)[0].shape == audio.shape


def _direct_stft_loss(x: np.ndarray, y: np.ndarray, size: int) -> float:
    """Hann-windowed frames every size/4 samples of the centred, reflect-padded signal."""
    hop, window = size // 4, np.hanning(size + 1)[:-1]  # periodic Hann, like torch's

    def mags(v):
        padded = np.pad(v, size // 2, mode="reflect")
        frames = [padded[i : i + size] * window for i in range(0, len(padded) - size + 1, hop)]
        return np.maximum(np.abs(np.fft.rfft(np.array(frames), axis=1)).T, 1e-7)

    mx, my = mags(x), mags(y)
    convergence = np.linalg.norm(my - mx) / np.linalg.norm(my)
    return float(convergence + np.abs(np.log(my) - np.log(mx)).mean())


def test_stft_distance_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(1, 1, 400, generator=gen)
    x = y + 0.3 * torch.randn(1, 1, 400, generator=gen)
    ours = float(stft_distance(x, y, [32, 64]))
    direct = (_direct_stft_loss(x[0, 0].numpy(), y[0, 0].numpy(), 32)
              + _direct_stft_loss(x[0, 0].numpy(), y[0, 0].numpy(), 64)) / 2  # fmt: skip
    assert ours == pytest.approx(direct, rel=1e-4)
    assert float(stft_distance(y, y, [32, 64])) == pytest.approx(0.0, abs=1e-6)
    assert snr(y + 0.1 * y, y) == pytest.approx(20.0, abs=1e-4)


RECIPE = "recipes/tiny/audio_vae.yaml"


@pytest.mark.parametrize(
    ("recipe", "overrides", "problem"),
    [
        (RECIPE, ["data.window_seconds=0.999"], "data.window_seconds: 0.999 s is 7992 samples, not divisible by the downsampling factor 32"),
        (RECIPE, ["model.in_channels=2"], "model.in_channels: 2 differs from data.audio_channels (1)"),
        (RECIPE, ["objective.gan_weight=0.1"], "objective.gan_weight: the PatchGAN is 2-D"),
        (RECIPE, ["data.kind=images", "data.resolutions=[[16, 16]]"], "data.kind: 'images': an audio_vae trains on kind 'audio'"),
        ("recipes/tiny/vae.yaml", ["objective.stft_weight=1.0"], "objective.stft_weight: has no effect for an image or video autoencoder"),
    ],
)  # fmt: skip
def test_recipes_that_do_not_fit_the_signal_get_one_line(recipe, overrides, problem):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, overrides)
    assert problem in err.value.problems[0] or any(problem in p for p in err.value.problems)


def test_an_exported_audio_vae_is_a_frozen_autoencoder(tmp_path):
    from safetensors.torch import save_file

    model = AudioVAE(AudioVAEConfig())
    model.init_weights(3)
    path = tmp_path / "audio_vae.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
        metadata={"model": '{"name": "audio_vae", "size": "tiny"}', "latent_scale": "2.0"},
    )  # fmt: skip
    frozen = build_autoencoder(pretrained_config(path))
    audio = torch.randn(1, 1, 320).clamp(-1, 1)
    assert torch.allclose(frozen.encode(audio), 2.0 * model.encode_raw(audio))
    assert not any(p.requires_grad for p in frozen.parameters())
