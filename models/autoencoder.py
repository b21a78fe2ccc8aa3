"""The autoencoder interface diffusion models train in the latent space of.

``encode`` maps images in [-1, 1] (B, 3, H, W) (or audio (B, C, T): ``signal_axes`` 1)
to *normalised* latents (B, C, H/f, W/f) (or (B, C, T/f)): ``(raw - shift) * scale``, so latents have roughly unit variance;
``decode`` inverts it. Trained VAEs / DC-AEs implement the same interface (models/autoencoders.py builds the one a
recipe names); the identity
autoencoder below is pixel-space training (f = 1, C = 3).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from configlib import option


@dataclass(kw_only=True)
class IdentityAutoencoderConfig:
    name: str = option("identity", "Autoencoder: 'identity' trains in pixel space.")
    scale: float = option(1.0, "Latent scale: latents = (pixels - shift) * scale.", gt=0)
    shift: float = option(0.0, "Latent shift.")
    channels: int = option(3, "Channels of the data (3: RGB images; 1 or 2: audio).", ge=1)


class Autoencoder(nn.Module, ABC):
    """Base: frozen, with latent normalisation by (shift, scale)."""

    latent_channels: int = 3
    downsample: int = 1  # per signal axis
    signal_axes: int = 2  # images (H, W); 1 for audio (T)
    # a trainable autoencoder's forward is (images, noise) -> (reconstruction, latent,
    # log-variance): variational ones sample their posterior with noise (KL-VAE), the
    # others take noise=None and give no log-variance (DC-AE)
    variational: bool = False

    def __init__(self, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.scale = scale
        self.shift = shift

    @abstractmethod
    def encode_raw(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> raw latents."""

    @abstractmethod
    def decode_raw(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        """Raw latents -> images in [-1, 1]."""

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return (self.encode_raw(images_BCHW) - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        return self.decode_raw(latents_BCHW / self.scale + self.shift)

    def check_images(self, images_BCHW: torch.Tensor, in_channels: int) -> None:
        """One clear error for inputs of the wrong layout or a size the factor does not
        divide: (B, C, H, W) images, or (B, C, T) audio where ``signal_axes`` is 1."""
        what, axes = ("audio", "T") if self.signal_axes == 1 else ("images", "H, W")
        if images_BCHW.ndim != 2 + self.signal_axes or images_BCHW.shape[1] != in_channels:
            raise ValueError(
                f"expected {what} (B, {in_channels}, {axes}), got {tuple(images_BCHW.shape)}"
            )
        sizes = images_BCHW.shape[2:]
        if any(size % self.downsample for size in sizes):
            what = "length" if self.signal_axes == 1 else "image size"
            raise ValueError(
                f"{what} {'x'.join(map(str, sizes))} is not divisible by the downsampling "
                f"factor {self.downsample}"
            )

    def check_latents(self, latents_BChw: torch.Tensor) -> None:
        ndim_ok = latents_BChw.ndim == 2 + self.signal_axes
        if not ndim_ok or latents_BChw.shape[1] != self.latent_channels:
            axes = "t" if self.signal_axes == 1 else "h, w"
            raise ValueError(
                f"expected latents (B, {self.latent_channels}, {axes}), got {tuple(latents_BChw.shape)}"
            )

    def latent_shape(self, channels: int, *sizes: int) -> tuple[int, ...]:
        """(latent channels, *sizes / factor) of an input of ``channels`` x ``sizes``."""
        return (self.latent_channels, *(size // self.downsample for size in sizes))


class VariationalAutoencoder(Autoencoder):
    """A trainable autoencoder with a diagonal Gaussian posterior: subclasses give
    ``encode_moments`` (mean, log-variance) and ``decode_raw``."""

    variational = True

    @abstractmethod
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and (clamped) log-variance, each shaped like the latents."""

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_moments(x)[0]

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction of mean + std * noise, mean, logvar); zeros decode the mean."""
        mean, logvar = self.encode_moments(x)
        if noise is None:
            noise = torch.randn_like(mean)
        recon = self.decode_raw(mean + torch.exp(0.5 * logvar) * noise.to(mean))
        return recon, mean.clone(), logvar  # clone: no view of the moments leaves forward


class IdentityAutoencoder(Autoencoder):
    """Training in the data's own space (pixels, audio samples): any shape passes."""

    def __init__(self, scale: float = 1.0, shift: float = 0.0, channels: int = 3):
        super().__init__(scale, shift)
        self.latent_channels = channels

    def latent_shape(self, channels: int, *sizes: int) -> tuple[int, ...]:
        return (channels, *sizes)

    def encode_raw(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return images_BCHW

    def decode_raw(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        return latents_BCHW
