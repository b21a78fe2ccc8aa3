"""MMDiT forward+backward on CPU: ours against diffusers' SD3Transformer2DModel.

Both networks are built at the same configuration and carry the same weights: diffusers'
random init, perturbed, then copied into ours through ``models.mmdit_diffusers`` (the
outputs are checked to agree before timing, so both compute the same function). One
iteration is forward, a mean-square loss on the output, backward, and clearing the
gradients, on the same inputs (diffusers gets timestep = t * 1000, ours t). The two are
timed alternately, iteration by iteration, so a noisy machine slows both alike; each
figure is the median over ``--iters`` iterations after ``--warmup`` of each. One torch
thread by default: on a small shared machine, OpenMP threads that lose their core to
another process spin and stall both networks by 10-40x, which hides the comparison.

Goal: ours no slower, i.e. median(ours) / median(diffusers) <= 1.05 (5% for noise).

Usage: python benchmarks/mmdit_cpu_bench.py [--depth 4 --heads 4 --head-dim 32
       --latent 32 --batch 4 --text-tokens 77 --iters 30 --warmup 3 --threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.mmdit import build  # noqa: E402
from models.mmdit_diffusers import config_from_diffusers, from_diffusers_state_dict  # noqa: E402

GOAL = 1.05


def step_ours(model, x, t, context, pooled) -> None:
    out = model(x, t, {"context": context, "pooled": pooled})
    out.square().mean().backward()
    model.zero_grad(set_to_none=True)


def step_diffusers(model, x, t, context, pooled) -> None:
    out = model(
        x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t * 1000
    ).sample
    out.square().mean().backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32, help="latent side (patch 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=77)
    parser.add_argument("--context-dim", type=int, default=256)
    parser.add_argument("--pooled-dim", type=int, default=256)
    parser.add_argument("--qk-norm", choices=["rms_norm", "none"], default="rms_norm")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: torch's default, one per core)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    width = args.heads * args.head_dim
    reference = SD3Transformer2DModel(
        sample_size=args.latent,
        patch_size=2,
        in_channels=args.in_channels,
        num_layers=args.depth,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.heads,
        joint_attention_dim=args.context_dim,
        caption_projection_dim=width,
        pooled_projection_dim=args.pooled_dim,
        out_channels=args.in_channels,
        pos_embed_max_size=max(96, args.latent // 2),
        qk_norm=None if args.qk_norm == "none" else args.qk_norm,
    ).train()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    ours = build(config_from_diffusers(dict(reference.config))).train()
    ours.load_state_dict(from_diffusers_state_dict(reference.state_dict()), strict=True)

    x = torch.randn(args.batch, args.in_channels, args.latent, args.latent)
    t = torch.rand(args.batch)
    context = torch.randn(args.batch, args.text_tokens, args.context_dim)
    pooled = torch.randn(args.batch, args.pooled_dim)
    with torch.no_grad():
        a = ours(x, t, {"context": context, "pooled": pooled})
        b = reference(
            x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t * 1000
        ).sample
    diff = (a - b).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(
            f"outputs disagree (max |diff| {diff:.2e}): the adapter or the model is broken"
        )

    params = sum(p.numel() for p in ours.parameters())
    tokens = (args.latent // 2) ** 2
    print(
        f"MMDiT depth {args.depth}, {args.heads} heads x {args.head_dim}, {params / 1e6:.2f}M params, "
        f"batch {args.batch}, {args.latent}x{args.latent}x{args.in_channels} latents ({tokens} image tokens) "
        f"+ {args.text_tokens} text tokens, qk_norm {args.qk_norm}, fp32\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"max |ours - diffusers| {diff:.1e}; {args.iters} alternating iterations after "
        f"{args.warmup} warm-up, forward+backward"
    )
    runs = {
        "diffusers": lambda: step_diffusers(reference, x, t, context, pooled),
        "ours": lambda: step_ours(ours, x, t, context, pooled),
    }
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.iters):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)

    print(f"\n{'':<28}{'median ms':>10}{'min ms':>10}{'max ms':>10}")
    for name in runs:
        values = times[name]
        print(
            f"{name:<28}{1e3 * statistics.median(values):>10.1f}"
            f"{1e3 * min(values):>10.1f}{1e3 * max(values):>10.1f}"
        )
    ratio = statistics.median(times["ours"]) / statistics.median(times["diffusers"])
    verdict = "PASS" if ratio <= GOAL else "MISS"
    print(
        f"\nours / diffusers (medians)  {ratio:.3f}  goal <= {GOAL:.2f} (ours no slower): {verdict}"
    )


if __name__ == "__main__":
    main()
