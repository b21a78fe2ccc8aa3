"""Autoencoder pretraining (the VAE stage before latent diffusion): reconstruction, KL,
an optional perceptual loss and an optional patch-GAN, as in the LDM / SD autoencoders.

Generator phase (the autoencoder, ``model``)::

    loss = rec + perceptual_weight * perc + kl_weight * KL / P + g_weight * gan_weight * G

with rec the per-pixel L1 or L2 mean, P the pixel elements per image (so ``kl_weight``
means what it does in LDM, whose reconstruction term is a per-image sum: 1e-6 there),
KL summed over latent elements and averaged over the batch, and G the generator's
adversarial loss on the reconstruction (hinge: -D(x_hat); non-saturating:
softplus(-D(x_hat))). ``g_weight`` is 1, or with ``adaptive_weight`` taming's balance
||grad rec|| / ||grad G|| (clamped to [0, 1e4]); the gradients are taken at the decoder's
output rather than its last weight, so the figure is the same under any sharding (the
norms are those of the global loss's gradient over all ranks' micro-batches).

Discriminator phase (``discriminator``, its own AdamW): hinge or non-saturating loss on
real images against the (detached) reconstructions. Before ``gan_start_step`` both
adversarial terms are 0 (the discriminator's optimizer has no weight decay, so a zero
gradient leaves it exactly as initialised).

A deterministic autoencoder (DC-AE: ``model.variational`` false) has no KL term and no
posterior noise; the rest is the same. A 1-D audio autoencoder (``audio_vae``, data
``kind: audio``) adds ``stft_weight`` times a multi-resolution STFT loss to the
reconstruction terms; its evaluation reports SNR and STFT distance and writes wav pairs
and spectrograms (no PatchGAN for 1-D signals yet: ``gan_weight`` must stay 0). A causal
video VAE (``video_vae``, data ``kind: video``) runs the PatchGAN and the perceptual
network on its frames; evaluation reports PSNR / SSIM over frames and writes frame strips.

Posterior noise is drawn per sample from ``sample_seed(seed, step, index)``, so training
is the same function of the data on any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from configlib import ConfigError, option
from models.kl_vae import kl_divergence
from models.patch_gan import PatchDiscriminator
from trainer.objectives.base import EvalContext, ExtraModule, Objective, Phase, sample_seed

_GAN_KEYS = (
    "gan_start_step",
    "gan_loss",
    "adaptive_weight",
    "disc_channels",
    "disc_layers",
    "disc_lr",
)


@dataclass(kw_only=True)
class AutoencodingConfig:
    name: str = option("autoencoding", "Training objective.")
    reconstruction: Literal["l1", "l2"] = option("l1", "Per-pixel reconstruction loss.")
    kl_weight: float = option(
        1e-6, "Weight of the KL term, relative to a per-image sum of the reconstruction loss.", ge=0
    )
    perceptual: str = option(
        doc="'none', or a local feature network (images in [-1, 1] -> a tensor or list of "
        "feature maps) for a feature-matching perceptual loss: a torch.export program "
        "(.pt2, export it with a dynamic batch dimension) or TorchScript (.pt, deprecated by "
        "torch). Required: nothing is downloaded."
    )
    perceptual_weight: float = option(1.0, "Weight of the perceptual loss.", ge=0)
    gan_weight: float = option(
        0.0, "Weight of the adversarial loss; 0 trains no discriminator.", ge=0
    )
    gan_start_step: int = option(
        0, "Step from which the adversarial terms apply (the discriminator learns from then).", ge=0
    )
    gan_loss: Literal["hinge", "non_saturating"] = option("hinge", "Adversarial loss.")
    adaptive_weight: bool = option(
        True, "Balance the generator's adversarial gradient against the reconstruction's."
    )
    disc_channels: int = option(64, "Width of the discriminator's first layer.", ge=1)
    disc_layers: int = option(3, "Strided layers of the PatchGAN discriminator.", ge=1)
    disc_lr: float | None = option(
        None, "Discriminator learning rate; default: optimizer.lr.", gt=0
    )
    stft_weight: float = option(
        0.0,
        "Audio: weight of the multi-resolution STFT loss (spectral convergence + log magnitude).",
        ge=0,
    )
    stft_sizes: list[int] = option(
        factory=lambda: [256, 512, 1024],
        doc="Audio: FFT sizes of the STFT loss (Hann window, hop a quarter of the size).",
    )
    eval_images: int = option(
        16,
        "Images (or audio clips) reconstructed at each evaluation (PSNR or SNR, pictures).",
        ge=1,
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = []
        if self.perceptual == "none" and "perceptual_weight" in given:
            out.append(("perceptual_weight", "has no effect with perceptual 'none'"))
        if self.gan_weight == 0:
            out += [(key, "has no effect with gan_weight 0") for key in _GAN_KEYS if key in given]
        if self.stft_weight == 0 and "stft_sizes" in given:
            out.append(("stft_sizes", "has no effect with stft_weight 0"))
        if any(size < 4 for size in self.stft_sizes):
            out.append(("stft_sizes", "every FFT size must be >= 4"))
        return out


class FeatureLoss(nn.Module):
    """Mean squared distance of channel-normalised features of a frozen network (the
    LPIPS construction without its learned per-channel weights)."""

    def __init__(self, path: str):
        super().__init__()
        if not Path(path).is_file():
            raise ConfigError(
                [
                    f"objective.perceptual: {path}: no such file (a local .pt2 or TorchScript "
                    "network; 'none' trains without a perceptual loss)"
                ]
            )
        if path.endswith(".pt2"):
            self.net = torch.export.load(path).module()
        else:
            self.net = torch.jit.load(path, map_location="cpu").eval()
        for param in self.net.parameters():  # frozen (a ScriptModule has no requires_grad_)
            param.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.net(x), self.net(y)
        fx, fy = ([fx], [fy]) if torch.is_tensor(fx) else (fx, fy)
        total = x.new_zeros(())
        for a, b in zip(fx, fy, strict=True):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (a - b).square().sum(1).mean()
        return total


def frames(x: torch.Tensor) -> torch.Tensor:
    """Videos (B, C, T, H, W) as a batch of frames (B * T, C, H, W) for the 2-D networks
    (discriminator, perceptual); images pass as they are."""
    return x.transpose(1, 2).flatten(0, 1) if x.ndim == 5 else x


def stft_distance(x_BCT: torch.Tensor, y_BCT: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Multi-resolution STFT loss of ``x`` against the reference ``y`` (Yamamoto et al.
    2020): per FFT size, spectral convergence ||S_y - S_x||_F / ||S_y||_F plus the mean
    |log S_y - log S_x| of the magnitudes; averaged over the sizes."""
    x, y = x_BCT.float().flatten(0, 1), y_BCT.float().flatten(0, 1)
    total = x.new_zeros(())
    for size in sizes:
        window = torch.hann_window(size, device=x.device)
        mx, my = (
            torch.stft(v, size, size // 4, window=window, return_complex=True).abs().clamp_min(1e-7)
            for v in (x, y)
        )
        convergence = torch.linalg.norm(my - mx) / torch.linalg.norm(my).clamp_min(1e-7)
        total = total + convergence + (my.log() - mx.log()).abs().mean()
    return total / len(sizes)


def snr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-noise ratio in dB of the reconstruction ``x`` of the signal ``y``."""
    noise = float((x.float() - y.float()).square().sum())
    return 10.0 * float(np.log10(float(y.float().square().sum()) / max(noise, 1e-12)))


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak: the range 2)."""
    mse = float((x.float().clamp(-1, 1) - y.float()).square().mean())
    return 10.0 * float(np.log10(4.0 / max(mse, 1e-12)))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) of images in [-1, 1] (B, C, H, W):
    Gaussian-weighted local means, variances and covariance over every full window
    (no padding), K1 = 0.01, K2 = 0.03, data range 2, averaged over channels and images.
    Images smaller than ``window`` use a window of their smaller side (odd)."""
    x, y = x.float().clamp(-1, 1), y.float()
    side = min(window, *x.shape[-2:])
    side -= 1 - side % 2
    taps = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
    g = torch.exp(-(taps**2) / (2 * sigma**2))
    g = (g / g.sum()).float().to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, side, side)

    def blur(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, kernel, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(ssim_map.mean())


class Autoencoding(Objective):
    def __init__(self, cfg: AutoencodingConfig, *, seed: int, rank: int, device: torch.device):
        self.cfg, self.seed, self.device = cfg, seed, device
        self.generator = torch.Generator().manual_seed(seed * 1009 + rank)
        self.perceptual = FeatureLoss(cfg.perceptual) if cfg.perceptual != "none" else None
        self.discriminator = None
        if cfg.gan_weight > 0:
            self.discriminator = PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers)
            self.discriminator.init_weights(seed + 1)

    def phases(self) -> list[Phase]:
        phases = [Phase("autoencoder", "model")]
        if self.discriminator is not None:
            phases.append(Phase("discriminator", "discriminator"))
        return phases

    def extra_modules(self) -> dict[str, ExtraModule]:
        out = {}
        if self.discriminator is not None:
            opt: dict[str, Any] = {"weight_decay": 0.0}
            if self.cfg.disc_lr is not None:
                opt["lr"] = self.cfg.disc_lr
            out["discriminator"] = ExtraModule(self.discriminator, trainable=True, optimizer=opt)
        if self.perceptual is not None:
            out["perceptual"] = ExtraModule(self.perceptual, trainable=False)
        return out

    def _noise(
        self, model: nn.Module, x: torch.Tensor, batch: dict, step: int
    ) -> torch.Tensor | None:
        if not model.variational:
            return None  # a deterministic autoencoder (DC-AE) has no posterior to sample
        shape = model.latent_shape(x.shape[1], *x.shape[2:])
        if "index" not in batch:
            return torch.randn((x.shape[0], *shape), generator=self.generator).to(x.device)
        rows = [
            torch.randn(
                shape, generator=torch.Generator().manual_seed(sample_seed(self.seed, step, int(i)))
            )
            for i in batch["index"].tolist()
        ]
        return torch.stack(rows).to(x.device)

    def _adversarial(
        self, logits_real: torch.Tensor | None, logits_fake: torch.Tensor
    ) -> torch.Tensor:
        if logits_real is None:  # generator side
            if self.cfg.gan_loss == "hinge":
                return -logits_fake.mean()
            return F.softplus(-logits_fake).mean()
        if self.cfg.gan_loss == "hinge":
            return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())

    def loss(
        self, phase: str, modules: dict[str, nn.Module], batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        model = modules["model"]
        x = batch["x"].to(self.device)
        gan_on = self.discriminator is not None and step >= self.cfg.gan_start_step
        if phase == "discriminator":
            disc = modules["discriminator"]
            with torch.no_grad():
                recon, _, _ = model(x, self._noise(model, x, batch, step))
            d_loss = self._adversarial(disc(frames(x)), disc(frames(recon.detach())))
            if not gan_on:
                return d_loss * 0.0, {}
            return d_loss, {}
        recon, mean, logvar = model(x, self._noise(model, x, batch, step))
        # The terms of the reconstruction are taken on a detached copy (a leaf): the
        # adaptive weight differentiates them with respect to it without running backward
        # into the autoencoder (a DeepSpeed engine reduces its gradients whenever its graph
        # runs backward), and their gradient G there enters the loss as <recon, G>, whose
        # value is 0 and whose gradient is the chain rule's J^T G.
        out = recon.detach().requires_grad_(True)
        diff = out - x
        rec = diff.abs().mean() if self.cfg.reconstruction == "l1" else diff.square().mean()
        terms, logs = rec, {"rec": float(rec.detach())}
        if self.cfg.stft_weight > 0:
            spectral = stft_distance(out, x, self.cfg.stft_sizes)
            terms = terms + self.cfg.stft_weight * spectral
            logs["stft"] = float(spectral.detach())
        if self.perceptual is not None:
            perc = modules["perceptual"](frames(out), frames(x))
            terms = terms + self.cfg.perceptual_weight * perc
            logs["perceptual"] = float(perc.detach())
        if self.discriminator is not None:
            g_loss = self._adversarial(None, modules["discriminator"](frames(out)))
            weight = self._balance(terms, g_loss, out) if gan_on else torch.zeros(())
            terms = terms + self.cfg.gan_weight * weight * g_loss
            logs.update({"g_loss": float(g_loss.detach()), "g_weight": float(weight)})
        (grad,) = torch.autograd.grad(terms, out)
        loss = terms.detach() + ((recon - recon.detach()) * grad).sum()
        if logvar is not None:  # variational: the KL of the posterior to N(0, 1)
            kl = kl_divergence(mean.float(), logvar.float()).mean()
            loss = loss + self.cfg.kl_weight * kl / x[0].numel()
            logs["kl"] = float(kl.detach())
        return loss, logs

    def _balance(
        self, rec_loss: torch.Tensor, g_loss: torch.Tensor, recon: torch.Tensor
    ) -> torch.Tensor:
        if not self.cfg.adaptive_weight:
            return torch.ones((), device=recon.device)
        (g_rec,) = torch.autograd.grad(rec_loss, recon, retain_graph=True)
        (g_gan,) = torch.autograd.grad(g_loss, recon, retain_graph=True)
        squares = torch.stack([g_rec.float().square().sum(), g_gan.float().square().sum()])
        if dist.is_initialized() and dist.get_world_size() > 1:
            # the global loss is the mean of the ranks' losses: its gradient at this
            # rank's reconstructions is the local one / world size
            dist.all_reduce(squares)
            squares = squares / dist.get_world_size() ** 2
        return (squares[0].sqrt() / (squares[1].sqrt() + 1e-4)).clamp(0.0, 1e4).detach()

    @torch.no_grad()
    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """Reconstructions (posterior mean) of a fixed image set: PSNR, SSIM, L1 and a grid of
        up to 8 originals over their reconstructions."""
        model = ctx.modules["model"]
        audio = getattr(model, "signal_axes", 2) == 1
        video = getattr(model, "signal_axes", 2) == 3
        if audio:
            x = ctx.data.eval_audio(self.cfg.eval_images)["x"].to(ctx.device)
        elif video:
            x = ctx.data.eval_videos(self.cfg.eval_images).to(ctx.device)
        else:
            x = ctx.data.eval_images(self.cfg.eval_images).to(ctx.device)
        noise = None
        if model.variational:  # the posterior mean
            noise = torch.zeros(
                (x.shape[0], *model.latent_shape(x.shape[1], *x.shape[2:])), device=ctx.device
            )
        recon = model(x, noise)[0].float().clamp(-1, 1)
        if ctx.rank != 0:
            return {}
        if audio:
            return self._evaluate_audio(x, recon, ctx)
        if video:
            return self._evaluate_video(x, recon, ctx)
        if ctx.out_dir is not None:
            from data_pipeline.grid import save_grid

            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            rows = min(8, x.shape[0])
            pairs = torch.cat([x[:rows].cpu(), recon[:rows].cpu()]).numpy()
            path = ctx.out_dir / f"reconstructions_step{ctx.step:08d}.png"
            save_grid(pairs, path, columns=rows, row_labels=["original", "reconstructed"])
        return {
            "eval/psnr": psnr(recon, x),
            "eval/ssim": ssim(recon, x),
            "eval/l1": float((recon - x).abs().mean()),
        }

    def _evaluate_video(
        self, x: torch.Tensor, recon: torch.Tensor, ctx: EvalContext
    ) -> dict[str, float]:
        """PSNR and SSIM over every frame, PSNR of the first frames alone (encoded on their
        own), and a frame strip per clip for up to 2 clips: original over reconstructed."""
        if ctx.out_dir is not None:
            from data_pipeline.grid import save_grid

            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            rows = []
            for i in range(min(2, x.shape[0])):
                rows += [frames(x[i : i + 1]).cpu(), frames(recon[i : i + 1]).cpu()]
            save_grid(
                torch.cat(rows).numpy(), ctx.out_dir / f"reconstructions_step{ctx.step:08d}.png",
                columns=x.shape[2], row_labels=["original", "reconstructed"] * (len(rows) // 2),
            )  # fmt: skip
        return {
            "eval/psnr": psnr(frames(recon), frames(x)),
            "eval/ssim": ssim(frames(recon), frames(x)),
            "eval/psnr_first_frame": psnr(recon[:, :, 0], x[:, :, 0]),
            "eval/l1": float((recon - x).abs().mean()),
        }

    def _evaluate_audio(
        self, x: torch.Tensor, recon: torch.Tensor, ctx: EvalContext
    ) -> dict[str, float]:
        """SNR, STFT distance and L1; up to 4 clips as one wav each (original, a beat of
        silence, reconstruction) and their log spectrograms, originals over reconstructions."""
        if ctx.out_dir is not None:
            from data_pipeline.audio import log_spectrogram, save_clip
            from data_pipeline.grid import save_grid

            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            rate = ctx.data.cfg.sample_rate
            rows = min(4, x.shape[0])
            for i in range(rows):
                gap = torch.zeros(x.shape[1], rate // 4, device=x.device)
                pair = torch.cat([x[i], gap, recon[i]], dim=1).cpu()
                save_clip(pair, rate, ctx.out_dir / f"reconstruction{i}_step{ctx.step:08d}.wav")
            size = 256 if x.shape[-1] >= 1024 else 64
            clips = torch.cat([x[:rows], recon[:rows]]).cpu()
            images = np.stack([log_spectrogram(clip[0], size)[None] for clip in clips])
            save_grid(
                images, ctx.out_dir / f"spectrograms_step{ctx.step:08d}.png",
                columns=rows, row_labels=["original", "reconstructed"],
            )  # fmt: skip
        return {
            "eval/snr": snr(recon, x),
            "eval/stft": float(stft_distance(recon, x, self.cfg.stft_sizes)),
            "eval/l1": float((recon - x).abs().mean()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
