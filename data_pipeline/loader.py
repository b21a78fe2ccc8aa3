"""Resumable, bucketed loading of WebDataset shards (local or any fsspec URL).

Design: every rank computes the same *global* plan from the shard indexes, then reads
only its slice. For epoch e the plan is

1. shard order: a permutation of all shards seeded by (seed, e) (shard-level shuffle);
2. consecutive groups of ``shuffle_shards`` shards; the samples inside a group are
   permuted, seeded by (seed, e, group) (buffer-level shuffle: readers only ever touch
   the shards of a few groups at a time);
3. bucketing: samples flow, in that order, into per-bucket queues (bucket = nearest
   aspect ratio among the configured resolutions); a queue that holds its bucket's
   global batch size emits a global batch. Partial queues carry over into the next
   epoch, so no sample is dropped and the stream never ends.

Global batch b is split evenly over ranks, then into micro-batches. Because the plan
does not depend on the number of ranks, every rank gets exactly the same number of
batches (uneven shards cannot hang a collective), and the loader's whole position is
one number: global batches consumed. A run resumed on any number of ranks continues
with exactly the samples the interrupted run had not consumed.

Samples are fetched by byte range (offset and size from the shard index) in a pool of
threads that prefetches the next micro-batches; transient object-store errors are
retried with backoff; samples that fail to read or decode are logged with shard and key,
counted, and replaced by another sample of the same micro-batch (shapes stay fixed); the
run stops with an error naming the shards once more than ``max_corrupt_fraction`` of the
dataset has failed.

Audio clips (``kind: audio``) and videos (``kind: video``) decode in the same workers:
see :mod:`data_pipeline.audio` and :mod:`data_pipeline.video`.

Shapes: B micro-batch, C channels, H x W bucket resolution.
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np
import torch

from configlib import option
from data_pipeline.grid import save_grid
from data_pipeline.shards import ShardIndex, expand_urls, load_index, parse_sample, retry
from data_pipeline.sources import agreed_position
from data_pipeline.storage import storage_errors

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTS = ("flac", "wav")


class DataError(RuntimeError):
    """Data problems beyond the allowed bound (too many corrupt samples, no shards)."""


def find_shards(spec: str | list[str]) -> list[str]:
    """``data.urls`` expanded to shard URLs; a missing folder or an empty match is a
    DataError, a store the user must fix (credentials, endpoint, bucket) an InputError."""
    where = spec if isinstance(spec, str) else ",".join(spec)
    try:
        with storage_errors("data.urls", where):
            urls = expand_urls(spec)
    except FileNotFoundError as err:
        raise DataError(f"data.urls: {err}") from None
    if not urls:
        raise DataError(f"data.urls {spec} matched no shards")
    return urls


def shard_indexes(spec: str | list[str]) -> list[ShardIndex]:
    """The index of every shard ``data.urls`` names (read in parallel: object stores)."""
    urls = find_shards(spec)

    def load(url: str) -> ShardIndex:
        try:
            with storage_errors("data.urls", url):
                return load_index(url)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
            raise DataError(f"data.urls: shard {url}: {err}") from None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(load, urls))


@dataclass(kw_only=True)
class WebDatasetConfig:
    name: str = option("webdataset", "Data source.")
    urls: str | list[str] = option(
        doc="Shards: brace patterns (shard-{000000..000099}.tar), folders or s3:// prefixes."
    )
    kind: Literal["images", "latents", "audio", "video"] = option(
        "images",
        "Raw encoded images (decoded and resized here), precomputed latents/embeddings (npy "
        "members), audio clips (flac/wav, cropped to a window here) or videos (mp4, "
        "num_frames consecutive frames at the bucket resolution).",
    )
    resolutions: list[tuple[int, int]] = option(
        factory=lambda: [(32, 32)],
        doc="Bucket resolutions as [width, height]; each image goes to the nearest aspect ratio.",
    )
    bucket_batch_sizes: list[int] | None = option(
        None,
        "Global batch size per bucket (same order as resolutions); default: train.batch_size for every bucket.",
    )
    shuffle_shards: int = option(
        4, "Shards whose samples are shuffled together (buffer-level shuffle).", ge=1
    )
    num_workers: int = option(2, "Reader/decoder threads per rank.", ge=1)
    prefetch: int = option(4, "Micro-batches read ahead per rank.", ge=1)
    max_corrupt_fraction: float = option(
        0.01,
        "Stop when more than this fraction of the dataset's samples failed to read or decode.",
        ge=0,
        le=1,
    )
    caption_key: str = option("txt", "Member holding the caption.")
    keep_captions: bool = option(True, "Return captions (list of str) with each batch.")
    sample_rate: int = option(16000, "Audio: samples per second the model sees.", ge=1)
    resample: bool = option(
        False, "Audio: resample clips at another rate (else such a clip stops the run)."
    )
    audio_channels: Literal[1, 2] = option(
        1, "Audio: 1 (mono; stereo clips downmixed) or 2 (stereo; mono clips duplicated)."
    )
    window_seconds: float = option(
        2.0, "Audio: window per sample; longer clips are cropped at random, shorter padded.", gt=0
    )
    min_seconds: float = option(
        0.0, "Audio: clips shorter than this are skipped and counted as bad samples.", ge=0
    )
    num_frames: int = option(
        9, "Video: consecutive frames per sample (shorter clips are bad samples).", ge=1
    )
    fps: float | None = option(
        None,
        "Video: resample clips to this frame rate (the frame on screen at each 1/fps step); "
        "null: the clips' own frames.",
        gt=0,
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = []
        if not self.urls:
            out.append(("urls", "needs at least one shard pattern"))
        if self.bucket_batch_sizes is not None and len(self.bucket_batch_sizes) != len(
            self.resolutions
        ):
            out.append(
                (
                    "bucket_batch_sizes",
                    f"has {len(self.bucket_batch_sizes)} entries for {len(self.resolutions)} resolutions",
                )
            )
        for i, (w, h) in enumerate(self.resolutions):
            if w < 1 or h < 1:
                out.append((f"resolutions[{i}]", f"[{w}, {h}] must be positive"))
        if self.kind == "audio":
            for key in ("resolutions", "bucket_batch_sizes"):
                if key in given:
                    out.append((key, "has no effect for kind 'audio' (one window length)"))
            if self.min_seconds > self.window_seconds:
                out.append(("min_seconds", f"exceeds window_seconds ({self.window_seconds})"))
        for key in ("num_frames", "fps"):
            if self.kind != "video" and key in given:
                out.append((key, f"has no effect unless kind is 'video' (here {self.kind!r})"))
        if self.kind != "audio":
            for key in AUDIO_KEYS:
                if key in given:
                    out.append((key, f"has no effect unless kind is 'audio' (here {self.kind!r})"))
        return out


AUDIO_KEYS = ("sample_rate", "resample", "audio_channels", "window_seconds", "min_seconds")


# --------------------------------------------------------------------------- planning
class GlobalPlan:
    """The rank-independent sequence of global batches over infinite epochs."""

    def __init__(
        self,
        indexes: list[ShardIndex],
        resolutions: list[tuple[int, int]],
        batch_sizes: list[int],
        seed: int,
        shuffle_shards: int,
    ):
        self.indexes = indexes
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.batch_sizes = batch_sizes
        counts = np.array([len(ix.samples) for ix in indexes], dtype=np.int64)
        self.shard_start = np.concatenate([[0], np.cumsum(counts)])
        self.num_samples = int(self.shard_start[-1])
        if self.num_samples == 0:
            raise DataError("the shards hold no samples")
        log_aspects = np.log(np.array([w / h for w, h in resolutions]))
        bucket = np.zeros(self.num_samples, dtype=np.int64)
        i = 0
        for ix in indexes:
            for entry in ix.samples:
                w, h = entry.meta.get("width"), entry.meta.get("height")
                if w and h and len(resolutions) > 1:
                    bucket[i] = int(np.argmin(np.abs(log_aspects - math.log(w / h))))
                i += 1
        self.bucket = bucket

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 31337, epoch])
        shard_order = rng.permutation(len(self.indexes))
        parts = []
        for g in range(0, len(shard_order), self.shuffle_shards):
            group = shard_order[g : g + self.shuffle_shards]
            ids = np.concatenate(
                [np.arange(self.shard_start[s], self.shard_start[s + 1]) for s in group]
            )
            parts.append(np.random.default_rng([self.seed, 31337, epoch, g]).permutation(ids))
        return np.concatenate(parts)

    def batches(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (epoch, bucket, global sample ids) forever."""
        queues: list[list[int]] = [[] for _ in self.batch_sizes]
        epoch = 0
        while True:
            for sample in self.epoch_order(epoch).tolist():
                b = int(self.bucket[sample])
                queues[b].append(sample)
                if len(queues[b]) == self.batch_sizes[b]:
                    yield epoch, b, np.array(queues[b], dtype=np.int64)
                    queues[b] = []
            epoch += 1

    def locate(self, sample: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.shard_start, sample, side="right") - 1)
        return shard, sample - int(self.shard_start[shard])


