"""Checkpoint cost: trainer.checkpoint.CheckpointManager (DCP) against plain torch.save/load.

What is measured, side by side in one process, on the state a real checkpoint holds
(flow_mlp built like the trainer builds it: meta device, FSDP2 on a 1-rank CPU mesh,
materialised and initialised; AdamW after one step so both moments exist; an EMA):

- ``torch.save`` of the same tensors made plain and local, to one file in the same
  directory, and ``torch.load`` of it: the reference. ``torch.save`` does not fsync,
  while DCP's FileSystemWriter does, so the fsync is timed separately as well.
- ``CheckpointManager.save(blocking=True)``: what a synchronous save costs training.
- ``CheckpointManager(async_save=True).save(blocking=False)``: the time until it returns
  control (what the training loop waits), and the time until ``wait()`` says the
  checkpoint is complete.
- ``CheckpointManager.load(step, state)``: in-place restore, as ``Trainer.maybe_resume``.
- Building the DCP state dicts (``get_model_state_dict`` / ``get_optimizer_state_dict``),
  which ``Trainer.save`` does before every save on top of the manager's own time.
- A breakdown of the async blocking part, to show where it goes: DCP's staging copy (what
  ``async_save`` does before it returns under the manager), DCP's ``DefaultStager`` kept
  alive so its buffers are reused (what the manager could do instead), allocating and
  copying plain tensors, and copying into buffers allocated once (the memcpy floor).

Every save and load is checked: the manager's checkpoints must be marked complete, and
both loads must give back bit-identical tensors (the live state is wiped before the
in-place DCP load). Peak memory is about five times the state (live state, reference
load, staging copies, the probe's two persistent buffers): ~8 GB at the 100m preset.

Each figure is the median of ``--repeats`` rounds; every round runs every measurement,
interleaved, so a noisy machine affects them alike; before each one garbage is collected
and dirty pages are flushed (``os.sync``), untimed. The load average is printed before
and after, since other work on the machine shows up here. The goal for asynchronous saving is
that training waits less than 20% of a synchronous save.

The OS page cache is not dropped (that needs root): the files just written are still in
memory when they are read back, for DCP and torch.load alike, so load figures are
memory-speed reads, not disk reads. Write figures include the write-back the kernel does
inside the timed region (all of it for the fsynced rows).

Usage: python benchmarks/checkpoint_bench.py [--preset 100m] [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from models import flow_mlp
from models.common.parallelize import ParallelPlan
from trainer.checkpoint import CheckpointManager, CheckpointStore, dcp_writer, step_dir_name
from trainer.config import OptimizerConfig
from trainer.ema import EMA
from trainer.loop import make_optimizer

ASYNC_GOAL = 0.20  # async blocking time as a fraction of a synchronous save


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--preset", default="100m", choices=sorted(flow_mlp.PRESETS))
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument(
        "--dir",
        default=None,
        help="parent directory for the checkpoints (a fresh subdirectory is made and removed); "
        "default: the system temp dir",
    )
    parser.add_argument("--no-ema", action="store_true", help="leave the EMA out of the state")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


# ----------------------------------------------------------------------------- state
def build_training_state(preset: str, with_ema: bool) -> tuple[nn.Module, Any, EMA | None]:
    """Model, optimizer (after one step) and EMA, built the way trainer.loop builds them."""
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device("cpu")
    mesh = init_device_mesh("cpu", (1,))
    cfg = flow_mlp.FlowMLPConfig(size=preset)
    with torch.device("meta"):
        model = flow_mlp.build(cfg)
    model = flow_mlp.parallelize(model, ParallelPlan(backend="fsdp2"), mesh)
    model.to_empty(device=device)
    model.init_weights(0)
    optimizer = make_optimizer(model.parameters(), OptimizerConfig(), device)
    ema = EMA(model, 0.999) if with_ema else None

    generator = torch.Generator().manual_seed(0)
    x_BD = torch.randn(64, cfg.data_dim, generator=generator)
    t_B = torch.rand(64, generator=generator)
    target_BD = torch.randn(64, cfg.data_dim, generator=generator)
    loss = torch.nn.functional.mse_loss(model(x_BD, t_B), target_BD)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()
    return model, optimizer, ema


def dcp_state(model: nn.Module, optimizer: Any, ema: EMA | None) -> dict[str, Any]:
    """The dict Trainer.dcp_state hands to the manager (one model, one optimizer)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state: dict[str, Any] = {
        "model": get_model_state_dict(model),
        "optim": {"model": get_optimizer_state_dict(model, optimizer)},
    }
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def plain_local(obj: Any) -> Any:
    """The same structure with every DTensor replaced by its local tensor (no copy)."""
    if isinstance(obj, dict):
        return {key: plain_local(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_local(value) for value in obj)
    if hasattr(obj, "to_local"):
        return obj.to_local()
    return obj


def tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nested state, local, in a fixed order."""
    if isinstance(obj, dict):
        return [t for key in sorted(obj, key=str) for t in tensors(obj[key])]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in tensors(value)]
    if isinstance(obj, torch.Tensor):
        return [obj.to_local() if hasattr(obj, "to_local") else obj]
    return []


def checksums(obj: Any) -> list[float]:
    return [float(t.double().sum()) for t in tensors(obj)]


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Seconds ``fn(*args, **kwargs)`` took, and what it returned."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


# ------------------------------------------------------------------------- measuring
def settle() -> None:
    """Free garbage and flush dirty pages so one phase's write-back does not land in the next."""
    gc.collect()
    os.sync()


class Progress:
    """A tqdm bar over phases: starting the next phase settles and completes the one before."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, unit="phase", file=sys.stderr)
        self.running = False

    def phase(self, label: str) -> None:
        settle()
        if self.running:
            self.bar.update()
        self.running = True
        self.bar.set_description(label)

    def close(self) -> None:
        if self.running:
            self.bar.update()
        self.bar.close()


def torch_save_fsync(obj: Any, path: Path) -> tuple[float, float]:
    """Seconds of torch.save into an open file, then of flushing and fsyncing it."""
    with open(path, "wb") as fh:
        save_s, _ = timed(torch.save, obj, fh)

        def sync() -> None:
            fh.flush()
            os.fsync(fh.fileno())

        fsync_s, _ = timed(sync)
    return save_s, fsync_s


class StagingProbe:
    """Times the parts of async_save's blocking copy, and what a cached stager would pay."""

    def __init__(self, state: dict[str, Any]):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.state = state
        self.sources = tensors(state)
        self.buffers = [torch.empty_like(t) for t in self.sources]
        # DCP's own stager that keeps its CPU buffers from one save to the next; pinned
        # memory and non-blocking copies need CUDA (pinning raises without a driver).
        cuda = torch.cuda.is_available()
        self.cached = DefaultStager(
            StagingOptions(
                use_pinned_memory=cuda,
                use_shared_memory=False,
                use_async_staging=False,
                use_non_blocking_copy=cuda,
            )
        )
        self.cached.stage(state)  # allocates the buffers once; later stages only copy

    def measure(self) -> dict[str, float]:
        out: dict[str, float] = {}
        # What dcp.async_save does before it returns under CheckpointManager: the
        # FileSystemWriter is a BlockingAsyncStager with cache_staged_state_dict=False,
        # so each save copies the whole state into freshly allocated CPU memory.
        with tempfile.TemporaryDirectory() as tmp:
            writer = dcp_writer(CheckpointStore(tmp), 0)
            out["dcp_stage"], staged = timed(writer.stage, self.state)
            del staged
        settle()
        out["cached_stage"], staged = timed(self.cached.stage, self.state)
        del staged
        settle()
        out["alloc_copy"], fresh = timed(
            lambda: [torch.empty_like(t).copy_(t) for t in self.sources]
        )
        del fresh
        settle()
        out["prealloc_copy"], _ = timed(torch._foreach_copy_, self.buffers, self.sources)
        return out

    def close(self) -> None:
        self.cached.close()


def run(args: argparse.Namespace) -> None:
    parent = args.dir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="checkpoint_bench_", dir=parent))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        load_before = os.getloadavg()[0]
        print(f"building flow_mlp preset {args.preset!r} (FSDP2, 1-rank CPU mesh) ...", flush=True)
        model, optimizer, ema = build_training_state(args.preset, not args.no_ema)
        num_params = sum(p.numel() for p in model.parameters())
        # State dicts share storage with the live model, optimizer and EMA, so one is
        # reused for every save and load (Trainer.save builds a new one each time: timed).
        state = dcp_state(model, optimizer, ema)
        reference = checksums(state)
        probe = StagingProbe(state)
        trainer_state = {"counters": {"step": 1, "samples": 64}, "world_size": 1}
        rank_state = {"rng": torch.get_rng_state()}
        sync_mgr = CheckpointManager(
            str(root / "dcp_sync"), rank=0, world_size=1, keep_last=0, async_save=False
        )
        async_mgr = CheckpointManager(
            str(root / "dcp_async"), rank=0, world_size=1, keep_last=0, async_save=True
        )
        plain_file = root / "reference.pt"
        times: dict[str, list[float]] = {}
        sizes: dict[str, int] = {}

        def record(name: str, seconds: float) -> None:
            times.setdefault(name, []).append(seconds)

        def verify(what: str, loaded: Any) -> None:
            if checksums(loaded) != reference:
                raise RuntimeError(f"{what} did not restore the saved values")

        phases_per_round = 7
        progress = Progress(args.repeats * phases_per_round)
        for repeat in range(args.repeats):
            step = repeat + 1  # one step directory per save
            label = f"round {repeat + 1}/{args.repeats}: "

            progress.phase(label + "state dict")
            seconds, _ = timed(dcp_state, model, optimizer, ema)
            record("state_dict", seconds)

            progress.phase(label + "torch.save")
            plain = plain_local(state)
            save_s, fsync_s = torch_save_fsync(plain, plain_file)
            record("torch_save", save_s)
            record("torch_save_fsync", save_s + fsync_s)
            sizes["torch.save"] = tree_bytes(plain_file)
            del plain

            progress.phase(label + "torch.load")
            seconds, loaded = timed(torch.load, plain_file, map_location="cpu")
            record("torch_load", seconds)
            verify("torch.load", loaded)
            del loaded
            plain_file.unlink()

            progress.phase(label + "sync save")
            seconds, _ = timed(sync_mgr.save, step, state, trainer_state, rank_state, blocking=True)
            record("sync_save", seconds)
            sizes["DCP"] = tree_bytes(root / "dcp_sync" / step_dir_name(step))

            progress.phase(label + "load")
            with torch.no_grad():  # loads are in place: wipe first so a no-op load shows
                for tensor in tensors(state):
                    tensor.zero_()
            seconds, _ = timed(sync_mgr.load, step, state)
            record("dcp_load", seconds)
            verify("CheckpointManager.load", state)
            sync_mgr.store.remove_step(step)

            progress.phase(label + "async save")
            blocking_s, _ = timed(
                async_mgr.save, step, state, trainer_state, rank_state, blocking=False
            )
            wait_s, _ = timed(async_mgr.wait)
            record("async_blocking", blocking_s)
            record("async_wait", wait_s)
            record("async_total", blocking_s + wait_s)
            if not async_mgr.store.is_complete(step):
                raise RuntimeError(f"async checkpoint of step {step} is not marked complete")
            async_mgr.store.remove_step(step)

            progress.phase(label + "staging breakdown")
            for name, seconds in probe.measure().items():
                record(name, seconds)
        progress.close()
        probe.close()
        loads = (load_before, os.getloadavg()[0])
        report(args, num_params, sizes, times, loads)
    finally:
        dist.destroy_process_group()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- report
