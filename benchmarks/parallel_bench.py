"""Step time and peak memory per rank: FSDP2 against DeepSpeed ZeRO-2 and ZeRO-3.

The same MMDiT (same seed, same weights) is trained for a few steps on synthetic
latents and text embeddings by each backend in turn, each on ``--ranks`` fresh processes
(gloo on CPU, nccl on GPUs), through the backends the trainer itself uses
(trainer.backends): build and initialise, backward, clip + AdamW step. Reported per
backend: the median step time over ``--steps`` timed steps after ``--warmup`` (rank 0's
clock; every step ends in a collective), and per rank the peak memory: on CPU the peak
resident set (ru_maxrss) and its growth over the process's RSS before the model was built
(torch, DeepSpeed and the process group already imported and made), on GPU
``torch.cuda.max_memory_allocated``; and what the rank still holds after the last step
(CPU: RSS growth after ``malloc_trim``; GPU: ``memory_allocated``). Ratios are against
FSDP2 measured in the same run.

Usage: python benchmarks/parallel_bench.py [--depth 8 --heads 8 --head-dim 64 --batch 4
       --latent 16 --steps 6 --warmup 2 --ranks 2 --threads 1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BACKENDS = {
    "fsdp2": {"backend": "fsdp2"},
    "zero2": {"backend": "deepspeed", "zero_stage": 2},
    "zero3": {"backend": "deepspeed", "zero_stage": 3},
}


def _rss_mb() -> float:
    """Current resident set in MB (Linux /proc; peak only where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trimmed_rss_mb() -> float:
    """RSS after handing freed heap pages back to the OS (glibc keeps them otherwise),
    so what remains is what the process still uses."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _rss_mb()


def worker(rank: int, port: int, name: str, args: argparse.Namespace, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(args.ranks),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    from cluster.env import DistEnv
    from models import mmdit
    from trainer import distributed as D
    from trainer.backends import make_backend
    from trainer.config import OptimizerConfig, ParallelConfig
    from trainer.warm_start import Start

    if args.threads:
        torch.set_num_threads(args.threads)
    device = D.pick_device("auto", rank)
    env = DistEnv("torchrun", rank=rank, world_size=args.ranks, local_rank=rank)
    D.init_distributed(env, device, 600)
    if BACKENDS[name]["backend"] == "deepspeed":
        import deepspeed  # noqa: F401  (imported before the baseline, like torch)

    cuda = device.type == "cuda"
    baseline = _rss_mb()
    backend = make_backend(
        ParallelConfig(**BACKENDS[name]),
        grad_clip=1.0,
        device=device,
        rank=rank,
        world_size=args.ranks,
        micro_batch=args.batch,
        accum_steps=1,
    )
    model_cfg = mmdit.MMDiTConfig(
        depth=args.depth,
        num_heads=args.heads,
        head_dim=args.head_dim,
        in_channels=4,
        context_dim=args.context_dim,
        pooled_dim=args.context_dim,
        pos_max_grid=max(8, args.latent // 2),
        pos_base_grid=max(8, args.latent // 2),
    )
    backend.build_model(mmdit, model_cfg, OptimizerConfig(lr=1e-4), Start(0))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=gen).to(device)
    target = torch.randn(x.shape, generator=gen).to(device)
    t = torch.rand(args.batch, generator=gen).to(device)
    cond = {
        "context": torch.randn(args.batch, 77, args.context_dim, generator=gen).to(device),
        "pooled": torch.randn(args.batch, args.context_dim, generator=gen).to(device),
    }
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        modules = backend.begin_phase("model")
        loss = (modules["model"](x, t, cond).float() - target).pow(2).mean()
        backend.backward("model", loss, 0, 1)
        backend.finish_phase("model", True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    results.put(
        {
            "rank": rank,
            "median_s": statistics.median(times),
            "peak_mb": peak,
            "growth_mb": None if cuda else peak - baseline,
            "held_mb": torch.cuda.memory_allocated() / 2**20
            if cuda
            else _trimmed_rss_mb() - baseline,
            "params": backend.num_params(),
        }
    )
    D.close()


def run_backend(name: str, args: argparse.Namespace) -> list[dict]:
    from cluster.env import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=worker, args=(r, port, name, args, results)) for r in range(args.ranks)
    ]
    for proc in procs:
        proc.start()
    out = [results.get(timeout=3600) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"{name}: a rank failed with exit code {proc.exitcode}")
    return sorted(out, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--context-dim", type=int, default=256)
    parser.add_argument("--latent", type=int, default=16, help="latent side (4 channels, patch 2)")
    parser.add_argument("--batch", type=int, default=4, help="samples per rank and step")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per rank (0: default)"
    )
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    args = parser.parse_args()
    if args.backends[0] != "fsdp2":
        raise SystemExit("ratios are against fsdp2: list it first")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, args.threads)))

    measured = {}
    for name in args.backends:
        print(f"running {name} on {args.ranks} ranks ...", flush=True)
        measured[name] = run_backend(name, args)
    params = measured["fsdp2"][0]["params"]
    gpu = measured["fsdp2"][0]["growth_mb"] is None
    print(
        f"\nMMDiT depth {args.depth}, {args.heads} heads x {args.head_dim} "
        f"({params / 1e6:.1f}M params, fp32, AdamW), {args.ranks} ranks, batch {args.batch}/rank, "
        f"{args.latent}x{args.latent} latents + 77 text tokens; median of {args.steps} steps "
        f"after {args.warmup} warm-up; memory: "
        + (
            "CUDA allocated (peak; held after the steps)"
            if gpu
            else "RSS growth over the pre-build RSS (peak; held after the steps, trimmed)"
        )
    )
    ref_time = measured["fsdp2"][0]["median_s"]
    ref_mem = [r["peak_mb"] if gpu else r["growth_mb"] for r in measured["fsdp2"]]
    ref_held = [r["held_mb"] for r in measured["fsdp2"]]
    header = f"{'backend':<8} {'step s':>7} {'x fsdp2':>7}"
    for rank in range(args.ranks):
        header += f" | r{rank} peak MB {'x fsdp2':>7} r{rank} held MB {'x fsdp2':>7}"
    print(header)
    for name, ranks in measured.items():
        line = f"{name:<8} {ranks[0]['median_s']:>7.3f} {ranks[0]['median_s'] / ref_time:>7.2f}"
        for r, ref, ref_h in zip(ranks, ref_mem, ref_held):
            mem = r["peak_mb"] if gpu else r["growth_mb"]
            line += f" | {mem:>10.0f} {mem / ref:>7.2f} {r['held_mb']:>10.0f} {r['held_mb'] / ref_h:>7.2f}"
        print(line)


if __name__ == "__main__":
    main()
