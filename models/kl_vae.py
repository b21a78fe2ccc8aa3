"""KL-regularised convolutional autoencoder in the Stable Diffusion / SD3 style.

The encoder is a stack of resolution levels (residual blocks, then a stride-2 conv
except at the last level), a middle of residual block / single-head self-attention /
residual block, and a GroupNorm-SiLU-conv head giving a diagonal Gaussian (mean and
log-variance per latent channel). The decoder mirrors it with nearest-neighbour 2x
upsampling and one more residual block per level. With L levels the downsampling factor
is 2**(L-1): the ``sd`` / ``sd3`` presets (4 levels) are f8.

Presets: ``tiny`` (tests and the digits demo, f2), ``sd`` (SD 1.x/2.x/XL layout, 4 latent
channels, quant convs), ``sd3`` (SD3 / FLUX-style 16 latent channels, no quant convs).
``from_diffusers_state_dict`` / ``load_diffusers_checkpoint`` read diffusers'
``AutoencoderKL`` weights (current and pre-0.14 attention names); diffusers itself is
not imported here.

Latent normalisation: ``encode`` returns ``(mean - shift) * scale`` (the config's or the
preset's ``scale`` / ``shift``: SD3 uses 1.5305 / 0.0609); ``decode`` inverts it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from configlib import ConfigError, option
from models.autoencoder import Autoencoder
from models.common import resblock as common_resblock
from models.common.attention import QKVProjection, attention
from models.common.diffusers_io import listing, model_directory, read_config, read_weights
from models.common.init import ParamInit
from models.common.parallelize import ParallelPlan, apply_parallelism
from models.common.presets import resolve_preset

# channels per level (the first is the stem's), residual blocks per encoder level
# (decoder: one more), latent channels, GroupNorm groups, quant convs, latent scale/shift
PRESETS: dict[str, dict] = {
    "tiny": dict(
        channels=[16, 32], layers_per_block=1, latent_channels=4, norm_groups=8,
        quant_conv=True, scale=1.0, shift=0.0,
    ),
    "sd": dict(
        channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_groups=32,
        quant_conv=True, scale=0.18215, shift=0.0,
    ),
    "sd3": dict(
        channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16, norm_groups=32,
        quant_conv=False, scale=1.5305, shift=0.0609,
    ),
}  # fmt: skip
LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the posterior's log-variance (as in LDM)


@dataclass(kw_only=True)
class KLVAEConfig:
    name: str = option("kl_vae", "Autoencoder family: SD-style KL-VAE.")
    size: str = option("tiny", "Size preset (channels, depth, latent channels).", choices=PRESETS)
    channels: list[int] | None = option(
        None, "Channels per resolution level; overrides the preset (levels - 1 = log2 factor)."
    )
    layers_per_block: int | None = option(
        None, "Residual blocks per encoder level (decoder: one more); overrides the preset.", ge=1
    )
    latent_channels: int | None = option(None, "Latent channels; overrides the preset.", ge=1)
    norm_groups: int | None = option(None, "GroupNorm groups; overrides the preset.", ge=1)
    quant_conv: bool | None = option(
        None, "1x1 convs on the moments and before the decoder (SD 1-XL yes, SD3 no)."
    )
    mid_attention: bool = option(True, "Self-attention in the middle of encoder and decoder.")
    in_channels: int = option(3, "Image channels.", ge=1)
    scale: float | None = option(None, "Latent scale: latents = (mean - shift) * scale.", gt=0)
    shift: float | None = option(None, "Latent shift (see scale).")

    def dims(self) -> dict:
        return resolve_preset(PRESETS, self.size, self)

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        dims, out = self.dims(), []
        if not dims["channels"]:
            out.append(("channels", "needs at least one level"))
        for width in dims["channels"]:
            if width % dims["norm_groups"]:
                out.append(
                    ("norm_groups", f"{dims['norm_groups']} does not divide level width {width}")
                )
                break
        return out


def _norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(common_resblock.ResBlock):
    """The shared residual block with GroupNorm and 3x3 2-D convs."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__(
            cin, cout, norm=lambda c: _norm(groups, c),
            conv=lambda i, o: nn.Conv2d(i, o, 3, padding=1), skip=lambda i, o: nn.Conv2d(i, o, 1),
        )  # fmt: skip


