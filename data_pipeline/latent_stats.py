"""Latent statistics of a trained autoencoder over a shard set, stored in its export.

    python -m data_pipeline.latent_stats runs/vae/vae.safetensors --data data/images \\
        [--images 4096] [--resolution 256 256] [--out vae_with_stats.safetensors]
    python -m data_pipeline.latent_stats audio_vae.safetensors --data data/tones \\
        --sample-rate 8000 --seconds 1.0 [--channels 1]

An audio VAE (1-D) reads audio shards instead: windows of ``--seconds`` at
``--sample-rate`` (shorter clips zero-padded, as in training); a video VAE reads video
shards, ``--frames`` per clip at ``--resolution``.

Encodes up to ``--images`` images (posterior means) and stores the SD3-style single
shift and scale (mean and 1 / std over every latent element, also printed per channel)
as the file's ``latent_shift`` / ``latent_scale`` metadata; recipes that name the file
as ``autoencoder.path`` then train on unit-variance latents. The file is rewritten
atomically (``--out`` writes a copy instead).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from configlib import ConfigError, from_dict
from data_pipeline.loader import DataError, WebDatasetConfig, WebDatasetSource
from models.autoencoders import (
    SCALE_KEY,
    SHIFT_KEY,
    build_autoencoder,
    pretrained_config,
    read_export,
)


def latent_moments(
    autoencoder, source: WebDatasetSource, images: int, device: torch.device, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (mean, std) of raw latents over ``images`` inputs (images or clips), and the count used."""
    from tqdm import tqdm

    total = sq = None
    elements = seen = 0
    bar = tqdm(total=images, desc="encode", unit=" img", file=sys.stderr, disable=not progress)
    with torch.no_grad():
        while seen < images:
            x = source.next_batch()["x"][: images - seen].to(device)
            z = autoencoder.encode_raw(x).double()  # (B, C, h, w) or (B, C, t)
            dims = (0, *range(2, z.ndim))
            s, s2 = z.sum(dim=dims), z.square().sum(dim=dims)
            total, sq = (s, s2) if total is None else (total + s, sq + s2)
            elements += z.numel() // z.shape[1]
            seen += x.shape[0]
            bar.update(x.shape[0])
    bar.close()
    mean = total / elements
    return mean, (sq / elements - mean.square()).clamp_min(0).sqrt(), seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.latent_stats", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "autoencoder", type=Path, help=".safetensors from trainer.export (kl_vae or dc_ae run)"
    )
    parser.add_argument(
        "--data", required=True, help="image shards (folder, brace pattern or s3://)"
    )
    parser.add_argument("--images", type=int, default=4096, help="images to encode (default 4096)")
    parser.add_argument("--resolution", type=int, nargs=2, metavar=("W", "H"), default=None)
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass")
    parser.add_argument("--sample-rate", type=int, default=None, help="audio: samples per second")
    parser.add_argument("--seconds", type=float, default=None, help="audio: window per clip")
    parser.add_argument(
        "--channels", type=int, default=None, help="audio: 1 or 2 (default: the model's)"
    )
    parser.add_argument("--frames", type=int, default=None, help="video: frames per clip")
    parser.add_argument("--out", type=Path, default=None, help="write here instead of in place")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.images < 1 or args.batch < 1:
            raise ValueError("--images and --batch must be positive")
        cfg = pretrained_config(args.autoencoder)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        autoencoder = build_autoencoder(cfg).to(device)
        data = {"urls": args.data, "kind": "images", "keep_captions": False}
        audio = getattr(autoencoder, "signal_axes", 2) == 1
        if audio:
            if args.sample_rate is None or args.seconds is None or args.resolution:
                raise ValueError(
                    "an audio autoencoder needs --sample-rate and --seconds (not --resolution)"
                )
            data.update(kind="audio", sample_rate=args.sample_rate, window_seconds=args.seconds)
            data["audio_channels"] = args.channels or autoencoder.cfg.in_channels
        elif args.sample_rate or args.seconds or args.channels:
            raise ValueError("--sample-rate, --seconds and --channels are for audio autoencoders")
        if getattr(autoencoder, "signal_axes", 2) == 3:
            if args.frames is None:
                raise ValueError("a video autoencoder needs --frames (1 + its temporal factor * k)")
            data.update(kind="video", num_frames=args.frames)
        elif args.frames is not None:
            raise ValueError("--frames is for video autoencoders")
        if args.resolution:
            data["resolutions"] = [list(args.resolution)]
        data_cfg = from_dict(WebDatasetConfig, data, source="--data/--resolution")
        source = WebDatasetSource(
            data_cfg, seed=0, rank=0, world_size=1, micro_batch=args.batch, accum_steps=1
        )
        try:
            mean, std, seen = latent_moments(
                autoencoder, source, args.images, device, progress=not args.no_progress
            )
        finally:
            source.close()
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shift = float(mean.mean())
    variance = float((std.square() + (mean - shift).square()).mean())  # over all elements
    scale = 1.0 / math.sqrt(max(variance, 1e-12))
    tensors, meta = read_export(args.autoencoder)
    meta.update({SHIFT_KEY: repr(shift), SCALE_KEY: repr(scale), "latent_stats_images": str(seen)})
    from safetensors.torch import save_file

    out = args.out or args.autoencoder
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)
    per_channel = ", ".join(
        f"{m:+.3f}/{s:.3f}" for m, s in zip(mean.tolist(), std.tolist(), strict=True)
    )
    print(f"per-channel mean/std over {seen} images: {per_channel}")
    print(f"wrote latent_shift {shift:.5f}, latent_scale {scale:.5f} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
