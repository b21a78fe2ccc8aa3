"""1-D convolutional VAE for audio, in the style of Stable Audio's "Oobleck" autoencoder.

Encoder: a 7-tap conv stem, then per level residual units (dilations 1, 3, 9; Snake
activations) and a strided conv (kernel 2s, stride s) to the next level's width, then a
Snake and a 3-tap conv to the posterior's mean and log-variance per latent channel. The
decoder mirrors it with transposed strided convs. The downsampling factor is the product
of ``strides``: ``tiny`` is f32 (8 latent channels: a quarter of a mono clip's values),
``stable_audio`` the Stable Audio Open layout (stereo, f2048, 64 latent channels).

Snake: x + sin^2(alpha x) / alpha with a learned per-channel alpha (periodic inductive
bias for audio, Ziyin et al. 2020).

Shapes: B batch, C channels (audio, latent or hidden), T samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from configlib import option
from models.autoencoder import VariationalAutoencoder
from models.common.init import ParamInit
from models.common.parallelize import ParallelPlan, apply_parallelism
from models.common.presets import resolve_preset
from models.kl_vae import LOGVAR_RANGE

# hidden channels per level (the stem's first), strides between levels, latent channels
PRESETS: dict[str, dict] = {
    "tiny": dict(channels=[16, 32, 64], strides=[4, 8], latent_channels=8, scale=1.0, shift=0.0),
    "stable_audio": dict(
        channels=[128, 128, 256, 512, 1024, 2048], strides=[2, 4, 4, 8, 8],
        latent_channels=64, scale=1.0, shift=0.0,
    ),
}  # fmt: skip
DILATIONS = (1, 3, 9)


@dataclass(kw_only=True)
class AudioVAEConfig:
    name: str = option("audio_vae", "Autoencoder family: 1-D audio VAE (strided convs, Snake).")
    size: str = option("tiny", "Size preset (widths, strides, latent channels).", choices=PRESETS)
    channels: list[int] | None = option(
        None, "Hidden channels per level; overrides the preset (one more than strides)."
    )
    strides: list[int] | None = option(
        None, "Downsampling stride between levels; overrides (the factor is their product)."
    )
    latent_channels: int | None = option(None, "Latent channels; overrides the preset.", ge=1)
    in_channels: int = option(1, "Audio channels: 1 mono, 2 stereo.", ge=1, le=2)
    scale: float | None = option(None, "Latent scale: latents = (mean - shift) * scale.", gt=0)
    shift: float | None = option(None, "Latent shift (see scale).")

    def dims(self) -> dict:
        return resolve_preset(PRESETS, self.size, self)

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        dims, out = self.dims(), []
        if len(dims["channels"]) != len(dims["strides"]) + 1:
            out.append(
                (
                    "strides",
                    f"{len(dims['strides'])} strides for {len(dims['channels'])} levels (needs one fewer)",
                )
            )
        if any(s < 1 for s in dims["strides"]):
            out.append(("strides", "every stride must be >= 1"))
        return out


class Snake(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        return x_BCT + torch.sin(alpha * x_BCT).square() / (alpha + 1e-9)


class ResidualUnit(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.act1, self.act2 = Snake(channels), Snake(channels)
        self.conv1 = nn.Conv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation)
        self.conv2 = nn.Conv1d(channels, channels, 1)

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        return x_BCT + self.conv2(self.act2(self.conv1(self.act1(x_BCT))))


class DownLevel(nn.Module):
    """Residual units at ``cin`` channels, then a strided conv to ``cout`` (T -> T / s)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.units = nn.Sequential(*(ResidualUnit(cin, d) for d in DILATIONS))
        self.act = Snake(cin)
        self.down = nn.Conv1d(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2))

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.units(x_BCT)))


class UpLevel(nn.Module):
    """A transposed strided conv from ``cin`` to ``cout`` (T -> T * s), then residual units."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.act = Snake(cin)
        self.up = nn.ConvTranspose1d(
            cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2),
            output_padding=stride % 2,
        )  # fmt: skip
        self.units = nn.Sequential(*(ResidualUnit(cout, d) for d in DILATIONS))

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        return self.units(self.up(self.act(x_BCT)))


class AudioVAE(VariationalAutoencoder):
    """Trainable like the KL-VAE: ``forward`` gives (reconstruction, mean, logvar) from a
    posterior sample; ``encode`` / ``decode`` use the mean."""

    signal_axes = 1

    def __init__(self, cfg: AudioVAEConfig):
        d = cfg.dims()
        super().__init__(scale=d["scale"], shift=d["shift"])
        self.cfg = cfg
        self.latent_channels = d["latent_channels"]
        self.downsample = math.prod(d["strides"])
        widths, strides, latent = d["channels"], d["strides"], d["latent_channels"]
        self.encoder_in = nn.Conv1d(cfg.in_channels, widths[0], 7, padding=3)
        self.encoder = nn.ModuleList(
            DownLevel(widths[i], widths[i + 1], s) for i, s in enumerate(strides)
        )
        self.encoder_act = Snake(widths[-1])
        self.encoder_out = nn.Conv1d(widths[-1], 2 * latent, 3, padding=1)
        self.decoder_in = nn.Conv1d(latent, widths[-1], 7, padding=3)
        self.decoder = nn.ModuleList(
            UpLevel(widths[i + 1], widths[i], s) for i, s in reversed(list(enumerate(strides)))
        )
        self.decoder_act = Snake(widths[0])
        self.decoder_out = nn.Conv1d(widths[0], cfg.in_channels, 7, padding=3)

    def encode_moments(self, audio_BCT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and (clamped) log-variance, each (B, latent, T / f)."""
        self.check_images(audio_BCT, self.cfg.in_channels)
        h = self.encoder_in(audio_BCT)
        for level in self.encoder:
            h = level(h)
        mean, logvar = self.encoder_out(self.encoder_act(h)).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode_raw(self, latents_BCT: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents_BCT)
        h = self.decoder_in(latents_BCT)
        for level in self.decoder:
            h = level(h)
        return self.decoder_out(self.decoder_act(h))

    def init_weights(self, seed: int) -> None:
        """PyTorch's default conv init, Snake alphas 1; name-seeded (same under any sharding)."""
        init = ParamInit(self, seed)
        init.torch_defaults_(self, ())
        for module in self.modules():
            if isinstance(module, nn.ConvTranspose1d):  # fan-in of a transposed conv: dim 0
                bound = 1.0 / math.sqrt(module.weight.shape[0] * module.weight.shape[2])
                init.uniform_(module.weight, -bound, bound)
                init.uniform_(module.bias, -bound, bound)
            elif isinstance(module, Snake):
                init.ones_(module.alpha)


def build(cfg: AudioVAEConfig) -> AudioVAE:
    return AudioVAE(cfg)


def parallelize(model: AudioVAE, plan: ParallelPlan, mesh=None) -> AudioVAE:
    return apply_parallelism(model, [*model.encoder, *model.decoder], plan, mesh)