class SelfAttention(QKVProjection):
    """Single-head self-attention over all positions, residual: the shared fused q/k/v
    projection (key ``qkv``, as the diffusers mapping expects) on the GroupNormed pixels."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, num_heads=1, qk_norm=False)
        self.norm = _norm(groups, channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # B, HW, C
        q, k, v = (m.transpose(1, 2) for m in super().forward(tokens))  # B, 1, HW, C each
        return x + self.proj(attention(q, k, v)).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups)
        self.attn = SelfAttention(channels, groups) if attention else nn.Identity()
        self.res2 = ResBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right (as SD)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Residual blocks at one resolution, then an optional resampling."""

    def __init__(self, cin: int, cout: int, blocks: int, groups: int, resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(cin if i == 0 else cout, cout, groups) for i in range(blocks)
        )
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    def __init__(self, d: dict, in_channels: int, mid_attention: bool):
        super().__init__()
        ch, groups = d["channels"], d["norm_groups"]
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList(
            Level(
                ch[max(i - 1, 0)], ch[i], d["layers_per_block"], groups,
                Downsample(ch[i]) if i < len(ch) - 1 else None,
            )
            for i in range(len(ch))
        )  # fmt: skip
        self.mid = MidBlock(ch[-1], groups, mid_attention)
        self.norm_out = _norm(groups, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * d["latent_channels"], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.levels:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, d: dict, out_channels: int, mid_attention: bool):
        super().__init__()
        ch, groups = d["channels"][::-1], d["norm_groups"]  # deepest first
        self.conv_in = nn.Conv2d(d["latent_channels"], ch[0], 3, padding=1)
        self.mid = MidBlock(ch[0], groups, mid_attention)
        self.levels = nn.ModuleList(
            Level(
                ch[max(i - 1, 0)], ch[i], d["layers_per_block"] + 1, groups,
                Upsample(ch[i]) if i < len(ch) - 1 else None,
            )
            for i in range(len(ch))
        )  # fmt: skip
        self.norm_out = _norm(groups, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in self.levels:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class KLVAE(Autoencoder):
    """Trainable: ``forward`` gives (reconstruction, mean, logvar) from a posterior sample;
    ``encode`` / ``decode`` (from the frozen-autoencoder interface) use the mean."""

    variational = True

    def __init__(self, cfg: KLVAEConfig):
        d = cfg.dims()
        super().__init__(scale=d["scale"], shift=d["shift"])
        self.cfg = cfg
        self.latent_channels = d["latent_channels"]
        self.downsample = 2 ** (len(d["channels"]) - 1)
        self.encoder = Encoder(d, cfg.in_channels, cfg.mid_attention)
        self.decoder = Decoder(d, cfg.in_channels, cfg.mid_attention)
        moments, latent = 2 * d["latent_channels"], d["latent_channels"]
        self.quant_conv = nn.Conv2d(moments, moments, 1) if d["quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if d["quant_conv"] else None

    def encode_moments(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and (clamped) log-variance, each (B, C, H/f, W/f)."""
        self.check_images(images_BCHW, self.cfg.in_channels)
        moments = self.encoder(images_BCHW)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode_raw(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.encode_moments(images_BCHW)[0]

    def decode_raw(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents_BCHW)
        if self.post_quant_conv is not None:
            latents_BCHW = self.post_quant_conv(latents_BCHW)
        return self.decoder(latents_BCHW)

    def forward(
        self,
        images_BCHW: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction of the posterior sample mean + std * noise, mean, logvar).
        ``noise`` (B, C, H/f, W/f) is drawn from ``generator`` when not given; zeros
        decode the mean. Training goes through here (FSDP2 shards the root's own layers
        around forward, not around the other methods)."""
        mean, logvar = self.encode_moments(images_BCHW)
        if noise is None:
            noise = torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
        recon = self.decode_raw(mean + torch.exp(0.5 * logvar) * noise.to(mean))
        return recon, mean.clone(), logvar  # clone: no view of the moments leaves forward

    def init_weights(self, seed: int) -> None:
        """PyTorch's default conv/linear init (uniform within 1/sqrt(fan_in)), unit norms;
        each parameter drawn from its own name-seeded generator (same under any sharding)."""
        ParamInit(self, seed).torch_defaults_(self, (nn.GroupNorm,))


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per sample, summed over latent elements."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def build(cfg: KLVAEConfig) -> KLVAE:
    return KLVAE(cfg)


def parallelize(model: KLVAE, plan: ParallelPlan, mesh=None) -> KLVAE:
    blocks = [*model.encoder.levels, model.encoder.mid, model.decoder.mid, *model.decoder.levels]
    return apply_parallelism(model, blocks, plan, mesh)


# ------------------------------------------------------------------ diffusers adapter
# (diffusers name pattern, our name pattern) for everything below the top-level modules
_RENAMES = [
    (r"(encoder|decoder)\.down_blocks\.(\d+)\.resnets\.", r"\1.levels.\2.res."),
    (r"(encoder|decoder)\.up_blocks\.(\d+)\.resnets\.", r"\1.levels.\2.res."),
    (r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(?:down|up)samplers\.0\.", r"\1.levels.\2.resample."),
    (r"(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.res1."),
    (r"(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.res2."),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn.norm."),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_out\.0|proj_attn)\.", r"\1.mid.attn.proj."),
    (r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"\.conv_shortcut\.", r".skip."),
]  # fmt: skip
_QKV = re.compile(
    r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|query|key|value)\.(weight|bias)"
)
_PART = {"to_q": 0, "query": 0, "to_k": 1, "key": 1, "to_v": 2, "value": 2}


def from_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys -> ours (q, k, v concatenated into ``qkv``).
    Old checkpoints' attention names (query/key/value/proj_attn) and their 1x1-conv-shaped
    attention weights are accepted too."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in sd.items():
        match = _QKV.fullmatch(key)
        if match:
            side, name, kind = match.groups()
            parts.setdefault((side, kind), {})[_PART[name]] = value
            continue
        new = key
        for pattern, repl in _RENAMES:
            new = re.sub(pattern, repl, new)
        if new.endswith("attn.proj.weight") and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    for (side, kind), pieces in parts.items():
        if sorted(pieces) != [0, 1, 2]:
            raise ValueError(f"{side} mid-block attention: q, k and v {kind} are not all present")
        stacked = [p[:, :, 0, 0] if p.ndim == 4 else p for p in (pieces[0], pieces[1], pieces[2])]
        out[f"{side}.mid.attn.qkv.{kind}"] = torch.cat(stacked, dim=0)
    return out


def to_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> current diffusers ``AutoencoderKL`` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        side = key.split(".", 1)[0]
        if key.startswith(f"{side}.mid.attn.qkv."):
            kind = key.rsplit(".", 1)[1]
            for name, piece in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                out[f"{side}.mid_block.attentions.0.{name}.{kind}"] = piece.clone()
            continue
        new = key
        new = re.sub(r"^(encoder|decoder)\.mid\.res1\.", r"\1.mid_block.resnets.0.", new)
        new = re.sub(r"^(encoder|decoder)\.mid\.res2\.", r"\1.mid_block.resnets.1.", new)
        new = re.sub(
            r"^(encoder|decoder)\.mid\.attn\.norm\.", r"\1.mid_block.attentions.0.group_norm.", new
        )
        new = re.sub(
            r"^(encoder|decoder)\.mid\.attn\.proj\.", r"\1.mid_block.attentions.0.to_out.0.", new
        )
        blocks = "down_blocks" if side == "encoder" else "up_blocks"
        sampler = "downsamplers" if side == "encoder" else "upsamplers"
        new = re.sub(r"^(encoder|decoder)\.levels\.(\d+)\.res\.", rf"\1.{blocks}.\2.resnets.", new)
        new = re.sub(
            r"^(encoder|decoder)\.levels\.(\d+)\.resample\.", rf"\1.{blocks}.\2.{sampler}.0.", new
        )
        new = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", new)
        new = new.replace(".skip.", ".conv_shortcut.")
        out[new] = value
    return out  # fmt: skip


def config_from_diffusers(config: dict) -> KLVAEConfig:
    """Our config for a diffusers ``AutoencoderKL`` config.json (size preset overridden
    field by field, latent scale/shift from scaling_factor / shift_factor)."""
    problems = []
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        problems.append(f"_class_name: {config['_class_name']!r} is not an AutoencoderKL")
    if config.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn: {config['act_fn']!r} is not supported (only 'silu')")
    if config.get("out_channels", config.get("in_channels", 3)) != config.get("in_channels", 3):
        problems.append("out_channels: must equal in_channels")
    for key in ("down_block_types", "up_block_types"):
        kinds = set(config.get(key, ()))
        if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
            problems.append(f"{key}: {sorted(kinds)} not supported")
    if config.get("use_quant_conv", True) != config.get("use_post_quant_conv", True):
        problems.append("use_quant_conv and use_post_quant_conv must agree")
    if problems:
        raise ConfigError(problems, "diffusers AutoencoderKL config")
    return KLVAEConfig(
        size="sd",
        channels=list(config.get("block_out_channels", [64])),
        layers_per_block=int(config.get("layers_per_block", 1)),
        latent_channels=int(config.get("latent_channels", 4)),
        norm_groups=int(config.get("norm_num_groups", 32)),
        quant_conv=bool(config.get("use_quant_conv", True)),
        mid_attention=bool(config.get("mid_block_add_attention", True)),
        in_channels=int(config.get("in_channels", 3)),
        scale=float(config.get("scaling_factor", 0.18215)),
        shift=float(config.get("shift_factor") or 0.0),
    )


def load_diffusers_checkpoint(path: str | Path) -> tuple[KLVAEConfig, dict[str, torch.Tensor]]:
    """A local diffusers ``AutoencoderKL`` (its directory, a pipeline's ``vae/``, or one
    safetensors file beside its config.json) -> (our config, our state dict), checked
    against the parameters that config builds."""
    path = model_directory(path, "vae")
    cfg = config_from_diffusers(read_config(path))
    state, files = read_weights(path)
    ours = from_diffusers_state_dict(state)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in KLVAE(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(ours))
    unknown = sorted(set(ours) - set(expected))
    wrong = sorted(k for k in set(expected) & set(ours) if tuple(ours[k].shape) != expected[k])
    if missing or unknown or wrong:
        parts = [
            f"{label}: {listing(keys)}"
            for label, keys in (("missing", missing), ("unknown", unknown), ("wrong shape", wrong))
            if keys
        ]
        raise ValueError(
            f"{files[0]}: not the AutoencoderKL its config.json describes; " + "; ".join(parts)
        )
    return cfg, ours
