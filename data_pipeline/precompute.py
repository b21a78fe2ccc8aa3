"""``python -m data_pipeline.precompute``: run the frozen encoders over shards once, so
training can skip them.

::

    python -m data_pipeline.precompute --in SHARDS [--in MORE ...] --out DEST \\
        --encoders SPEC.yaml [--address RAY_ADDRESS] [--num-workers N] \\
        [--gpus-per-worker G] [--batch-size B] [--limit-shards K]

``--in`` takes brace patterns, folders or ``s3://`` prefixes (as the loader's ``urls``);
``--out`` a folder or fsspec URL. SPEC.yaml (see ``recipes/precompute/``) is a
:class:`PrecomputeSpec`: the resolution images are decoded to, the autoencoder, the T5
and CLIP text encoders, and the dtype of the stored arrays.

Every input shard becomes one output shard with the *same file name* under DEST, holding
each sample's original members plus (see :mod:`data_pipeline.shards`)::

    latent.npy       (C, h, w)  normalised autoencoder latent of the decoded image
    t5.npy           (L, D)     T5 sequence;  t5_mask.npy (L,) bool, True on real tokens
    clip.npy         (L, D)     CLIP sequence; clip_pooled.npy (P,) pooled embedding

A recipe reads them with ``data.kind: latents``. Samples whose image or caption cannot be
read are skipped, counted and reported per shard; a shard none of whose samples decode is
reported as failed and not written.

Work unit = one shard. Shards are published like :class:`~data_pipeline.shards.ShardWriter`
publishes them: built in a local temporary file, moved or PUT whole, index last. A shard
whose output index exists is complete and skipped, so a run is idempotent and an
interrupted run resumes where it stopped (a shard caught mid-upload has no index and is
redone). ``DEST/precompute.json`` records the spec of the first run; a later run into the
same DEST with another spec is refused rather than mixing embeddings of two encoders.

Parallelism: Ray. With ``--address`` the run joins that cluster (the framework must be
importable on its nodes, e.g. through ``ray job submit --working-dir``); without it a
local instance is started with ``--num-workers`` CPUs. Each worker is an actor that
builds the encoders once and then encodes whole shards in batches of ``--batch-size``,
on its GPU when ``--gpus-per-worker`` gives it one. The driver shows a progress bar over
shards and ends with a summary line. Exit status: 0 done, 1 some shards failed (rerun to
retry them), 2 user mistake (``error: ...`` naming what and where).

Shapes: B batch, C latent channels, h x w latent size, L tokens, D encoder width.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import posixpath
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from configlib import ConfigError, from_dict, load_yaml_with_bases, option, to_dict
from data_pipeline.loader import IMAGE_EXTS, decode_image
from data_pipeline.shards import (
    INDEX_SUFFIX,
    SampleEntry,
    ShardIndex,
    _tar_add,
    expand_urls,
    load_index,
    parse_sample,
    put_atomic,
    retry,
    write_text_atomic,
)
from data_pipeline.text_encoders import ClipTextEncoderConfig, T5EncoderConfig
from models.autoencoder import IdentityAutoencoderConfig
from models.autoencoders import AutoencoderSection

log = logging.getLogger(__name__)

MANIFEST = "precompute.json"
# members this tool writes; an input that already has them (a re-precompute) gets new ones
OUTPUT_MEMBERS = ("latent.npy", "t5.npy", "t5_mask.npy", "clip.npy", "clip_pooled.npy")
MAX_REPORTED_FAILURES = 3  # per shard, with key and reason


class PrecomputeError(ValueError):
    """A user mistake: bad arguments, missing shards, a DEST holding another spec's output."""


