"""Autoencoder encode / decode images/s on CPU: ours against diffusers, same weights.

KL-VAE against ``AutoencoderKL`` and DC-AE against ``AutoencoderDC``, each pair built at
one configuration with diffusers' random init copied into ours (through
``models.kl_vae.from_diffusers_state_dict``; the DC-AE takes diffusers' names as they are).
The outputs are checked to agree before timing. Inference only (no_grad, eval mode):
encode is images -> latents (posterior mean for the VAE), decode is latents -> images.
Ours and diffusers' are timed alternately, call by call, so a noisy machine slows both
alike; each figure is the median over ``--iters`` calls after ``--warmup``. One torch
thread by default (see benchmarks/mmdit_cpu_bench.py for why).

Goal: ours no slower, median(ours) / median(diffusers) <= 1.05 for each of the four.

Usage: python benchmarks/autoencoder_cpu_bench.py [--size 128 --batch 4 --iters 10
       --warmup 2 --threads 1 --only kl_vae|dc_ae]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import dc_ae, kl_vae  # noqa: E402

GOAL = 1.05

# SD-layout KL-VAE at half width (f8, 4 latent channels) and a 4-stage DC-AE (f8 here, so
# 128 px gives latents big enough to time) with conv and linear-attention stages
KL_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[64, 128, 256, 256],
)  # fmt: skip
DC_CONFIG = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[64, 128, 256, 256], decoder_block_out_channels=[64, 128, 256, 256],
    encoder_layers_per_block=[1, 2, 2, 2], decoder_layers_per_block=[1, 2, 2, 2],
    encoder_qkv_multiscales=[[], [], [5], [5]], decoder_qkv_multiscales=[[], [], [5], [5]],
    decoder_norm_types="rms_norm", decoder_act_fns="silu",
)  # fmt: skip


def pairs(only: str | None):
    import diffusers

    out = []
    if only in (None, "kl_vae"):
        torch.manual_seed(0)
        ref = diffusers.AutoencoderKL(**KL_CONFIG).eval()
        ours = kl_vae.KLVAE(kl_vae.config_from_diffusers(dict(ref.config))).eval()
        ours.load_state_dict(kl_vae.from_diffusers_state_dict(ref.state_dict()))
        out.append(("kl_vae", ours, ref, lambda x, ref=ref: ref.encode(x).latent_dist.mean))
    if only in (None, "dc_ae"):
        torch.manual_seed(0)
        ref = diffusers.AutoencoderDC(**DC_CONFIG).eval()
        ours = dc_ae.DCAE(dc_ae.config_from_diffusers(dict(ref.config))).eval()
        ours.load_state_dict(ref.state_dict())
        out.append(("dc_ae", ours, ref, lambda x, ref=ref: ref.encode(x).latent))
    return out


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--only", choices=["kl_vae", "dc_ae"], default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    x = x * 2 - 1
    print(f"{args.batch} images of {args.size} px, {torch.get_num_threads()} thread(s), "
          f"median of {args.iters} calls")  # fmt: skip
    print(
        f"{'model':8} {'pass':7} {'ours img/s':>11} {'diffusers img/s':>16} {'ours/diffusers time':>20}"
    )
    worst = 0.0
    with torch.no_grad():
        for name, ours, ref, ref_encode in pairs(args.only):
            z = ours.encode_raw(x)
            torch.testing.assert_close(z, ref_encode(x), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(
                ours.decode_raw(z), ref.decode(z).sample, atol=1e-4, rtol=1e-4
            )
            passes = {
                "encode": ((ours.encode_raw, x), (ref_encode, x)),
                "decode": ((ours.decode_raw, z), (lambda v, ref=ref: ref.decode(v).sample, z)),
            }
            for kind, ((fa, xa), (fb, xb)) in passes.items():
                a, b = [], []
                for i in range(args.warmup + args.iters):
                    ta, tb = timed(fa, xa), timed(fb, xb)
                    if i >= args.warmup:
                        a.append(ta)
                        b.append(tb)
                ratio = statistics.median(a) / statistics.median(b)
                worst = max(worst, ratio)
                print(f"{name:8} {kind:7} {args.batch / statistics.median(a):11.2f} "
                      f"{args.batch / statistics.median(b):16.2f} {ratio:20.3f}")  # fmt: skip
    print(f"worst ratio {worst:.3f}: {'meets' if worst <= GOAL else 'misses'} the goal <= {GOAL}")


if __name__ == "__main__":
    main()
