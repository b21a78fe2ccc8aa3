"""The causal spacetime VAE: an image is a 1-frame video, every prefix of 1 + ft*k frames
encodes to the matching latent prefix (encoder and decoder see no future frame), shapes
through the Autoencoder interface, and one-line errors for frame counts and sizes."""

from __future__ import annotations

import pytest
import torch

from models.video_vae import VideoVAE, VideoVAEConfig, frames_for


@pytest.fixture(scope="module")
def model() -> VideoVAE:
    vae = VideoVAE(VideoVAEConfig(channels=[8, 16, 16], temporal_down=[True, True], norm_groups=4))
    vae.init_weights(0)
    return vae.eval()


def test_time_and_space_compress_with_the_first_frame_alone(model):
    assert model.temporal_factor == 4 and model.downsample == 4
    video = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    assert model.latent_shape(3, 9, 16, 16) == (4, 3, 4, 4)
    recon, mean, _ = model(video, torch.zeros(2, 4, 3, 4, 4))
    assert recon.shape == video.shape and mean.shape == (2, 4, 3, 4, 4)
    assert frames_for(3, 4) == 9


def test_encoding_and_decoding_are_causal(model):
    torch.manual_seed(0)
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        whole = model.encode_raw(video)
        image = model.encode_raw(video[:, :, :1])  # an image as a 1-frame video
        prefix = model.encode_raw(video[:, :, :5])
        changed = video.clone()
        changed[:, :, 5:] = torch.rand(1, 3, 4, 16, 16)
        future = model.encode_raw(changed)
        decoded = model.decode_raw(whole)
        decoded_prefix = model.decode_raw(whole[:, :, :2])
    torch.testing.assert_close(image, whole[:, :, :1], rtol=0, atol=1e-5)
    torch.testing.assert_close(prefix, whole[:, :, :2], rtol=0, atol=1e-5)
    torch.testing.assert_close(future[:, :, :2], whole[:, :, :2], rtol=0, atol=1e-5)
    assert not torch.allclose(future[:, :, 2:], whole[:, :, 2:])  # the future does change its own
    torch.testing.assert_close(decoded_prefix, decoded[:, :, :5], rtol=0, atol=1e-5)


def test_bad_frame_counts_and_sizes_get_one_line(model):
    with pytest.raises(ValueError, match=r"^8 frames: a video must have 1 \+ 4 \* k frames"):
        model.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(
        ValueError, match="^frame size 18x16 is not divisible by the downsampling factor 4$"
    ):
        model.encode(torch.zeros(1, 3, 5, 18, 16))
    with pytest.raises(ValueError, match=r"expected video \(B, 3, T, H, W\)"):
        model.encode(torch.zeros(1, 3, 16, 16))


def test_a_few_steps_fit_a_moving_square(model):
    """The network can learn: 100 Adam steps on one 9-frame clip of a moving square cut the
    reconstruction error of the posterior mean at least 4-fold."""
    vae = VideoVAE(VideoVAEConfig(channels=[8, 16], temporal_down=[True], norm_groups=4))
    vae.init_weights(1)
    video = -torch.ones(1, 3, 9, 8, 8)
    for t in range(9):
        video[:, :, t, 2:5, t % 6 : t % 6 + 3] = 1.0
    zeros = torch.zeros(1, *vae.latent_shape(3, 9, 8, 8))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        loss = (vae(video, zeros)[0] - video).abs().mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first / 4, (first, float(loss.detach()))
