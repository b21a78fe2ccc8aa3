"""Loader throughput: our resumable, bucketed WebDatasetSource against a plain
``webdataset.WebDataset`` pipeline over the same shards, side by side in one run.

Two shard sets are measured:

* raw images: PNG digits upscaled to ``--size`` (decode + resize + to-tensor per sample);
* precomputed: ``latent.npy`` arrays (what training reads after data_pipeline.precompute).

Both pipelines do the same per-sample work (the same ``decode_image`` / ``np.load``) and
batch to the same size, on one decode thread, so the ratio isolates our overhead:
planning, byte-range reads, resumable state, bucketing. Goal: ours within 10% of plain
(ratio >= 0.90). Figures are samples/s per CPU core (one core each).

    python benchmarks/loader_bench.py [--size 64] [--samples 1797] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_raw(dest: Path, size: int, limit: int) -> str:
    from data_pipeline.build import main as build_main

    build_main(
        [
            "builtin:digits",
            "--out",
            str(dest),
            "--size",
            str(size),
            "--shard-size",
            "256",
            "--limit",
            str(limit),
        ]
    )
    return str(dest)


def build_latents(dest: Path, size: int, limit: int) -> str:
    from data_pipeline.shards import ShardWriter

    rng = np.random.default_rng(0)
    with ShardWriter(str(dest), max_samples=256) as writer:
        for i in range(limit):
            buf = io.BytesIO()
            np.save(buf, rng.standard_normal((4, size // 8, size // 8)).astype(np.float16))
            writer.write(
                f"{i:06d}",
                {"latent.npy": buf.getvalue(), "txt": b"a caption"},
                {"width": size, "height": size},
            )
    return str(dest)


def run_ours(urls: str, kind: str, size: int, batch: int, samples: int) -> float:
    from data_pipeline.loader import WebDatasetConfig, WebDatasetSource

    cfg = WebDatasetConfig(
        urls=urls,
        kind=kind,
        resolutions=[(size, size)],
        num_workers=1,
        prefetch=4,
        shuffle_shards=4,
    )
    source = WebDatasetSource(cfg, seed=0, rank=0, world_size=1, micro_batch=batch, accum_steps=1)
    source.next_batch()  # warm-up: open files, start the thread
    start = time.perf_counter()
    seen = 0
    while seen < samples:
        seen += len(source.next_batch()["index"])
    elapsed = time.perf_counter() - start
    source.close()
    return seen / elapsed


def run_plain(urls: str, kind: str, size: int, batch: int, samples: int) -> float:
    import webdataset as wds

    from data_pipeline.loader import decode_image
    from data_pipeline.shards import expand_urls

    def decode(sample: dict) -> dict:
        if kind == "images":
            x = decode_image(sample["png"], size, size)
        else:
            x = torch.from_numpy(
                np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)
            ).float()
        return {"x": x, "caption": sample["txt"].decode()}

    pipeline = (
        wds.WebDataset(expand_urls(urls), shardshuffle=False, empty_check=False)
        .repeat()
        .map(decode)
    )
    iterator = iter(pipeline)

    def next_batch() -> dict:
        items = [next(iterator) for _ in range(batch)]
        return {"x": torch.stack([s["x"] for s in items]), "caption": [s["caption"] for s in items]}

    next_batch()
    start = time.perf_counter()
    seen = 0
    while seen < samples:
        seen += len(next_batch()["caption"])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument(
        "--samples", type=int, default=1797, help="samples per dataset (digits has 1797)"
    )
    parser.add_argument("--measure", type=int, default=1500, help="samples read per timing")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        sets = {
            "images": build_raw(Path(tmp) / "raw", args.size, args.samples),
            "latents": build_latents(Path(tmp) / "lat", args.size, args.samples),
        }
        print(
            f"{args.samples} samples per set, {args.size}px images / {args.size // 8}x{args.size // 8}x4 latents, "
            f"batch {args.batch}, {args.repeats} alternating rounds, one decode thread each\n"
        )
        print(
            f"{'shards':<10}{'plain wds samples/s':>22}{'ours samples/s':>18}{'ours / plain':>15}"
        )
        for kind, urls in sets.items():
            plain, ours = [], []
            for _ in range(args.repeats):  # alternate so machine noise hits both alike
                plain.append(run_plain(urls, kind, args.size, args.batch, args.measure))
                ours.append(run_ours(urls, kind, args.size, args.batch, args.measure))
            p, o = statistics.median(plain), statistics.median(ours)
            verdict = "PASS" if o / p >= 0.90 else "MISS"
            print(f"{kind:<10}{p:>22.0f}{o:>18.0f}{o / p:>15.2f}  goal >= 0.90: {verdict}")


if __name__ == "__main__":
    main()