# ------------------------------------------------------------------------------- spec
@dataclass(kw_only=True)
class PrecomputeSpec:
    resolution: tuple[int, int] = option(
        doc="[width, height] images are decoded to (resized to cover, center-cropped)."
    )
    autoencoder: AutoencoderSection = option(
        factory=IdentityAutoencoderConfig,
        doc="Autoencoder whose normalised latents are stored (identity, or kl_vae with a path).",
    )
    t5: T5EncoderConfig | None = option(None, "T5 text encoder (t5.npy, t5_mask.npy); null: none.")
    clip: ClipTextEncoderConfig | None = option(
        None, "CLIP text encoder (clip.npy, clip_pooled.npy); null: none."
    )
    caption_key: str = option("txt", "Member holding the caption the text encoders read.")
    dtype: Literal["float16", "float32"] = option(
        "float16", "Dtype of the stored latents and embeddings (masks are bool)."
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = []
        if any(side < 1 for side in self.resolution):
            out.append(("resolution", f"{list(self.resolution)} must be positive"))
        if self.t5 is None and self.clip is None and "caption_key" in given:
            out.append(("caption_key", "has no effect without a text encoder (t5 or clip)"))
        return out


def load_spec(path: str) -> PrecomputeSpec:
    """Read and strictly validate an encoder spec; ConfigError lists every problem."""
    return from_dict(PrecomputeSpec, load_yaml_with_bases(path), source=str(path))


# ----------------------------------------------------------------------------- worker
def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class _ShardOutput:
    """One output shard under its final name: a local tar, then put_atomic, index last."""

    def __init__(self, url: str):
        self.url = url
        self.entries: list[SampleEntry] = []
        self._tmp = tempfile.NamedTemporaryFile(suffix=".tar", delete=False)
        self._tar = tarfile.open(fileobj=self._tmp, mode="w", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, fields: dict[str, bytes], meta: dict[str, Any]) -> None:
        offset = self._tmp.tell()
        for ext, data in fields.items():
            _tar_add(self._tar, f"{key}.{ext}", data)
        self.entries.append(SampleEntry(key, offset, self._tmp.tell() - offset, dict(meta)))

    def publish(self) -> None:
        self._tar.close()
        self._tmp.close()
        try:
            put_atomic(self._tmp.name, self.url)
            write_text_atomic(self.url + INDEX_SUFFIX, ShardIndex(self.url, self.entries).to_json())
        finally:
            os.unlink(self._tmp.name)

    def discard(self) -> None:
        self._tar.close()
        self._tmp.close()
        os.unlink(self._tmp.name)


class ShardEncoder:
    """A worker: builds the encoders once (``setup``), then encodes whole shards.

    Runs as a Ray actor (``ray.remote(ShardEncoder)``) or, in tests, as a plain object.
    """

    def __init__(self, spec: PrecomputeSpec, batch_size: int, decode_threads: int = 4):
        self.spec = spec
        self.batch_size = batch_size
        self.decode_threads = decode_threads
        self.np_dtype = np.dtype(spec.dtype)
        self.ready = False

    def setup(self) -> str | None:
        """Build the encoders; a user mistake (missing checkpoint or tokenizer) comes back
        as a message instead of an actor crash, so the driver can report it in one line."""
        import torch

        from data_pipeline.text_encoders import build_text_encoder
        from models.autoencoders import build_autoencoder

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.autoencoder = build_autoencoder(self.spec.autoencoder).to(self.device)
            self.t5 = build_text_encoder(self.spec.t5).to(self.device) if self.spec.t5 else None
            self.clip = (
                build_text_encoder(self.spec.clip).to(self.device) if self.spec.clip else None
            )
        except (OSError, ValueError) as err:
            return str(err)
        self.ready = True
        return None

    def _decode(self, fields: dict[str, bytes]) -> tuple[Any, str | None]:
        """(image (3, H, W) in [-1, 1], caption); raises ValueError/OSError for a bad sample."""
        image_ext = next((e for e in IMAGE_EXTS if e in fields), None)
        if image_ext is None:
            raise ValueError(f"no image member (one of {IMAGE_EXTS})")
        width, height = self.spec.resolution
        image = decode_image(fields[image_ext], width, height)
        caption = None
        if self.t5 is not None or self.clip is not None:
            if self.spec.caption_key not in fields:
                raise ValueError(f"missing caption member .{self.spec.caption_key}")
            caption = fields[self.spec.caption_key].decode("utf-8")
        return image, caption

    def _read(self, fh: Any, entry: SampleEntry) -> dict[str, bytes]:
        fh.seek(entry.offset)
        data = fh.read(entry.size)
        if len(data) != entry.size:
            raise EOFError(f"short read ({len(data)} of {entry.size} bytes): shard truncated")
        return parse_sample(data)

    def encode(self, images: list[Any], captions: list[str]) -> dict[str, np.ndarray]:
        """One batch -> {member: (B, ...) array} for the members this spec produces."""
        import torch

        out: dict[str, np.ndarray] = {}

        def stored(tensor: torch.Tensor) -> np.ndarray:
            return tensor.detach().float().cpu().numpy().astype(self.np_dtype)

        with torch.no_grad():
            images_BCHW = torch.stack(images).to(self.device)
            out["latent.npy"] = stored(self.autoencoder.encode(images_BCHW))  # (B, C, h, w)
            if self.t5 is not None:
                t5 = self.t5(captions)
                out["t5.npy"] = stored(t5["sequence"])  # (B, L, D)
                out["t5_mask.npy"] = t5["mask"].cpu().numpy().astype(bool)  # (B, L)
            if self.clip is not None:
                clip = self.clip(captions)
                out["clip.npy"] = stored(clip["sequence"])  # (B, L, D)
                out["clip_pooled.npy"] = stored(clip["pooled"])  # (B, P)
        return out

    def process(self, in_url: str, out_url: str) -> dict[str, Any]:
        """Encode one shard into ``out_url``; never raises for data problems."""
        import fsspec

        start = time.perf_counter()
        result: dict[str, Any] = {"url": in_url, "samples": 0, "failed_samples": 0}
        failures: list[str] = []
        writer: _ShardOutput | None = None
        try:
            if not self.ready:  # a restarted actor (Ray re-runs __init__ only)
                problem = self.setup()
                if problem:
                    raise RuntimeError(f"building the encoders: {problem}")
            index = load_index(in_url)
            writer = _ShardOutput(out_url)
            with (
                fsspec.open(in_url, "rb") as fh,
                ThreadPoolExecutor(self.decode_threads) as pool,
            ):
                for begin in range(0, len(index.samples), self.batch_size):
                    entries = index.samples[begin : begin + self.batch_size]
                    # reads stay sequential on the one handle; decoding runs in threads
                    decoding = []
                    for entry in entries:
                        try:
                            fields = retry(
                                lambda entry=entry: self._read(fh, entry),
                                what=f"reading {entry.key} of {in_url}",
                            )
                        except Exception as err:
                            decoding.append((entry, {}, err))
                        else:
                            decoding.append((entry, fields, pool.submit(self._decode, fields)))
                    good: list[tuple[SampleEntry, dict[str, bytes], Any, Any]] = []
                    for entry, fields, pending in decoding:
                        try:
                            if isinstance(pending, Exception):
                                raise pending
                            image, caption = pending.result()
                        except Exception as err:  # any unreadable sample: skip and count it
                            result["failed_samples"] += 1
                            if len(failures) < MAX_REPORTED_FAILURES:
                                failures.append(f"{entry.key}: {err}")
                            continue
                        good.append((entry, fields, image, caption))
                    if not good:
                        continue
                    arrays = self.encode([g[2] for g in good], [g[3] for g in good])
                    for i, (entry, fields, _, _) in enumerate(good):
                        members = {k: v for k, v in fields.items() if k not in OUTPUT_MEMBERS}
                        members.update({k: _npy_bytes(a[i]) for k, a in arrays.items()})
                        writer.write(entry.key, members, entry.meta)
                        result["samples"] += 1
            if result["samples"] == 0:
                raise ValueError(
                    f"none of its {len(index.samples)} samples could be read and decoded"
                )
            writer.publish()
            writer = None
            result["status"] = "done"
        except Exception as err:  # the shard fails; the run goes on with the others
            result["status"] = "failed"
            result["error"] = f"{type(err).__name__}: {err}"
        finally:
            if writer is not None:
                writer.discard()
        result["failures"] = failures
        result["seconds"] = time.perf_counter() - start
        return result


# ----------------------------------------------------------------------------- driver
@dataclass
class PrecomputeSummary:
    dest: str
    done: int = 0
    skipped: int = 0  # already complete before this run
    left: int = 0  # not started because of --limit-shards
    failed: list[str] = field(default_factory=list)
    samples: int = 0
    failed_samples: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0  # from the first shard dispatched to the last one back

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.encode_seconds if self.encode_seconds > 0 else 0.0

    def line(self) -> str:
        left = f", {self.left} left for a later run (--limit-shards)" if self.left else ""
        return (
            f"precompute: {self.done} shards done, {self.skipped} skipped as already complete, "
            f"{len(self.failed)} failed{left}; {self.samples} samples, {self.failed_samples} "
            f"failed samples; {self.seconds:.1f} s ({self.samples_per_second:.1f} samples/s "
            f"encoding) -> {self.dest}"
        )


def _is_local(url: str) -> bool:
    import fsspec

    fs, _ = fsspec.core.url_to_fs(url)
    return isinstance(fs, fsspec.implementations.local.LocalFileSystem)


def _exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return bool(retry(lambda: fs.exists(path), what=f"listing {url}"))


def plan_outputs(inputs: list[str], dest: str) -> list[tuple[str, str]]:
    """(input url, output url) per shard; the output keeps the input's file name."""
    try:
        urls = expand_urls(inputs)
    except FileNotFoundError as err:
        raise PrecomputeError(f"--in: {err}") from None
    if not urls:
        raise PrecomputeError(f"--in {inputs} matched no shards")
    dest = dest.rstrip("/")
    seen: dict[str, str] = {}
    pairs = []
    for url in urls:
        name = posixpath.basename(url)
        if name in seen:
            raise PrecomputeError(
                f"--in: {seen[name]} and {url} have the same file name; their outputs would "
                "collide in --out (precompute them into separate destinations)"
            )
        seen[name] = url
        out_url = f"{dest}/{name}"
        same = (
            os.path.abspath(url) == os.path.abspath(out_url)
            if _is_local(url) and _is_local(out_url)
            else url == out_url
        )
        if same:
            raise PrecomputeError(f"--out {dest} holds the input shard {url}; choose another --out")
        pairs.append((url, out_url))
    return pairs


def _spec_differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _spec_differences(
                old.get(key), new.get(key), f"{path}.{key}" if path else str(key)
            )
        return out
    return [] if old == new else [f"{path or '<root>'}: {old!r} -> {new!r}"]


def _check_manifest(dest: str, spec: PrecomputeSpec) -> bool:
    """True when DEST already records this spec; PrecomputeError when it records another."""
    import fsspec

    url = f"{dest.rstrip('/')}/{MANIFEST}"
    if not _exists(url):
        return False
    with fsspec.open(url, "rt") as fh:
        try:
            recorded = json.load(fh).get("spec")
        except (ValueError, AttributeError):
            raise PrecomputeError(
                f"{url} is not a precompute manifest; choose another --out"
            ) from None
    diff = _spec_differences(recorded, json.loads(json.dumps(to_dict(spec))))
    if diff:
        raise PrecomputeError(
            f"--out {dest} was precomputed with another spec ({'; '.join(diff[:5])}); "
            "use a new --out, or delete it to start over"
        )
    return True


def _start_ray(address: str | None, num_cpus: int) -> bool:
    """Connect to or start Ray; True when this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():  # e.g. a caller (or test) that set Ray up already
        return False
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # address="local": a new instance, never one that happens to run on this machine
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise PrecomputeError(f"cannot start or reach {where}: {err}") from None
    return True


def _default_workers(pending: int, gpus_per_worker: float) -> int:
    import ray

    resources = ray.cluster_resources()
    if gpus_per_worker > 0:
        slots = int(resources.get("GPU", 0) / gpus_per_worker)
        if slots < 1:
            raise PrecomputeError(
                f"--gpus-per-worker {gpus_per_worker}: the Ray cluster has "
                f"{resources.get('GPU', 0):g} GPUs"
            )
    else:
        slots = int(resources.get("CPU", 1))
    return max(1, min(pending, slots))


def precompute(
    inputs: list[str],
    dest: str,
    spec: PrecomputeSpec,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    gpus_per_worker: float = 0.0,
    batch_size: int = 64,
    limit_shards: int | None = None,
    progress: bool = True,
) -> PrecomputeSummary:
    """Encode every input shard whose output is not complete yet (see module docstring).

    Raises PrecomputeError for user mistakes, before anything is written."""
    from tqdm import tqdm

    started = time.perf_counter()
    dest = dest.rstrip("/")
    summary = PrecomputeSummary(dest)
    pairs = plan_outputs(inputs, dest)
    with ThreadPoolExecutor(max_workers=8) as pool:  # many small HEADs on object stores
        complete = list(pool.map(lambda pair: _exists(pair[1] + INDEX_SUFFIX), pairs))
    has_manifest = _check_manifest(dest, spec)
    pending = [pair for pair, done in zip(pairs, complete) if not done]
    summary.skipped = len(pairs) - len(pending)
    if limit_shards is not None:
        summary.left = max(0, len(pending) - limit_shards)
        pending = pending[:limit_shards]
    if not pending:
        summary.seconds = time.perf_counter() - started
        return summary
    import ray

    owns_ray = _start_ray(address, num_workers or os.cpu_count() or 1)
    actors: list[Any] = []
    try:
        workers = num_workers or _default_workers(len(pending), gpus_per_worker)
        workers = min(workers, len(pending))
        actor_cls = ray.remote(ShardEncoder).options(
            num_cpus=1, num_gpus=gpus_per_worker, max_restarts=1, max_task_retries=1
        )
        actors += [actor_cls.remote(spec, batch_size) for _ in range(workers)]
        problems = [p for p in ray.get([a.setup.remote() for a in actors]) if p]
        if problems:
            raise PrecomputeError(f"building the encoders: {problems[0]}")
        if not has_manifest:  # only now: a spec whose encoders do not build is not recorded
            write_text_atomic(f"{dest}/{MANIFEST}", json.dumps({"spec": to_dict(spec)}, indent=2))
        encode_start = time.perf_counter()
        queue = list(reversed(pending))
        in_flight: dict[Any, tuple[Any, str]] = {}

        def submit(actor: Any) -> None:
            if queue:
                in_url, out_url = queue.pop()
                in_flight[actor.process.remote(in_url, out_url)] = (actor, in_url)

        for actor in actors:
            submit(actor)
        bar = tqdm(
            total=len(pending),
            desc="precompute",
            unit="shard",
            file=sys.stderr,
            disable=not progress,
        )
        with bar:
            while in_flight:
                (ready,), _ = ray.wait(list(in_flight), num_returns=1)
                actor, in_url = in_flight.pop(ready)
                try:
                    result = ray.get(ready)
                except ray.exceptions.RayError as err:  # the worker died twice on this shard
                    result = {"url": in_url, "status": "failed", "error": str(err).splitlines()[0]}
                    result.update(samples=0, failed_samples=0, failures=[])
                    actor = None
                name = posixpath.basename(in_url)
                summary.samples += result["samples"]
                summary.failed_samples += result["failed_samples"]
                if result["failed_samples"]:
                    bar.write(
                        f"{name}: skipped {result['failed_samples']} samples that failed to "
                        f"read or decode ({'; '.join(result['failures'])})",
                        file=sys.stderr,
                    )
                if result["status"] == "done":
                    summary.done += 1
                else:
                    summary.failed.append(name)
                    bar.write(f"{name}: failed, not written: {result['error']}", file=sys.stderr)
                bar.update(1)
                bar.set_postfix(samples=summary.samples, refresh=False)
                if actor is not None:
                    submit(actor)
                elif queue and not in_flight:  # every worker is gone
                    summary.failed += [posixpath.basename(u) for u, _ in reversed(queue)]
                    queue.clear()
        summary.encode_seconds = time.perf_counter() - encode_start
    finally:
        for actor in actors:  # frees their CPUs/GPUs in a cluster that outlives this run
            ray.kill(actor)
        if owns_ray:
            ray.shutdown()
    summary.seconds = time.perf_counter() - started
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.precompute", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--in",
        dest="inputs",
        action="append",
        required=True,
        help="input shards: brace pattern, folder or s3:// prefix (repeatable)",
    )
    parser.add_argument("--out", required=True, help="destination folder or fsspec URL")
    parser.add_argument("--encoders", required=True, help="encoder spec YAML (PrecomputeSpec)")
    parser.add_argument("--address", default=None, help="Ray cluster address; default: local")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="encoder actors (default: one per CPU/GPU)"
    )
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per encoder call")
    parser.add_argument(
        "--limit-shards", type=int, default=None, help="process at most this many pending shards"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    bad = [
        f"--{name.replace('_', '-')} must be >= {low}"
        for name, low in (("num_workers", 1), ("batch_size", 1), ("limit_shards", 0))
        if getattr(args, name) is not None and getattr(args, name) < low
    ]
    if args.gpus_per_worker < 0:
        bad.append("--gpus-per-worker must be >= 0")
    if bad:
        print(f"error: {'; '.join(bad)}", file=sys.stderr)
        return 2
    try:
        spec = load_spec(args.encoders)
        summary = precompute(
            args.inputs,
            args.out,
            spec,
            address=args.address,
            num_workers=args.num_workers,
            gpus_per_worker=args.gpus_per_worker,
            batch_size=args.batch_size,
            limit_shards=args.limit_shards,
            progress=not args.no_progress,
        )
    except (ConfigError, PrecomputeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.line())
    if summary.failed:
        print(
            f"error: {len(summary.failed)} shards failed and were not written (rerun to retry): "
            f"{', '.join(summary.failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
