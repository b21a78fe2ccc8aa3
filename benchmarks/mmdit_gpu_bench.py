"""MMDiT training throughput and MFU on one GPU: FSDP2 bf16, activation checkpointing and
torch.compile off / on.

One training step as the trainer runs it: the model built on the meta device,
``models.mmdit.parallelize`` (FSDP2 on a 1-rank group with a MixedPrecisionPolicy of bf16
parameters and fp32 gradient reduction, then activation checkpointing, then compile,
per block), materialised and initialised; forward on noisy latents, a rectified-flow
style MSE loss, backward, AdamW step (fused on CUDA), zero_grad. Each combination gets a
fresh model; warm-up steps (compilation happens there) are followed by timed steps
between two CUDA events.

Reported per combination: step time, samples/s, achieved TFLOP/s =
``model.flops_per_sample()`` x samples/s (forward + backward = 3x forward; the forward
that activation checkpointing recomputes is not counted, as usual for MFU), MFU against
the device's dense bf16 peak (``trainer.metrics.device_peak_tflops``), peak memory.
Goal: MFU >= 45% on one H100-class GPU for the sd3_medium preset (~2B) at 1024^2
(128 x 128 x 16 latents: 4096 image tokens) + 333 text tokens.

Needs only torch and this repository (no ray / deepspeed / diffusers). Without CUDA it
prints why and exits 0; ``--device cpu --preset tiny --steps 2`` runs the same code path
on CPU (gloo instead of NCCL) as a smoke test.

Usage: python benchmarks/mmdit_gpu_bench.py [--preset sd3_medium] [--batch 2]
       [--steps 10] [--warmup 3] [--combos off-off,on-off,off-on,on-on] [--sdpa default]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:  # configlib (imported by models.mmdit) reads recipe YAML with it
    import yaml  # noqa: F401
except ImportError:  # a bare GPU box with only torch: this script reads no YAML
    sys.modules["yaml"] = types.SimpleNamespace(YAMLError=Exception, safe_load=None)

from models.common.parallelize import ParallelPlan  # noqa: E402
from models.mmdit import PRESETS, MMDiTConfig, build, parallelize  # noqa: E402
from trainer.metrics import device_peak_tflops  # noqa: E402

MFU_GOAL = 0.45
COMBOS = {
    "off-off": (False, False),
    "on-off": (True, False),
    "off-on": (False, True),
    "on-on": (True, True),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--preset", choices=list(PRESETS), default="sd3_medium")
    parser.add_argument("--batch", type=int, default=2, help="samples per step")
    parser.add_argument(
        "--latent",
        type=int,
        default=None,
        help="latent side (default 128 = 1024 px / 8; 32 on CPU)",
    )
    parser.add_argument("--latent-channels", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=333, help="77 CLIP + 256 T5")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per combination")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first, compiling (3; 1 on CPU)"
    )
    parser.add_argument(
        "--combos",
        default=",".join(COMBOS),
        help="comma-separated AC-compile pairs out of " + ", ".join(COMBOS),
    )
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="param dtype")
    parser.add_argument(
        "--sdpa",
        choices=["default", "cudnn", "flash"],
        default="default",
        help="attention kernel preference (default: torch's choice)",
    )
    parser.add_argument(
        "--keep-unsharded",
        action="store_true",
        help="reshard_after_forward=False (no re-gather in backward; costs memory)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 peak")
    args = parser.parse_args()
    cpu = args.device == "cpu"  # smoke-test defaults: the same path in seconds, not minutes
    args.latent = args.latent or (32 if cpu else 128)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    unknown = [c for c in args.combos.split(",") if c not in COMBOS]
    if unknown:
        parser.error(f"unknown --combos {unknown}; choose from {list(COMBOS)}")
    return args


def init_group(device: torch.device) -> None:
    """A 1-rank process group (NCCL on CUDA, gloo on CPU) with an in-process store."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device
        )
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def sdpa_context(choice: str, device: torch.device):
    import contextlib

    if choice == "default" or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = SDPBackend.CUDNN_ATTENTION if choice == "cudnn" else SDPBackend.FLASH_ATTENTION
    order = [first] + [
        b
        for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
        if b != first
    ]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: restrict to the chosen kernel
        return sdpa_kernel([first])


def make_batch(cfg: MMDiTConfig, args, device: torch.device, seed: int = 0) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (args.batch, args.latent_channels, args.latent, args.latent)
    x0, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    t = torch.rand(args.batch, generator=gen)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    batch = {
        "x_t": x_t,
        "t": t,
        "target": noise - x0,
        "context": torch.randn(args.batch, args.text_tokens, cfg.context_dim, generator=gen),
        "pooled": torch.randn(args.batch, cfg.pooled_dim, generator=gen),
    }
    return {key: value.to(device) for key, value in batch.items()}


