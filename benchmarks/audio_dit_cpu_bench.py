"""Audio DiT forward+backward on CPU: ours against diffusers' StableAudioDiTModel.

Both are built at the same configuration: width (heads x head dim), depth, latent
channels and frames, text tokens and text width, batch; diffusers' cross-attention gets
as many key/value heads as query heads (ours has no grouped keys). The architectures are
not the same function, so weights are not shared: diffusers' blocks have a SwiGLU MLP
(3 matrices of 4 D x D, ours GELU with 2) and no adaLN, and its timing enters as a
prepended token while ours adds modulations; FLOPs per step are printed for both
(ours exact from ``flops_per_sample``, diffusers' from PyTorch's FLOP counter), so the
time ratio can be read beside the work ratio.

One iteration is forward, a mean-square loss on the output, backward and clearing the
gradients, on fixed inputs; the two are timed alternately, iteration by iteration, so a
noisy machine slows both alike; each figure is the median over ``--iters`` after
``--warmup`` of each. One torch thread by default (see benchmarks/mmdit_cpu_bench.py).

Goal: ours no slower, i.e. median(ours) / median(diffusers) <= 1.0.

Usage: python benchmarks/audio_dit_cpu_bench.py [--depth 4 --heads 8 --head-dim 64
       --channels 64 --frames 256 --text-tokens 64 --batch 2 --iters 20 --threads 1]
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

from models.audio_dit import AudioDiT, AudioDiTConfig  # noqa: E402

GOAL = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--context-dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import StableAudioDiTModel
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    torch.manual_seed(0)
    width = args.heads * args.head_dim
    reference = StableAudioDiTModel(
        sample_size=args.frames, in_channels=args.channels, num_layers=args.depth,
        attention_head_dim=args.head_dim, num_attention_heads=args.heads,
        num_key_value_attention_heads=args.heads, out_channels=args.channels,
        cross_attention_dim=width, time_proj_dim=256, global_states_input_dim=2 * width,
        cross_attention_input_dim=args.context_dim,
    ).train()  # fmt: skip
    ours = AudioDiT(
        AudioDiTConfig(
            depth=args.depth, num_heads=args.heads, head_dim=args.head_dim,
            in_channels=args.channels, patch_size=1, context_dim=args.context_dim,
            sample_frames=args.frames, text_tokens=args.text_tokens,
        )
    ).train()  # fmt: skip
    ours.init_weights(0)
    with torch.no_grad():  # adaLN-zero starts at zero: give every path work to do
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)

    b = args.batch
    x = torch.randn(b, args.channels, args.frames)
    t = torch.rand(b)
    text = torch.randn(b, args.text_tokens, args.context_dim)
    # diffusers: the pipeline's projected timing (a global token and two context tokens)
    global_states = torch.randn(b, 1, 2 * width)
    context = torch.cat([text, torch.randn(b, 2, args.context_dim)], dim=1)
    rotary = get_1d_rotary_pos_embed(
        args.head_dim // 2, args.frames + 1, use_real=True, repeat_interleave_real=False
    )
    cond = {
        "context": text,
        "seconds_start": torch.zeros(b),
        "seconds_total": torch.full((b,), 10.0),
    }

    def step_ours() -> None:
        ours(x, t, cond).square().mean().backward()
        ours.zero_grad(set_to_none=True)

    def step_diffusers() -> None:
        out = reference(
            x, timestep=t * 1000, encoder_hidden_states=context,
            global_hidden_states=global_states, rotary_embedding=rotary,
        ).sample  # fmt: skip
        out.square().mean().backward()
        reference.zero_grad(set_to_none=True)

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step_diffusers()
    flops_ref = counter.get_total_flops()
    flops_ours = b * ours.flops_per_sample(args.frames, args.text_tokens)
    params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (ours, reference)]
    print(
        f"audio DiT depth {args.depth}, {args.heads} heads x {args.head_dim}, batch {b}, "
        f"{args.channels} x {args.frames} latents + {args.text_tokens} text tokens, fp32\n"
        f"params: ours {params[0]:.1f}M, diffusers {params[1]:.1f}M; FLOPs per step: ours "
        f"{flops_ours / 1e9:.2f} G, diffusers {flops_ref / 1e9:.2f} G (ratio {flops_ours / flops_ref:.2f})\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"{args.iters} alternating iterations after {args.warmup} warm-up, forward+backward"
    )
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for i in range(args.warmup + args.iters):
        for name, step in (("ours", step_ours), ("diffusers", step_diffusers)):
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    ours_s, ref_s = (statistics.median(times[k]) for k in ("ours", "diffusers"))
    ratio = ours_s / ref_s
    print(f"ours      {ours_s * 1e3:8.1f} ms/iter")
    print(f"diffusers {ref_s * 1e3:8.1f} ms/iter")
    verdict = "meets" if ratio <= GOAL else "misses"
    print(f"ratio ours/diffusers {ratio:.3f} ({verdict} the goal <= {GOAL})")


if __name__ == "__main__":
    main()