def report(
    args: argparse.Namespace,
    num_params: int,
    sizes: dict[str, int],
    times: dict[str, list[float]],
    loads: tuple[float, float],
) -> None:
    med = {name: statistics.median(values) for name, values in times.items()}
    state_desc = "model + AdamW" + ("" if args.no_ema else " + EMA")
    print()
    print(
        f"flow_mlp preset {args.preset}: {num_params / 1e6:.1f}M params, state {state_desc}, "
        f"fp32, {args.repeats} round(s), torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(f"checkpoint bytes: DCP {sizes['DCP']:,}  torch.save {sizes['torch.save']:,}")
    print(f"1-minute load average: {loads[0]:.2f} before, {loads[1]:.2f} after")
    print()
    rows = [
        ("torch.save (reference)", "torch_save"),
        ("torch.save + fsync", "torch_save_fsync"),
        ("torch.load (reference)", "torch_load"),
        ("state-dict build (Trainer.dcp_state)", "state_dict"),
        ("DCP sync save, blocking", "sync_save"),
        ("DCP async save, blocking", "async_blocking"),
        ("DCP async save, wait() after it", "async_wait"),
        ("DCP async save, until complete", "async_total"),
        ("DCP load (in place)", "dcp_load"),
        ("async blocking part, split up:", None),
        ("  DCP staging copy (writer.stage)", "dcp_stage"),
        ("  DCP DefaultStager, cached buffers", "cached_stage"),
        ("  alloc + copy, plain tensors", "alloc_copy"),
        ("  copy into preallocated buffers", "prealloc_copy"),
    ]
    print(f"{'':40s}{'median s':>10s}{'min s':>10s}{'max s':>10s}")
    for label, key in rows:
        if key is None:
            print(label)
            continue
        values = times[key]
        print(f"{label:40s}{med[key]:10.3f}{min(values):10.3f}{max(values):10.3f}")
    print()
    goal = med["async_blocking"] / med["sync_save"]
    verdict = "PASS" if goal < ASYNC_GOAL else "MISS"
    ratios = [
        ("sync_save / torch.save", med["sync_save"] / med["torch_save"], ""),
        ("sync_save / (torch.save + fsync)", med["sync_save"] / med["torch_save_fsync"], ""),
        ("async_blocking / torch.save", med["async_blocking"] / med["torch_save"], ""),
        ("async_blocking / sync_save", goal, f"goal < {ASYNC_GOAL:.2f}: {verdict}"),
        ("load / torch.load", med["dcp_load"] / med["torch_load"], ""),
        ("dcp_stage / async_blocking", med["dcp_stage"] / med["async_blocking"], ""),
        ("cached_stage / sync_save", med["cached_stage"] / med["sync_save"], "if cached"),
        ("prealloc_copy / sync_save", med["prealloc_copy"] / med["sync_save"], "copy floor"),
    ]
    print("ratios of medians")
    for label, value, note in ratios:
        print(f"  {label:38s}{value:8.3f}  {note}".rstrip())


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
