"""DC-AE: the deep-compression autoencoder (Chen et al. 2024, arXiv:2410.10733).

High spatial compression (f32, f64) without the reconstruction collapse of a plain deep
conv autoencoder, by *residual autoencoding*: every resolution change has a
parameter-free shortcut that moves space into channels and back,

    down:  y = conv_stride(x) + mean over channel groups of pixel_unshuffle(x)
    up:    y = conv(x) (pixel-shuffled) + pixel_shuffle(x repeated over channels)

and the encoder's output / decoder's input have the same kind of shortcut (channel
average to the latent width, channel repeat from it). Stages are residual conv blocks
at high resolution and EfficientViT blocks (ReLU linear attention with multi-scale
depthwise q/k/v aggregation, then a gated depthwise MLP) at low resolution. The
autoencoder is deterministic: no posterior, no KL.

Stage ``i`` runs at resolution H / 2**i; with S stages the factor is 2**(S-1). A stage
with 0 layers in position 0 makes the stem itself a space-to-channel step (the
published f32 / f64 models).

Presets: ``tiny`` (tests and the digits demo: f4, 4 latent channels), ``f32c32`` and
``f64c128`` (the paper's layouts, RMSNorm/SiLU everywhere so they shard and resume like
the rest). Module names follow diffusers' ``AutoencoderDC``, so its weights load after
only a config translation (:func:`load_diffusers_checkpoint`); diffusers is not imported.

Latent normalisation as in models/autoencoder.py: ``encode`` = (raw - shift) * scale.

Shapes: B batch, C channels, H, W pixels; h, w = H/f, W/f.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from configlib import ConfigError, option
from models.autoencoder import Autoencoder
from models.common.diffusers_io import model_directory, read_config, read_weights
from models.common.init import ParamInit
from models.common.parallelize import ParallelPlan, apply_parallelism

# channels, encoder / decoder layers and block kind per stage ("res" or "vit"),
# latent channels, attention head width, multi-scale kernel sizes of the vit stages
PRESETS: dict[str, dict] = {
    "tiny": dict(
        channels=[16, 32, 64], encoder_layers=[1, 1, 1], decoder_layers=[1, 1, 1],
        blocks=["res", "res", "vit"], latent_channels=4, head_dim=8, qkv_kernels=[3],
        scale=1.0, shift=0.0,
    ),
    "f32c32": dict(
        channels=[128, 256, 512, 512, 1024, 1024], encoder_layers=[0, 4, 8, 2, 2, 2],
        decoder_layers=[0, 5, 10, 2, 2, 2], blocks=["res", "res", "res", "vit", "vit", "vit"],
        latent_channels=32, head_dim=32, qkv_kernels=[5], scale=1.0, shift=0.0,
    ),
    "f64c128": dict(
        channels=[128, 256, 512, 512, 1024, 1024, 2048], encoder_layers=[0, 4, 8, 2, 2, 2, 2],
        decoder_layers=[0, 5, 10, 2, 2, 2, 2],
        blocks=["res", "res", "res", "vit", "vit", "vit", "vit"],
        latent_channels=128, head_dim=32, qkv_kernels=[5], scale=1.0, shift=0.0,
    ),
}  # fmt: skip
_LISTS = ("channels", "encoder_layers", "decoder_layers", "blocks")


@dataclass(kw_only=True)
class DCAEConfig:
    name: str = option("dc_ae", "Autoencoder family: DC-AE (deep compression).")
    size: str = option("tiny", "Size preset (stages, widths, latent channels).", choices=PRESETS)
    channels: list[int] | None = option(
        None, "Channels per stage; overrides the preset (stages - 1 = log2 factor)."
    )
    encoder_layers: list[int] | None = option(
        None, "Blocks per encoder stage; overrides the preset (0 only for the first)."
    )
    decoder_layers: list[int] | None = option(
        None, "Blocks per decoder stage; overrides the preset (0 only for the first)."
    )
    blocks: list[str] | None = option(
        None, "Block kind per stage, 'res' (conv) or 'vit' (linear attention); overrides."
    )
    latent_channels: int | None = option(None, "Latent channels; overrides the preset.", ge=1)
    head_dim: int | None = option(None, "Linear-attention head width; overrides.", ge=1)
    qkv_kernels: list[int] | None = option(
        None, "Depthwise kernel sizes of the multi-scale q/k/v aggregation; overrides."
    )
    decoder_norms: list[str] | None = option(
        None,
        "Per decoder stage 'rms_norm' (default) or 'batch_norm' (only to load published "
        "weights that use it).",
    )
    decoder_acts: list[str] | None = option(
        None, "Per decoder stage 'silu' (default) or 'relu' (published weights)."
    )
    in_channels: int = option(3, "Image channels.", ge=1)
    scale: float | None = option(None, "Latent scale: latents = (raw - shift) * scale.", gt=0)
    shift: float | None = option(None, "Latent shift (see scale).")

    def dims(self) -> dict:
        dims = dict(PRESETS[self.size])
        for key in [*dims, "decoder_norms", "decoder_acts"]:
            if getattr(self, key) is not None:
                dims[key] = getattr(self, key)
        stages = len(dims["channels"])
        dims.setdefault("decoder_norms", ["rms_norm"] * stages)
        dims.setdefault("decoder_acts", ["silu"] * stages)
        return dims

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        d, out = self.dims(), []
        stages = len(d["channels"])
        if stages < 1:
            return [("channels", "needs at least one stage")]
        for key in (*_LISTS[1:], "decoder_norms", "decoder_acts"):
            if len(d[key]) != stages:
                out.append((key, f"has {len(d[key])} entries for {stages} stages (channels)"))
        if out:
            return out
        for key in ("encoder_layers", "decoder_layers"):
            if any(n < 0 for n in d[key]) or any(n == 0 for n in d[key][1:]):
                out.append((key, "must be >= 1 per stage (0 is allowed for the first only)"))
        if d["encoder_layers"][0] == 0 and stages < 2:
            out.append(("encoder_layers", "a 0-layer first stage needs a second stage"))
        if d["decoder_layers"][0] == 0 and stages < 2:
            out.append(("decoder_layers", "a 0-layer first stage needs a second stage"))
        for i, kind in enumerate(d["blocks"]):
            if kind not in ("res", "vit"):
                out.append(("blocks", f"stage {i}: {kind!r} is not 'res' or 'vit'"))
            elif kind == "vit" and d["channels"][i] % d["head_dim"]:
                out.append(
                    ("head_dim", f"{d['head_dim']} does not divide stage {i}'s {d['channels'][i]}")
                )
        for i in range(stages - 1):
            cin, cout = d["channels"][i], d["channels"][i + 1]
            if (cin * 4) % cout or (cout * 4) % cin or cout % 4:
                out.append(
                    (
                        "channels",
                        f"stages {i}->{i + 1} ({cin}->{cout}): the space-to-channel shortcut needs 4*cin divisible by cout, 4*cout by cin, cout by 4",
                    )
                )
        if d["channels"][-1] % d["latent_channels"]:
            out.append(
                (
                    "latent_channels",
                    f"{d['latent_channels']} does not divide the last stage's {d['channels'][-1]} (latent shortcut)",
                )
            )
        for i, norm in enumerate(d["decoder_norms"]):
            if norm not in ("rms_norm", "batch_norm"):
                out.append(
                    ("decoder_norms", f"stage {i}: {norm!r} is not 'rms_norm' or 'batch_norm'")
                )
        for i, act in enumerate(d["decoder_acts"]):
            if act not in ("silu", "relu"):
                out.append(("decoder_acts", f"stage {i}: {act!r} is not 'silu' or 'relu'"))
        if any(k % 2 == 0 or k < 1 for k in d["qkv_kernels"]):
            out.append(("qkv_kernels", "kernel sizes must be odd and positive"))
        return out  # fmt: skip


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channels of (B, C, ...) with weight and bias (eps 1e-5, in float32
    as DC-AE)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_last = x.movedim(1, -1)
        rms = torch.rsqrt(x_last.float().square().mean(-1, keepdim=True) + self.eps)
        return ((x_last * rms).to(self.weight.dtype) * self.weight + self.bias).movedim(-1, 1)


def _norm(kind: str, channels: int) -> nn.Module:
    return ChannelRMSNorm(channels) if kind == "rms_norm" else nn.BatchNorm2d(channels, eps=1e-5)


_ACTS = {"silu": nn.SiLU, "relu": nn.ReLU}


class ResBlock(nn.Module):
    """x + norm(conv(act(conv(x)))); the second conv has no bias (the norm's is enough)."""

    def __init__(self, channels: int, norm: str = "rms_norm", act: str = "silu"):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.nonlinearity = _ACTS[act]()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = _norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(self.nonlinearity(self.conv1(x))))


