"""Video DiT forward+backward on CPU: ours against diffusers' WanTransformer3DModel.

Both are built at the same configuration: width (heads x head dim), depth, MLP width
(4 D), (1, 2, 2) tubelets of latent clips of the same shape, text tokens and width,
batch. The blocks have the same layout (self-attention with 3-D RoPE and RMS QK-norm,
cross-attention to the text, MLP, modulated by the timestep). Wan shares one modulation
projection across blocks (a learnt table per block): ours with ``shared_modulation`` is
that configuration and the one the goal is judged on; ours with adaLN-zero per block
(the default) is timed beside it. Weights are not shared, so the outputs differ; FLOPs
per step are printed (ours exact from ``flops_per_sample``, diffusers' from PyTorch's
FLOP counter).

One iteration is forward, a mean-square loss on the output, backward and clearing the
gradients, on fixed inputs; the two are timed alternately, iteration by iteration, so a
noisy machine slows both alike; each figure is the median over ``--iters`` after
``--warmup`` of each. One torch thread by default (see benchmarks/mmdit_cpu_bench.py).

Goal: ours no slower, i.e. median(ours) / median(diffusers) <= 1.0.

Usage: python benchmarks/video_dit_cpu_bench.py [--depth 4 --heads 8 --head-dim 64
       --frames 4 --size 16 --channels 16 --text-tokens 64 --batch 1 --iters 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.video_dit import VideoDiT, VideoDiTConfig  # noqa: E402

GOAL = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--frames", type=int, default=4, help="latent frames")
    parser.add_argument("--size", type=int, default=16, help="latent side")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--context-dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    width = args.heads * args.head_dim
    reference = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim,
        in_channels=args.channels, out_channels=args.channels, text_dim=args.context_dim,
        ffn_dim=4 * width, num_layers=args.depth, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    ).train()  # fmt: skip
    with torch.no_grad():  # Wan zero-initialises nothing that matters here; match the perturbation
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)

    def build_ours(shared: bool) -> VideoDiT:
        model = VideoDiT(
            VideoDiTConfig(
                depth=args.depth, num_heads=args.heads, head_dim=args.head_dim,
                in_channels=args.channels, patch_size=(1, 2, 2), context_dim=args.context_dim,
                sample_shape=(args.frames, args.size, args.size), text_tokens=args.text_tokens,
                shared_modulation=shared,
            )
        ).train()  # fmt: skip
        model.init_weights(0)
        with torch.no_grad():  # adaLN-zero starts at zero: give every path work to do
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return model

    ours, per_block = build_ours(True), build_ours(False)

    b = args.batch
    x = torch.randn(b, args.channels, args.frames, args.size, args.size)
    t = torch.rand(b)
    text = torch.randn(b, args.text_tokens, args.context_dim)

    def step_of(model: VideoDiT):
        def step() -> None:
            model(x, t, {"context": text}).square().mean().backward()
            model.zero_grad(set_to_none=True)

        return step

    def step_diffusers() -> None:
        out = reference(x, timestep=t * 1000, encoder_hidden_states=text).sample
        out.square().mean().backward()
        reference.zero_grad(set_to_none=True)

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step_diffusers()
    flops_ref = counter.get_total_flops()
    flops_ours = b * ours.flops_per_sample((args.frames, args.size, args.size), args.text_tokens)
    tokens = args.frames * (args.size // 2) ** 2
    params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (ours, per_block, reference)]
    print(
        f"video DiT depth {args.depth}, {args.heads} heads x {args.head_dim}, batch {b}, "
        f"{args.channels} x {args.frames} x {args.size} x {args.size} latents ({tokens} tokens) "
        f"+ {args.text_tokens} text tokens, fp32\n"
        f"params: ours {params[0]:.1f}M (per-block adaLN {params[1]:.1f}M), diffusers "
        f"{params[2]:.1f}M; FLOPs per step: ours "
        f"{flops_ours / 1e9:.2f} G, diffusers {flops_ref / 1e9:.2f} G (ratio {flops_ours / flops_ref:.2f})\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"{args.iters} alternating iterations after {args.warmup} warm-up, forward+backward"
    )
    steps = {"ours": step_of(ours), "per-block": step_of(per_block), "diffusers": step_diffusers}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    ours_s, block_s, ref_s = (statistics.median(times[k]) for k in steps)
    ratio = ours_s / ref_s
    print(f"ours (shared modulation)   {ours_s * 1e3:8.1f} ms/iter")
    print(f"ours (per-block adaLN)     {block_s * 1e3:8.1f} ms/iter")
    print(f"diffusers                  {ref_s * 1e3:8.1f} ms/iter")
    print(f"ratio per-block/diffusers {block_s / ref_s:.3f}")
    verdict = "meets" if ratio <= GOAL else "misses"
    print(f"ratio ours/diffusers {ratio:.3f} ({verdict} the goal <= {GOAL})")


if __name__ == "__main__":
    main()
