"""WebDataset shards: the sample layout, a writer, and per-shard indexes.

A shard is a plain POSIX tar that ``webdataset.WebDataset`` reads as is: the members of
one sample share a key (``000123.png``, ``000123.txt``, ``000123.json``). Layout per
modality (member extension -> content):

=========  ==========================================================================
image      ``png`` / ``jpg`` / ``webp`` encoded image; ``txt`` caption (UTF-8);
           ``json`` metadata ``{"width", "height", "aspect", ...}``; ``cls`` integer
           class label (ASCII)
latents    ``latent.npy`` autoencoder latent (C, h, w); ``t5.npy`` (L, D) and
           ``clip.npy`` (L, D) text-encoder sequences; ``clip_pooled.npy`` (D,)
text       ``txt`` raw text, or ``tokens.npy`` int32 token ids; ``json`` with
           ``{"num_tokens"}``
video      ``mp4``; ``json`` with ``{"width", "height", "frames", "fps", "duration"}``
audio      ``wav`` / ``flac``; ``json`` with ``{"sample_rate", "duration"}``
=========  ==========================================================================

Next to every ``NAME.tar`` the writer stores ``NAME.tar.index.json``: for each sample
its key, byte offset and length inside the tar, and the small metadata the loader needs
to plan batches (size, duration, length) without opening the shard. Shards written by
other tools get their index by one scan. A shard and its index are uploaded as
complete-or-absent objects: built in a local temporary file, then moved (local) or
PUT (object stores, where a multipart upload only appears once complete); the index goes
last, so a shard without an index was interrupted and is rebuilt, never half-read.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec

from data_pipeline.storage import explain

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".index.json"
# metadata keys copied from a sample's json into the index (used for bucketing)
PLANNING_KEYS = ("width", "height", "aspect", "frames", "duration", "num_tokens", "length")


@dataclass
class SampleEntry:
    key: str
    offset: int
    size: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardIndex:
    url: str
    samples: list[SampleEntry]
    meta: dict[str, Any] = field(default_factory=dict)  # whole-shard facts (tokenizer checksum)

    def to_json(self) -> str:
        data = {
            "num_samples": len(self.samples),
            "samples": [[s.key, s.offset, s.size, s.meta] for s in self.samples],
        }
        if self.meta:
            data["meta"] = self.meta
        return json.dumps(data)

    @classmethod
    def from_json(cls, url: str, text: str) -> ShardIndex:
        data = json.loads(text)
        samples = [SampleEntry(k, o, s, m) for k, o, s, m in data["samples"]]
        return cls(url, samples, data.get("meta", {}))


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def retry(fn, *, what: str, attempts: int = 5, base_delay: float = 0.5):
    """Call ``fn`` retrying transient I/O errors with exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except (OSError, TimeoutError) as err:  # botocore/aiohttp errors subclass these
            if (
                isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError))
                or attempt == attempts - 1
                or explain(err) is not None  # credentials, endpoint, bucket: the user's to fix
            ):
                raise
            delay = base_delay * 2**attempt
            log.warning(
                "%s failed (%s); retry %d/%d in %.1fs", what, err, attempt + 1, attempts - 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def put_atomic(local_path: str, url: str) -> None:
    """Move a finished local file to ``url`` so that it is whole or absent there."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(local_path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    else:
        retry(lambda: fs.put_file(local_path, path), what=f"upload of {url}")


def write_text_atomic(url: str, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", delete=False, suffix=".json") as tmp:
        tmp.write(text)
    try:
        put_atomic(tmp.name, url)
    finally:
        os.unlink(tmp.name)


class ShardWriter:
    """Fill shards up to ``max_samples`` samples or ``max_bytes`` bytes and publish them.

    ``dest`` is a local folder or an fsspec URL (``s3://bucket/prefix``); shards are
    named ``{prefix}-{index:06d}.tar``; ``index_meta`` goes into every shard's index. Use as a context manager; ``summary`` counts
    samples, shards and bytes.
    """

    def __init__(
        self,
        dest: str,
        *,
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int = 256 << 20,
        start_index: int = 0,
        index_meta: dict[str, Any] | None = None,
    ):
        self.dest = dest.rstrip("/")
        self.index_meta = dict(index_meta or {})
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.shard_index = start_index
        self.summary = {"samples": 0, "shards": 0, "bytes": 0}
        self.urls: list[str] = []
        self._tmp: tempfile._TemporaryFileWrapper | None = None
        self._tar: tarfile.TarFile | None = None
        self._entries: list[SampleEntry] = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()

    def _open(self) -> None:
        self._tmp = tempfile.NamedTemporaryFile(suffix=".tar", delete=False)
        self._tar = tarfile.open(fileobj=self._tmp, mode="w", format=tarfile.USTAR_FORMAT)
        self._entries = []

    def write(self, key: str, fields: dict[str, bytes], meta: dict[str, Any] | None = None) -> None:
        """Add one sample: ``fields`` maps extension (``png``, ``txt``, ``latent.npy``) to bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None:
            self._open()
        offset = self._tmp.tell()
        for ext, data in fields.items():
            _tar_add(self._tar, f"{key}.{ext}", data)
        size = self._tmp.tell() - offset
        planning = {k: v for k, v in (meta or {}).items() if k in PLANNING_KEYS}
        self._entries.append(SampleEntry(key, offset, size, planning))
        self.summary["samples"] += 1
        if len(self._entries) >= self.max_samples or self._tmp.tell() >= self.max_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # writes the end-of-archive blocks
        self._tmp.close()
        local = self._tmp.name
        self._tar = self._tmp = None  # the temp file is ours to remove from here on
        name = f"{self.prefix}-{self.shard_index:06d}.tar"
        url = f"{self.dest}/{name}"
        size = os.path.getsize(local)
        try:
            put_atomic(local, url)
            index = ShardIndex(url, self._entries, self.index_meta)
            write_text_atomic(url + INDEX_SUFFIX, index.to_json())
        finally:
            os.unlink(local)
        self.urls.append(url)
        self.summary["shards"] += 1
        self.summary["bytes"] += size
        self.shard_index += 1

    def _discard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp.close()
            os.unlink(self._tmp.name)
            self._tar = self._tmp = None

    def close(self) -> None:
        self._flush()


# ------------------------------------------------------------------------------ reading
def expand_urls(spec: str | Iterable[str]) -> list[str]:
    """Shard URLs from a brace pattern (``shard-{000000..000009}.tar``), a folder or
    prefix (every ``*.tar`` in it), or a list of either."""
    from braceexpand import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for url in braceexpand(item):
            if url.endswith(".tar"):
                urls.append(url)
                continue
            fs, path = fsspec.core.url_to_fs(url)
            try:
                listing = fs.ls(path, detail=False)
            except FileNotFoundError:  # s3fs names only the key; say what was asked for
                raise FileNotFoundError(f"no such file or folder: {url}") from None
            found = sorted(p for p in listing if p.endswith(".tar"))
            if not found:
                raise FileNotFoundError(f"no .tar shards under {url}")
            protocol = (
                ""
                if isinstance(fs, fsspec.implementations.local.LocalFileSystem)
                else url.split("://", 1)[0] + "://"
            )
            urls.extend(
                protocol + p if protocol and not p.startswith(protocol) else p for p in found
            )
    return urls


def scan_index(url: str) -> ShardIndex:
    """Index a shard written by another tool by reading it once."""
    entries: dict[str, SampleEntry] = {}
    metas: dict[str, dict] = {}
    with fsspec.open(url, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[-1].partition(".")
                end = member.offset_data + ((member.size + 511) // 512) * 512
                if key in entries:
                    entries[key].size = end - entries[key].offset
                else:
                    entries[key] = SampleEntry(key, member.offset, end - member.offset)
                if ext == "json":
                    try:
                        meta = json.loads(tar.extractfile(member).read())
                        metas[key] = {k: v for k, v in meta.items() if k in PLANNING_KEYS}
                    except (ValueError, UnicodeDecodeError, tarfile.ReadError):
                        pass
        except tarfile.ReadError as err:  # truncated shard: keep what was indexed
            log.warning("%s is truncated (%s); its last sample will fail to read", url, err)
    for key, meta in metas.items():
        entries[key].meta = meta
    return ShardIndex(url, list(entries.values()))


def load_index(url: str) -> ShardIndex:
    """The shard's index: its sidecar when present, else a scan of the shard."""
    fs, path = fsspec.core.url_to_fs(url)
    index_path = path + INDEX_SUFFIX
    if retry(lambda: fs.exists(index_path), what=f"listing {url}"):
        text = retry(lambda: fs.cat_file(index_path), what=f"reading {url}{INDEX_SUFFIX}")
        return ShardIndex.from_json(url, text.decode())
    log.info("no index next to %s; scanning it", url)
    return retry(lambda: scan_index(url), what=f"scanning {url}")


def parse_sample(data: bytes) -> dict[str, bytes]:
    """Members of one sample (a run of tar members) as {extension: bytes}."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                ext = member.name.rpartition("/")[-1].partition(".")[2]
                out[ext] = tar.extractfile(member).read()
    return out