class MultiscaleProjection(nn.Module):
    """Depthwise k x k aggregation of the stacked q/k/v, then a per-head 1x1 mix."""

    def __init__(self, channels: int, heads: int, kernel: int):
        super().__init__()
        self.proj_in = nn.Conv2d(
            channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False
        )
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=3 * heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


class LinearAttention(nn.Module):
    """Multi-scale ReLU linear attention (EfficientViT), residual. Each scale's q/k/v give
    their own heads; the output mixes all of them. Linear in the number of positions:
    out_i = sum_j v_j (k_j . q_i) / sum_j (k_j . q_i), with q, k >= 0 after ReLU."""

    def __init__(self, channels: int, head_dim: int, kernels: list[int], eps: float = 1e-15):
        super().__init__()
        heads = channels // head_dim
        self.head_dim, self.eps = head_dim, eps
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(
            MultiscaleProjection(3 * channels, heads, k) for k in kernels
        )
        self.to_out = nn.Linear(channels * (1 + len(kernels)), channels, bias=False)
        self.norm_out = ChannelRMSNorm(channels)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x_BCHW.shape
        tokens = x_BCHW.movedim(1, -1)
        qkv = torch.cat([self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)], -1)
        qkv = qkv.movedim(-1, 1)
        qkv = torch.cat([qkv, *(proj(qkv) for proj in self.to_qkv_multiscale)], dim=1)
        linear = h * w > self.head_dim  # otherwise the N x N scores are the cheaper order
        if linear:
            qkv = qkv.float()
        q, k, v = qkv.reshape(b, -1, 3 * self.head_dim, h * w).chunk(3, dim=2)  # B, heads, d, N
        q, k = F.relu(q), F.relu(k)
        if linear:
            v = F.pad(v, (0, 0, 0, 1), value=1.0)  # a row of ones gives the normaliser
            out = (v @ k.transpose(-1, -2)) @ q
            out = (out[:, :, :-1] / (out[:, :, -1:] + self.eps)).to(x_BCHW.dtype)
        else:
            scores = (k.transpose(-1, -2) @ q).float()
            scores = scores / (scores.sum(dim=2, keepdim=True) + self.eps)
            out = v @ scores.to(v.dtype)
        out = self.to_out(out.reshape(b, -1, h, w).movedim(1, -1)).movedim(-1, 1)
        return x_BCHW + self.norm_out(out)


