"""Causal spacetime VAE for video (the CogVideoX / HunyuanVideo construction, small).

Every temporal convolution pads on the past side only, and normalisation is per frame,
so an output frame depends on input frames up to its own time: the first frame is
encoded alone, an image is a 1-frame video, and a clip's prefix of 1 + k * ft frames
encodes to the first 1 + k latent frames of the whole clip. Time is compressed by
``temporal_factor`` ft = 2 ** (number of levels marked in ``temporal_down``): the first
frame is kept, the following ones are averaged in pairs, so T = 1 + ft * k frames become
1 + k latent frames. Space is compressed by 2 per level after the first, as in the
KL-VAE. Residual blocks of per-frame GroupNorm, SiLU and causal 3x3x3 convolutions.

Shapes: B batch, C channels, T frames, H x W pixels (latents: t, h, w).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from configlib import option
from models.autoencoder import VariationalAutoencoder
from models.common import resblock as common_resblock
from models.common.init import ParamInit
from models.common.parallelize import ParallelPlan, apply_parallelism
from models.common.presets import resolve_preset
from models.kl_vae import LOGVAR_RANGE

# channels per level (the first is the stem's), residual blocks per level, which level
# transitions also halve time, latent channels, GroupNorm groups
PRESETS: dict[str, dict] = {
    "tiny": dict(channels=[16, 32], layers_per_block=1, temporal_down=[True],
                 latent_channels=4, norm_groups=8, scale=1.0, shift=0.0),
    "f8t4c16": dict(channels=[128, 256, 512, 512], layers_per_block=2,
                    temporal_down=[True, True, False], latent_channels=16, norm_groups=32,
                    scale=1.0, shift=0.0),
}  # fmt: skip


@dataclass(kw_only=True)
class VideoVAEConfig:
    name: str = option("video_vae", "Autoencoder family: causal spacetime video VAE.")
    size: str = option("tiny", "Size preset.", choices=PRESETS)
    channels: list[int] | None = option(None, "Channels per level; overrides the preset.")
    layers_per_block: int | None = option(None, "Residual blocks per level; overrides.", ge=1)
    temporal_down: list[bool] | None = option(
        None, "Per level transition: also halve time; overrides (one fewer than levels)."
    )
    latent_channels: int | None = option(None, "Latent channels; overrides the preset.", ge=1)
    norm_groups: int | None = option(None, "GroupNorm groups; overrides the preset.", ge=1)
    in_channels: int = option(3, "Frame channels.", ge=1)
    scale: float | None = option(None, "Latent scale: latents = (mean - shift) * scale.", gt=0)
    shift: float | None = option(None, "Latent shift (see scale).")

    def dims(self) -> dict:
        return resolve_preset(PRESETS, self.size, self)

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        dims, out = self.dims(), []
        if len(dims["temporal_down"]) != len(dims["channels"]) - 1:
            out.append(("temporal_down", f"needs {len(dims['channels']) - 1} entries (levels - 1)"))
        if any(width % dims["norm_groups"] for width in dims["channels"]):
            out.append(("norm_groups", f"{dims['norm_groups']} does not divide every level width"))
        return out


class CausalConv3d(nn.Conv3d):
    """3-D convolution padded by (kernel - 1) copies of the first frame in the past and
    symmetrically in space: output frame t sees input frames <= t only."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__(cin, cout, kernel, padding=(0, kernel // 2, kernel // 2))
        self.past = kernel - 1

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        if self.past:
            first = x_BCTHW[:, :, :1].expand(-1, -1, self.past, -1, -1)
            x_BCTHW = torch.cat([first, x_BCTHW], dim=2)
        return super().forward(x_BCTHW)


class FrameNorm(nn.GroupNorm):
    """GroupNorm over each frame alone (statistics across time would leak the future)."""

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x_BCTHW.shape
        frames = x_BCTHW.transpose(1, 2).reshape(b * t, c, h, w)
        return super().forward(frames).reshape(b, t, c, h, w).transpose(1, 2)