def train_step(model, optimizer, batch: dict) -> torch.Tensor:
    out = model(batch["x_t"], batch["t"], {"context": batch["context"], "pooled": batch["pooled"]})
    loss = torch.nn.functional.mse_loss(out.float(), batch["target"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure(cfg, args, device, mesh, checkpointing: bool, compiled: bool) -> dict:
    plan = ParallelPlan(
        backend="fsdp2",
        param_dtype=args.dtype,
        reduce_dtype="fp32",
        reshard_after_forward=not args.keep_unsharded,
        activation_checkpointing=checkpointing,
        compile=compiled,
    )
    with torch.device("meta"):
        model = build(cfg)
    model = parallelize(model, plan, mesh)
    model.to_empty(device=device)
    model.init_weights(0)
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=cuda)
    batch = make_batch(cfg, args, device)
    with sdpa_context(args.sdpa, device):
        for _ in range(args.warmup):
            loss = train_step(model, optimizer, batch)
        if not cuda:
            begin = time.perf_counter()
            for _ in range(args.steps):
                loss = train_step(model, optimizer, batch)
            seconds, peak_gb = time.perf_counter() - begin, None
        else:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.steps):
                loss = train_step(model, optimizer, batch)
            end.record()
            torch.cuda.synchronize(device)
            seconds = start.elapsed_time(end) / 1e3
            peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {loss.item()}")
    return {"step_s": seconds / args.steps, "peak_gb": peak_gb}


def run_combo(cfg, args, device, mesh, checkpointing: bool, compiled: bool) -> dict:
    """One fresh model per combination (AC and compile wrap the blocks in place)."""
    try:
        result = measure(cfg, args, device, mesh, checkpointing, compiled)
    except torch.OutOfMemoryError:
        result = {"error": "out of memory"}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "mmdit_gpu_bench: CUDA is not available, nothing measured (skipped). It needs one "
            "CUDA GPU; `--device cpu --preset tiny --steps 2` runs the same path on CPU."
        )
        return
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (loss, norms' stats)
    init_group(device)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (1,))
    cfg = MMDiTConfig(
        size=args.preset,
        in_channels=args.latent_channels,
        sample_size=args.latent,
        text_tokens=args.text_tokens,
    )
    with torch.device("meta"):
        params = sum(p.numel() for p in build(cfg).parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = device_peak_tflops(name if device.type == "cuda" else None, args.peak_tflops)
    image_tokens = (args.latent // cfg.patch_size) ** 2
    with torch.device("meta"):
        flops = build(cfg).flops_per_sample(image_tokens, args.text_tokens)
    print(
        f"MMDiT {args.preset}: {params / 1e6:,.1f}M params, batch {args.batch}, "
        f"{args.latent}x{args.latent}x{args.latent_channels} latents ({image_tokens} image tokens) "
        f"+ {args.text_tokens} text tokens\n"
        f"FSDP2 on 1 rank (reshard_after_forward {not args.keep_unsharded}), {args.dtype} params "
        f"/ fp32 reduce, AdamW (fused on CUDA), sdpa "
        f"{args.sdpa}, {args.warmup} warm-up + {args.steps} timed steps per combination\n"
        f"training FLOPs per sample {flops / 1e12:.3f} TFLOP (model.flops_per_sample: fwd + bwd, "
        "AC recompute not counted)\n"
        f"device {name}, torch {torch.__version__}, dense bf16 peak "
        + (f"{peak:.0f} TFLOP/s" if peak else "unknown (MFU not computed)")
    )
    header = f"{'AC':<5}{'compile':<9}{'step ms':>9}{'samples/s':>11}{'TFLOP/s':>10}{'MFU':>8}{'peak GB':>9}"
    print("\n" + header)
    best = None
    for combo in args.combos.split(","):
        checkpointing, compiled = COMBOS[combo]
        result = run_combo(cfg, args, device, mesh, checkpointing, compiled)
        label = f"{'on' if checkpointing else 'off':<5}{'on' if compiled else 'off':<9}"
        if "error" in result:
            print(f"{label}{result['error']:>9}")
            continue
        samples_s = args.batch / result["step_s"]
        tflops = flops * samples_s / 1e12
        mfu = tflops / peak if peak else None
        memory = f"{result['peak_gb']:.1f}" if device.type == "cuda" else "-"
        if mfu is not None:
            best = max(best or 0.0, mfu)
        print(
            f"{label}{1e3 * result['step_s']:>9.1f}{samples_s:>11.2f}{tflops:>10.3g}"
            f"{(f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'):>8}"
            f"{memory:>9}"
        )
    if best is not None:
        verdict = "PASS" if best >= MFU_GOAL else "MISS"
        print(f"\nbest MFU {100 * best:.1f}%  goal >= {100 * MFU_GOAL:.0f}%: {verdict}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