class GatedConvMLP(nn.Module):
    """1x1 expand (x4, doubled for the gate) -> SiLU -> depthwise 3x3 -> value * SiLU(gate)
    -> 1x1 back -> RMSNorm, residual (GLUMBConv)."""

    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = expand * channels
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = ChannelRMSNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.conv_depth(F.silu(self.conv_inverted(x))).chunk(2, dim=1)
        return x + self.norm(self.conv_point(value * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, kernels: list[int]):
        super().__init__()
        self.attn = LinearAttention(channels, head_dim, kernels)
        self.conv_out = GatedConvMLP(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


class SpaceToChannel(nn.Module):
    """2x down: a conv (stride 2, or stride 1 then pixel_unshuffle), plus the shortcut
    that averages groups of pixel_unshuffle(x)'s channels down to the output width."""

    def __init__(self, cin: int, cout: int, shortcut: bool = True):
        super().__init__()
        self.group_size = cin * 4 // cout
        self.shortcut = shortcut
        self.conv = nn.Conv2d(cin, cout // 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pixel_unshuffle(self.conv(x), 2)
        if not self.shortcut:
            return y
        return y + F.pixel_unshuffle(x, 2).unflatten(1, (-1, self.group_size)).mean(dim=2)


class ChannelToSpace(nn.Module):
    """2x up: conv then pixel_shuffle, plus the shortcut pixel_shuffle(x repeated over
    channels)."""

    def __init__(self, cin: int, cout: int, shortcut: bool = True):
        super().__init__()
        self.repeats = cout * 4 // cin
        self.shortcut = shortcut
        self.conv = nn.Conv2d(cin, cout * 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pixel_shuffle(self.conv(x), 2)
        if not self.shortcut:
            return y
        return y + F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)


def _block(d: dict, stage: int, norm: str = "rms_norm", act: str = "silu") -> nn.Module:
    width = d["channels"][stage]
    if d["blocks"][stage] == "vit":
        return EfficientViTBlock(width, d["head_dim"], d["qkv_kernels"])
    return ResBlock(width, norm, act)


class Encoder(nn.Module):
    def __init__(self, d: dict, in_channels: int):
        super().__init__()
        ch, layers = d["channels"], d["encoder_layers"]
        stem_out = ch[0] if layers[0] > 0 else ch[1]
        self.conv_in = (
            nn.Conv2d(in_channels, stem_out, 3, padding=1)
            if layers[0] > 0
            else SpaceToChannel(in_channels, stem_out, shortcut=False)
        )
        stages = []
        for i, n in enumerate(layers):
            parts = [_block(d, i) for _ in range(n)]
            if i < len(ch) - 1 and n > 0:
                parts.append(SpaceToChannel(ch[i], ch[i + 1]))
            stages.append(nn.Sequential(*parts))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(ch[-1], d["latent_channels"], 3, padding=1)
        self.out_group = ch[-1] // d["latent_channels"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down_blocks:
            x = stage(x)
        return self.conv_out(x) + x.unflatten(1, (-1, self.out_group)).mean(dim=2)


class Decoder(nn.Module):
    def __init__(self, d: dict, out_channels: int):
        super().__init__()
        ch, layers = d["channels"], d["decoder_layers"]
        self.conv_in = nn.Conv2d(d["latent_channels"], ch[-1], 3, padding=1)
        self.in_repeats = ch[-1] // d["latent_channels"]
        stages = []
        for i, n in enumerate(layers):  # stored shallow-first (diffusers' order), run deep-first
            parts: list[nn.Module] = []
            if i < len(ch) - 1 and n > 0:
                parts.append(ChannelToSpace(ch[i + 1], ch[i]))
            parts += [_block(d, i, d["decoder_norms"][i], d["decoder_acts"][i]) for _ in range(n)]
            stages.append(nn.Sequential(*parts))
        self.up_blocks = nn.ModuleList(stages)
        head = ch[0] if layers[0] > 0 else ch[1]
        self.norm_out = ChannelRMSNorm(head)
        self.conv_out = (
            nn.Conv2d(head, out_channels, 3, padding=1)
            if layers[0] > 0
            else ChannelToSpace(head, out_channels, shortcut=False)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z) + z.repeat_interleave(self.in_repeats, dim=1)
        for stage in reversed(self.up_blocks):
            x = stage(x)
        return self.conv_out(F.relu(self.norm_out(x)))


class DCAE(Autoencoder):
    """Trainable: ``forward`` gives (reconstruction, latent, None): deterministic, so no
    log-variance and no KL term; ``encode`` / ``decode`` normalise as every autoencoder."""

    variational = False

    def __init__(self, cfg: DCAEConfig):
        d = cfg.dims()
        super().__init__(scale=d["scale"], shift=d["shift"])
        self.cfg = cfg
        self.latent_channels = d["latent_channels"]
        self.downsample = 2 ** (len(d["channels"]) - 1)
        self.encoder = Encoder(d, cfg.in_channels)
        self.decoder = Decoder(d, cfg.in_channels)

    def encode_raw(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        self.check_images(images_BCHW, self.cfg.in_channels)
        return self.encoder(images_BCHW)

    def decode_raw(self, latents_BChw: torch.Tensor) -> torch.Tensor:
        self.check_latents(latents_BChw)
        return self.decoder(latents_BChw)

    def forward(
        self, images_BCHW: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(reconstruction, latent, None). ``noise`` must be None: there is no posterior."""
        if noise is not None:
            raise ValueError("DC-AE is deterministic: it takes no posterior noise")
        latent = self.encode_raw(images_BCHW)
        return self.decode_raw(latent), latent.clone(), None

    def init_weights(self, seed: int) -> None:
        """PyTorch's default conv/linear init (uniform within 1/sqrt(fan_in)), unit norms,
        fresh BatchNorm statistics; each parameter from its own name-seeded generator."""
        ParamInit(self, seed).torch_defaults_(self, (ChannelRMSNorm, nn.BatchNorm2d))


def build(cfg: DCAEConfig) -> DCAE:
    return DCAE(cfg)


def parallelize(model: DCAE, plan: ParallelPlan, mesh=None) -> DCAE:
    blocks = [s for s in (*model.encoder.down_blocks, *model.decoder.up_blocks) if len(s)]
    return apply_parallelism(model, blocks, plan, mesh)


# ------------------------------------------------------------------ diffusers adapter
_KINDS = {"ResBlock": "res", "EfficientViTBlock": "vit"}


def _per_stage(value, stages: int) -> list:
    return [value] * stages if isinstance(value, str) else list(value)


def config_from_diffusers(config: dict) -> DCAEConfig:
    """Our config for a diffusers ``AutoencoderDC`` config.json. Encoder and decoder must
    share widths, block kinds and multi-scale kernels (all published DC-AEs do)."""
    problems = []
    if config.get("_class_name", "AutoencoderDC") != "AutoencoderDC":
        problems.append(f"_class_name: {config['_class_name']!r} is not an AutoencoderDC")
    channels = list(config.get("encoder_block_out_channels", PRESETS["f32c32"]["channels"]))
    stages = len(channels)
    if list(config.get("decoder_block_out_channels", channels)) != channels:
        problems.append("decoder_block_out_channels: must equal encoder_block_out_channels")
    kinds = [
        _per_stage(config.get(k, "ResBlock"), stages)
        for k in ("encoder_block_types", "decoder_block_types")
    ]
    if kinds[0] != kinds[1] or set(kinds[0]) - set(_KINDS):
        problems.append(f"block types {kinds} not supported (same per stage, {sorted(_KINDS)})")
    scales = [
        list(map(tuple, config.get(k, ())))
        for k in ("encoder_qkv_multiscales", "decoder_qkv_multiscales")
    ]
    vit_scales = {
        s for ks in scales for s, kind in zip(ks, kinds[0]) if kind == "EfficientViTBlock"
    }
    if len(vit_scales) > 1:
        problems.append(
            f"qkv_multiscales: one kernel set for all attention stages, got {sorted(vit_scales)}"
        )
    for key, want in (
        ("upsample_block_type", "pixel_shuffle"),
        ("downsample_block_type", "pixel_unshuffle"),
        ("decoder_conv_act_fn", "relu"),
    ):
        if config.get(key, want) != want:
            problems.append(f"{key}: {config[key]!r} is not supported (only {want!r})")
    for key in ("encoder_out_shortcut", "decoder_in_shortcut"):
        if not config.get(key, True):
            problems.append(f"{key}: false is not supported")
    if problems:
        raise ConfigError(problems, "diffusers AutoencoderDC config")
    return DCAEConfig(
        size="f32c32",
        channels=channels,
        encoder_layers=list(config.get("encoder_layers_per_block", (2, 2, 2, 3, 3, 3))),
        decoder_layers=list(config.get("decoder_layers_per_block", (3, 3, 3, 3, 3, 3))),
        blocks=[_KINDS[k] for k in kinds[0]],
        latent_channels=int(config.get("latent_channels", 32)),
        head_dim=int(config.get("attention_head_dim", 32)),
        qkv_kernels=list(next(iter(vit_scales), (5,))),
        decoder_norms=_per_stage(config.get("decoder_norm_types", "rms_norm"), stages),
        decoder_acts=_per_stage(config.get("decoder_act_fns", "silu"), stages),
        in_channels=int(config.get("in_channels", 3)),
        scale=float(config.get("scaling_factor", 1.0)),
        shift=0.0,
    )  # fmt: skip


def load_diffusers_checkpoint(path: str | Path) -> tuple[DCAEConfig, dict[str, torch.Tensor]]:
    """A local diffusers ``AutoencoderDC`` (its directory, a pipeline's ``vae/``, or one
    safetensors file beside its config.json) -> (our config, its state dict, which our
    module names take as they are), checked against the parameters the config builds."""
    path = model_directory(path, "vae")
    cfg = config_from_diffusers(read_config(path))
    state, files = read_weights(path)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DCAE(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unknown or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})"] if missing else []
        parts += [f"{len(unknown)} unknown (e.g. {unknown[:3]})"] if unknown else []
        parts += [f"{len(wrong)} with other shapes (e.g. {wrong[:3]})"] if wrong else []
        raise ValueError(
            f"{files}: not the AutoencoderDC its config describes: " + "; ".join(parts)
        )
    return cfg, state