class ResBlock(common_resblock.ResBlock):
    """The shared residual block with per-frame GroupNorm and causal 3-D convs."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__(
            cin, cout, norm=lambda c: FrameNorm(groups, c, eps=1e-6), conv=CausalConv3d,
            skip=lambda i, o: nn.Conv3d(i, o, 1),
        )  # fmt: skip


def halve_time(x_BCTHW: torch.Tensor) -> torch.Tensor:
    """1 + 2k frames -> 1 + k: the first kept, the rest averaged in pairs."""
    rest = x_BCTHW[:, :, 1:]
    b, c, t, h, w = rest.shape
    pairs = rest.reshape(b, c, t // 2, 2, h, w).mean(3)
    return torch.cat([x_BCTHW[:, :, :1], pairs], dim=2)


def double_time(x_BCTHW: torch.Tensor) -> torch.Tensor:
    """1 + k frames -> 1 + 2k: the first kept, the rest repeated."""
    return torch.cat([x_BCTHW[:, :, :1], x_BCTHW[:, :, 1:].repeat_interleave(2, dim=2)], dim=2)


class Level(nn.Module):
    """Residual blocks, then (if ``resample``) the spatial (and temporal) resampling."""

    def __init__(self, cin: int, cout: int, blocks: int, groups: int, resample: str | None,
                 temporal: bool):  # fmt: skip
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(cin if i == 0 else cout, cout, groups) for i in range(blocks)
        )
        self.resample, self.temporal = resample, temporal
        self.conv = CausalConv3d(cout, cout) if resample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x)
        if self.resample == "down":
            x = F.avg_pool3d(x, (1, 2, 2))
            x = halve_time(x) if self.temporal else x
            x = self.conv(x)
        elif self.resample == "up":
            x = double_time(x) if self.temporal else x
            x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
            x = self.conv(x)
        return x


class VideoVAE(VariationalAutoencoder):
    """Trainable like the KL-VAE: ``forward`` gives (reconstruction, mean, logvar)."""

    signal_axes = 3

    def __init__(self, cfg: VideoVAEConfig):
        d = cfg.dims()
        super().__init__(scale=d["scale"], shift=d["shift"])
        self.cfg = cfg
        widths, groups, blocks = d["channels"], d["norm_groups"], d["layers_per_block"]
        self.latent_channels = d["latent_channels"]
        self.downsample = 2 ** (len(widths) - 1)
        self.temporal_factor = 2 ** sum(d["temporal_down"])
        last = len(widths) - 1
        self.encoder_in = CausalConv3d(cfg.in_channels, widths[0])
        self.encoder = nn.ModuleList(
            Level(widths[max(i - 1, 0)], widths[i], blocks, groups,
                  "down" if i < last else None, i < last and d["temporal_down"][i])
            for i in range(len(widths))
        )  # fmt: skip
        self.encoder_norm = FrameNorm(groups, widths[-1], eps=1e-6)
        self.encoder_out = CausalConv3d(widths[-1], 2 * self.latent_channels)
        self.decoder_in = CausalConv3d(self.latent_channels, widths[-1])
        self.decoder = nn.ModuleList(
            Level(widths[min(i + 1, last)], widths[i], blocks + 1, groups,
                  "up" if i > 0 else None, i > 0 and d["temporal_down"][i - 1])
            for i in reversed(range(len(widths)))
        )  # fmt: skip
        self.decoder_norm = FrameNorm(groups, widths[0], eps=1e-6)
        self.decoder_out = CausalConv3d(widths[0], cfg.in_channels)

    # -------------------------------------------------------------- shapes and checks
    def latent_shape(self, channels: int, *sizes: int) -> tuple[int, ...]:
        frames, height, width = sizes
        return (self.latent_channels, 1 + (frames - 1) // self.temporal_factor,
                height // self.downsample, width // self.downsample)  # fmt: skip

    def check_images(self, video_BCTHW: torch.Tensor, in_channels: int) -> None:
        if video_BCTHW.ndim != 5 or video_BCTHW.shape[1] != in_channels:
            raise ValueError(
                f"expected video (B, {in_channels}, T, H, W), got {tuple(video_BCTHW.shape)}"
            )
        frames, height, width = video_BCTHW.shape[2:]
        if (frames - 1) % self.temporal_factor:
            raise ValueError(
                f"{frames} frames: a video must have 1 + {self.temporal_factor} * k frames "
                f"(the first is encoded alone, then groups of {self.temporal_factor})"
            )
        if height % self.downsample or width % self.downsample:
            raise ValueError(
                f"frame size {height}x{width} is not divisible by the downsampling factor {self.downsample}"
            )

    # ----------------------------------------------------------------------- passes
    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_images(video, self.cfg.in_channels)
        h = self.encoder_in(video)
        for level in self.encoder:
            h = level(h)
        mean, logvar = self.encoder_out(F.silu(self.encoder_norm(h))).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents)
        h = self.decoder_in(latents)
        for level in self.decoder:
            h = level(h)
        return self.decoder_out(F.silu(self.decoder_norm(h)))

    def init_weights(self, seed: int) -> None:
        """PyTorch's conv defaults, except that every causal conv starts as its 2-D
        version on the current frame (past taps zero, the 2-D fan-in bound): the network
        starts as a per-frame autoencoder and learns what to take from the past (with
        the 3-D default, clips of moving digits stalled at the all-background output)."""
        init = ParamInit(self, seed)
        init.torch_defaults_(self, (nn.GroupNorm,))
        for module in self.modules():
            if isinstance(module, CausalConv3d) and module.past:
                cout, cin, _, kh, kw = module.weight.shape
                bound = 1.0 / math.sqrt(cin * kh * kw)
                init.uniform_(module.weight, -bound, bound)
                init.uniform_(module.bias, -bound, bound)
                with torch.no_grad():
                    weight = module.weight
                    local = weight.to_local() if hasattr(weight, "to_local") else weight
                    local[:, :, :-1].zero_()


def build(cfg: VideoVAEConfig) -> VideoVAE:
    return VideoVAE(cfg)


def parallelize(model: VideoVAE, plan: ParallelPlan, mesh=None) -> VideoVAE:
    return apply_parallelism(model, [*model.encoder, *model.decoder], plan, mesh)


def frames_for(latent_frames: int, temporal_factor: int) -> int:
    """Video frames that encode to ``latent_frames`` latent frames."""
    return 1 + temporal_factor * (latent_frames - 1)