# ---------------------------------------------------------------------------- reading
def decode_image(data: bytes, width: int, height: int) -> torch.Tensor:
    """Encoded image -> (3, height, width) float in [-1, 1], resized to cover, center-cropped."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        scale = max(width / image.width, height / image.height)
        new_size = (
            max(width, round(image.width * scale)),
            max(height, round(image.height * scale)),
        )
        image = image.resize(new_size, Image.BICUBIC)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
        array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def _npy(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


class ShardedSource:
    """What the shard-backed sources share: the shard indexes, this rank's place in the
    batch geometry, the step position (global batches done, micro-batch within the step)
    and the read-ahead thread pool. Subclasses build their plan in ``_setup``, read in
    ``next_batch`` and extend ``state_dict`` / ``load_state_dict``."""

    thread_name = "data"

    def __init__(
        self,
        cfg: Any,
        *,
        seed: int,
        rank: int,
        world_size: int,
        micro_batch: int,
        accum_steps: int,
    ):
        self.cfg = cfg
        self.indexes = shard_indexes(cfg.urls)
        self.rank, self.world_size = rank, world_size
        self.micro_batch, self.accum_steps = micro_batch, accum_steps
        self.batches_done = self.micro_index = 0
        self._setup(seed)
        self._pool = ThreadPoolExecutor(
            max_workers=cfg.num_workers, thread_name_prefix=self.thread_name
        )

    def _setup(self, seed: int) -> None:
        """The subclass's plan and reading state, from ``self.cfg`` and ``self.indexes``;
        runs before the pool starts, so a config error leaves no threads behind."""
        raise NotImplementedError

    def _advance(self) -> bool:
        """Count one consumed micro-batch; True when it completed a global batch."""
        self.micro_index += 1
        if self.micro_index < self.accum_steps:
            return False
        self.micro_index = 0
        self.batches_done += 1
        return True

    def _restore_position(self, states: list[dict[str, Any]]) -> None:
        self.batches_done, self.micro_index = agreed_position(states), 0

    def state_dict(self) -> dict[str, Any]:
        return {"batches_done": self.batches_done, "micro_index": self.micro_index}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class WebDatasetSource(ShardedSource):
    """Data source for the trainer over WebDataset shards (see module docstring)."""

    cfg: WebDatasetConfig

    def _setup(self, seed: int) -> None:
        cfg, world_size, accum_steps = self.cfg, self.world_size, self.accum_steps
        default = self.micro_batch * accum_steps * world_size
        self.batch_sizes = list(cfg.bucket_batch_sizes or [default] * len(cfg.resolutions))
        for size in self.batch_sizes:
            if size % (world_size * accum_steps):
                raise DataError(
                    f"data.bucket_batch_sizes: {size} is not divisible by ranks x accumulation ({world_size} x {accum_steps})"
                )
        self.plan = GlobalPlan(
            self.indexes, list(cfg.resolutions), self.batch_sizes, seed, cfg.shuffle_shards
        )
        self.corrupt: Counter = Counter()  # shard url -> failed samples
        self.last_global_batch = default
        self._local = threading.local()
        self._queue: deque[tuple[int, int, Future]] = deque()  # (batch number, micro index, future)
        self._plan_iter: Iterator | None = None
        self._planned = 0  # global batches taken from the plan iterator
        self._pending_micro: deque[tuple[int, int, int, int, np.ndarray]] = deque()

    # ------------------------------------------------------------------- planning
    def _start(self) -> None:
        self._plan_iter = self.plan.batches()
        for _ in range(self.batches_done):  # replay: index arithmetic only, no reads
            next(self._plan_iter)
        self._planned = self.batches_done
        self._pending_micro.clear()
        self._queue.clear()

    def _plan_more(self) -> None:
        epoch, bucket, ids = next(self._plan_iter)
        per_rank = len(ids) // self.world_size
        mine = ids[self.rank * per_rank : (self.rank + 1) * per_rank]
        micro = per_rank // self.accum_steps
        for m in range(self.accum_steps):
            self._pending_micro.append(
                (self._planned, m, epoch, bucket, mine[m * micro : (m + 1) * micro])
            )
        self._planned += 1

    def _fill(self) -> None:
        while len(self._queue) < self.cfg.prefetch:
            if not self._pending_micro:
                self._plan_more()
            number, m, epoch, bucket, ids = self._pending_micro.popleft()
            future = self._pool.submit(self._load_micro_batch, epoch, bucket, ids)
            self._queue.append((number, m, future))

    # -------------------------------------------------------------------- reading
    def _read_bytes(self, shard: int, offset: int, size: int) -> bytes:
        url = self.indexes[shard].url
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}

        def read() -> bytes:
            fh = handles.get(url)
            if fh is None:
                fh = handles[url] = fsspec.open(url, "rb").open()
                if len(handles) > 16:  # keep few open files per thread
                    oldest = next(iter(handles))
                    handles.pop(oldest).close()
            fh.seek(offset)
            data = fh.read(size)
            if len(data) != size:
                raise EOFError(f"short read ({len(data)} of {size} bytes): shard truncated")
            return data

        try:
            return retry(read, what=f"reading {url}")
        except Exception:
            stale = handles.pop(url, None)
            if stale is not None:
                stale.close()
            raise

    def _load_sample(self, sample: int, bucket: int, epoch: int | None) -> dict[str, Any]:
        """One sample; ``epoch`` None: the evaluation view (an audio window from the start)."""
        shard, position = self.plan.locate(sample)
        entry = self.indexes[shard].samples[position]
        fields = parse_sample(self._read_bytes(shard, entry.offset, entry.size))
        out: dict[str, Any] = {"key": entry.key, "index": sample}
        if self.cfg.kind == "audio":
            out.update(self._load_audio(fields, sample, epoch))
        elif self.cfg.kind == "video":
            from data_pipeline.video import decode_video

            width, height = self.cfg.resolutions[bucket]
            rng = (
                None
                if epoch is None
                else np.random.default_rng([self.plan.seed, 11, epoch, sample])
            )
            out["x"] = decode_video(
                fields,
                frames=self.cfg.num_frames,
                width=width,
                height=height,
                rng=rng,
                fps=self.cfg.fps,
            )
        elif self.cfg.kind == "images":
            image_ext = next((e for e in IMAGE_EXTS if e in fields), None)
            if image_ext is None:
                raise ValueError(f"no image member (one of {IMAGE_EXTS})")
            width, height = self.cfg.resolutions[bucket]
            out["x"] = decode_image(fields[image_ext], width, height)
        else:
            if "latent.npy" not in fields:
                raise ValueError("no latent.npy member (was precompute run on these shards?)")
            out["x"] = _npy(fields["latent.npy"]).float()
            for ext, value in fields.items():
                if ext.endswith(".npy") and ext != "latent.npy":
                    out[ext[: -len(".npy")]] = _npy(value)
        if self.cfg.keep_captions:
            if self.cfg.caption_key not in fields:
                raise ValueError(f"missing caption member .{self.cfg.caption_key}")
            out["caption"] = fields[self.cfg.caption_key].decode("utf-8")
        if "cls" in fields:
            out["label"] = int(fields["cls"])
        return out

    def _load_audio(self, fields: dict, sample: int, epoch: int | None) -> dict[str, Any]:
        from data_pipeline.audio import decode_audio, window

        cfg = self.cfg
        ext = next((e for e in AUDIO_EXTS if e in fields), None)
        if ext is None:
            raise ValueError(f"no audio member (one of {AUDIO_EXTS})")
        wave = decode_audio(
            fields[ext], rate=cfg.sample_rate, channels=cfg.audio_channels, resample=cfg.resample
        )
        rng = None if epoch is None else np.random.default_rng([self.plan.seed, 7, epoch, sample])
        return window(
            wave, rate=cfg.sample_rate, seconds=cfg.window_seconds,
            min_seconds=cfg.min_seconds, rng=rng,
        )  # fmt: skip

    def _load_micro_batch(self, epoch: int | None, bucket: int, ids: np.ndarray) -> dict[str, Any]:
        from data_pipeline.audio import AudioError

        samples, failed = [], []
        for sample in ids.tolist():
            try:
                samples.append(self._load_sample(sample, bucket, epoch))
            except AudioError as err:
                if "data.sample_rate" in str(err):  # the recipe's choice, not a bad sample
                    shard, _ = self.plan.locate(sample)
                    raise DataError(f"{self.indexes[shard].url}: {err}") from None
                shard, position = self.plan.locate(sample)
                url, key = self.indexes[shard].url, self.indexes[shard].samples[position].key
                log.warning("skipping sample %s of %s: %s", key, url, err)
                failed.append(url)
            except Exception as err:  # any read/decode failure of one sample: skip it
                shard, position = self.plan.locate(sample)
                url, key = self.indexes[shard].url, self.indexes[shard].samples[position].key
                log.warning("skipping sample %s of %s: %s", key, url, err)
                failed.append(url)
        if not samples:
            raise DataError(
                f"every sample of a batch failed to load (shards: {sorted(set(failed))})"
            )
        replacements = [samples[i % len(samples)] for i in range(len(failed))]
        batch = collate(samples + replacements)
        batch["epoch"] = epoch
        batch["failed"] = failed
        return batch

    # -------------------------------------------------------------- DataSource API
    def next_batch(self) -> dict[str, Any]:
        if self._plan_iter is None:
            self._start()
        self._fill()
        number, m, future = self._queue.popleft()
        assert (number, m) == (self.batches_done, self.micro_index), "prefetch order broke"
        batch = future.result()
        for url in batch.pop("failed"):
            self.corrupt[url] += 1
        total = sum(self.corrupt.values())
        if total > self.cfg.max_corrupt_fraction * self.plan.num_samples:
            worst = ", ".join(f"{u} ({n})" for u, n in self.corrupt.most_common(5))
            raise DataError(
                f"{total} samples failed to read or decode, more than data.max_corrupt_fraction="
                f"{self.cfg.max_corrupt_fraction} of {self.plan.num_samples}; worst shards: {worst}"
            )
        self.last_global_batch = len(batch["index"]) * self.world_size * self.accum_steps
        self._advance()
        self._fill()
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "corrupt": dict(self.corrupt)}

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        self._restore_position(states)
        self.corrupt = Counter()
        for state in states:
            self.corrupt.update(state.get("corrupt", {}))
        self._plan_iter = None

    # ---------------------------------------------------------------- evaluation
    def sample_shape(self) -> tuple[int, ...]:
        if self.cfg.kind == "images":
            width, height = self.cfg.resolutions[0]
            return (3, height, width)
        if self.cfg.kind == "audio":
            return (self.cfg.audio_channels, round(self.cfg.window_seconds * self.cfg.sample_rate))
        if self.cfg.kind == "video":
            width, height = self.cfg.resolutions[0]
            return (3, self.cfg.num_frames, height, width)
        shard, position = 0, 0
        entry = self.indexes[shard].samples[position]
        fields = parse_sample(self._read_bytes(shard, entry.offset, entry.size))
        return tuple(_npy(fields["latent.npy"]).shape)

    def eval_images(self, count: int) -> torch.Tensor:
        """The first ``count`` images of the dataset (B, 3, H, W) in [-1, 1], at the first
        resolution: a fixed set, the same at every evaluation and on every rank."""
        if self.cfg.kind != "images":
            raise ValueError("eval_images needs data.kind 'images' (these shards hold latents)")
        count = min(count, self.plan.num_samples)
        return self._load_micro_batch(None, 0, np.arange(count))["x"]

    def eval_videos(self, count: int) -> torch.Tensor:
        """The first ``count`` clips (B, 3, T, H, W) in [-1, 1], their first frames at the
        first resolution: a fixed set, the same at every evaluation and on every rank."""
        if self.cfg.kind != "video":
            raise ValueError(f"eval_videos needs data.kind 'video' (not {self.cfg.kind!r})")
        count = min(count, self.plan.num_samples)
        return self._load_micro_batch(None, 0, np.arange(count))["x"]

    def eval_audio(self, count: int) -> dict[str, Any]:
        """The first ``count`` clips as a batch (``x``, ``mask``, timing), windows from
        each clip's start: a fixed set, the same at every evaluation and on every rank."""
        if self.cfg.kind != "audio":
            raise ValueError(f"eval_audio needs data.kind 'audio' (not {self.cfg.kind!r})")
        count = min(count, self.plan.num_samples)
        return self._load_micro_batch(None, 0, np.arange(count))

    def eval_prompts(self, count: int) -> list[str]:
        """``count`` prompts for evaluation samples: the dataset's distinct captions among
        its first samples (sorted, cycled), read once and cached."""
        if getattr(self, "_eval_captions", None) is None:
            captions: set[str] = set()
            for shard, index in enumerate(self.indexes[:4]):
                for entry in index.samples[:256]:
                    try:
                        fields = parse_sample(self._read_bytes(shard, entry.offset, entry.size))
                        captions.add(fields[self.cfg.caption_key].decode("utf-8"))
                    except Exception:  # noqa: BLE001 - a corrupt sample just gives no prompt
                        continue
            if not captions:
                raise DataError("no captions found for evaluation prompts")
            self._eval_captions = sorted(captions)
        return [self._eval_captions[i % len(self._eval_captions)] for i in range(count)]

    def eval_conditions(self, count: int, *, prompts: bool) -> dict[str, Any]:
        """What ``count`` evaluation samples are generated for: ``prompts`` (when asked)
        and, for audio, each clip's timing. Audio takes the first clips' captions and
        durations (requested from second 0: the window a clip of that length would give);
        other kinds take :meth:`eval_prompts`."""
        if self.cfg.kind != "audio":
            return {"prompts": self.eval_prompts(count)} if prompts else {}
        batch = self.eval_audio(count)
        rows = [i % len(batch["index"]) for i in range(count)]
        out: dict[str, Any] = {
            "seconds_start": torch.zeros(count),
            "seconds_total": batch["seconds_total"][rows].clamp(max=self.cfg.window_seconds),
        }
        if prompts:
            if "caption" not in batch:
                raise DataError("no captions found for evaluation prompts")
            out["prompts"] = [batch["caption"][i] for i in rows]
        return out

    def evaluate_samples(
        self,
        samples: np.ndarray,
        out_dir: Path | None,
        step: int,
        conditions: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        """Write what was generated: a grid of images; for video an mp4 per clip and one
        PNG of their frames, a clip per row; for audio a wav per clip and one PNG of their
        spectrograms labelled with prompt and length. Audio prompted with the built-in
        tones' captions is scored (:func:`data_pipeline.audio.judge_tones`)."""
        if self.cfg.kind == "audio":
            return self._evaluate_audio(samples, out_dir, step, conditions or {})
        if out_dir is not None and self.cfg.kind == "video":
            from data_pipeline.video import write_video_samples

            prompts = (conditions or {}).get("prompts")
            write_video_samples(samples, out_dir, f"samples_step{step:08d}", prompts=prompts)
        if out_dir is not None and self.cfg.kind == "images":
            out_dir.mkdir(parents=True, exist_ok=True)
            save_grid(samples, out_dir / f"samples_step{step:08d}.png")
        return {"eval/pixel_mean": float(samples.mean()), "eval/pixel_std": float(samples.std())}

    def _evaluate_audio(
        self, samples: np.ndarray, out_dir: Path | None, step: int, conditions: dict[str, Any]
    ) -> dict[str, float]:
        from data_pipeline.audio import judge_tones, write_audio_samples

        rate = self.cfg.sample_rate
        metrics = {"eval/rms": float(np.sqrt(np.mean(samples**2)))}
        prompts, seconds = conditions.get("prompts"), conditions.get("seconds_total")
        if prompts is not None and seconds is not None:
            scores = judge_tones(samples, rate, prompts, np.asarray(seconds))
            metrics.update({f"eval/{k}": v for k, v in scores.items()})
        if out_dir is not None:
            write_audio_samples(
                samples, rate, out_dir, f"samples_step{step:08d}", prompts,
                None if seconds is None else np.asarray(seconds),
            )  # fmt: skip
        return metrics


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif key in ("index", "label"):
            batch[key] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[key] = values
    return batch


def describe(urls: list[str]) -> str:
    return json.dumps(urls[:3] + (["..."] if len(urls) > 3 else []))
