"""WebDataset shards: rolling, sidecar indexes, scans, URL expansion, atomic publishing
(local and on a real S3-compatible server) and retries."""

from __future__ import annotations

import json
import os
import random
import tarfile
import uuid
from pathlib import Path

import fsspec
import pytest

from data_pipeline import shards
from data_pipeline.shards import (
    INDEX_SUFFIX,
    ShardWriter,
    expand_urls,
    load_index,
    parse_sample,
    retry,
    scan_index,
)


def _sample(i: int) -> tuple[str, dict[str, bytes], dict]:
    """A sample with members of varied sizes; meta holds planning and non-planning keys."""
    rng = random.Random(i)
    meta = {"width": 8 + i, "height": 5, "aspect": (8 + i) / 5, "label": i % 3, "source": f"x{i}"}
    fields = {
        "png": rng.randbytes(100 + 700 * (i % 4)),
        "txt": f"caption number {i}".encode(),
        "cls": str(i % 3).encode(),
        "json": json.dumps(meta).encode(),
        "latent.npy": rng.randbytes(64),
    }
    return f"{i:06d}", fields, meta


def _write(dest, count: int, **kwargs) -> ShardWriter:
    with ShardWriter(str(dest), **kwargs) as writer:
        for i in range(count):
            writer.write(*_sample(i))
    return writer


def _read_all(urls: list[str]) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of the shards, read through the index and parse_sample only."""
    out = []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        data = fs.cat_file(path)
        for entry in load_index(url).samples:
            out.append((entry.key, parse_sample(data[entry.offset : entry.offset + entry.size])))
    return out


@pytest.fixture
def s3(s3_endpoint):
    """The moto endpoint, with s3fs instances cached against an earlier endpoint dropped."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_endpoint
    s3fs.S3FileSystem.clear_instance_cache()


def test_rolls_at_max_samples(tmp_path):
    """7 samples with max_samples=3 make shards of 3, 3 and 1, each with its sidecar index."""
    writer = _write(tmp_path, 7, max_samples=3)
    assert [Path(u).name for u in writer.urls] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert [len(load_index(u).samples) for u in writer.urls] == [3, 3, 1]
    assert all(os.path.exists(u + INDEX_SUFFIX) for u in writer.urls)
    assert writer.summary == {
        "samples": 7,
        "shards": 3,
        "bytes": sum(os.path.getsize(u) for u in writer.urls),
    }


def test_rolls_at_max_bytes(tmp_path):
    """A shard closes with the first sample that reaches max_bytes, not before, not after."""
    max_bytes = 12000
    writer = _write(tmp_path, 12, max_samples=1000, max_bytes=max_bytes)
    indexes = [load_index(u).samples for u in writer.urls]
    assert len(indexes) > 2
    assert max(len(i) for i in indexes) > 1
    assert [e.key for i in indexes for e in i] == [_sample(i)[0] for i in range(12)]
    for number, entries in enumerate(indexes):
        *before, last = entries
        assert all(e.offset + e.size < max_bytes for e in before)
        if number < len(indexes) - 1:
            assert last.offset < max_bytes <= last.offset + last.size
    assert writer.summary["bytes"] == sum(os.path.getsize(u) for u in writer.urls)


def test_index_entries_read_back_each_sample_exactly(tmp_path):
    """(offset, size) of each index entry cover exactly that sample's members; meta keeps
    only the planning keys."""
    writer = _write(tmp_path, 9, max_samples=4)
    got = _read_all(writer.urls)
    assert [k for k, _ in got] == [_sample(i)[0] for i in range(9)]
    for i, (_, fields) in enumerate(got):
        assert fields == _sample(i)[1]
    entry = load_index(writer.urls[0]).samples[1]
    assert entry.meta == {"width": 9, "height": 5, "aspect": 9 / 5}


def test_scan_index_equals_sidecar(tmp_path):
    """Scanning a shard yields the sidecar's entries; load_index falls back to the scan."""
    writer = _write(tmp_path, 6, max_samples=4)
    for url in writer.urls:
        sidecar = load_index(url).samples
        assert scan_index(url).samples == sidecar
        os.remove(url + INDEX_SUFFIX)
        assert load_index(url).samples == sidecar


def test_scan_index_of_a_foreign_webdataset_tar(tmp_path):
    """A tar from webdataset.TarWriter (pax headers, other member order) scans into entries
    whose byte ranges hold each sample, with width/height copied from its json."""
    import webdataset as wds

    url = str(tmp_path / "foreign.tar")
    written = []
    with wds.TarWriter(url) as tw:
        for i in range(4):
            meta = {"width": 10 + i, "height": 7, "caption_source": "web"}
            fields = {
                "png": random.Random(i).randbytes(300 * (i + 1)),
                "txt": f"cap {i}".encode(),
                "json": json.dumps(meta).encode(),
            }
            tw.write({"__key__": f"s{i:03d}", **fields})
            written.append((f"s{i:03d}", fields))
    index = scan_index(url)
    assert [e.meta for e in index.samples] == [{"width": 10 + i, "height": 7} for i in range(4)]
    assert load_index(url).samples == index.samples  # no sidecar: load_index scans
    assert _read_all([url]) == written


def test_plain_webdataset_pipeline_reads_our_shards(tmp_path):
    """webdataset.WebDataset(urls) sees the same keys and member bytes as were written."""
    import webdataset as wds

    writer = _write(tmp_path, 7, max_samples=3)
    seen = [
        (s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
        for s in wds.WebDataset(writer.urls, shardshuffle=False)
    ]
    assert seen == [_sample(i)[:2] for i in range(7)]


def test_expand_urls_brace_folder_list_and_missing(tmp_path):
    """Brace patterns, folders (only *.tar, sorted) and lists expand; empty folders raise."""
    first = _write(tmp_path / "a", 5, max_samples=2).urls
    second = _write(tmp_path / "b", 2, max_samples=1).urls
    pattern = str(tmp_path / "a" / "shard-{000000..000002}.tar")
    assert expand_urls(pattern) == first
    assert expand_urls(str(tmp_path / "a")) == first
    assert expand_urls(str(tmp_path / "a") + "/") == first
    assert expand_urls([pattern, str(tmp_path / "b")]) == first + second
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no shards here")
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        expand_urls(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        expand_urls(str(tmp_path / "absent"))


@pytest.mark.parametrize("key", ["000001.a", "dir/000001"])
def test_keys_with_dot_or_slash_are_rejected(tmp_path, key):
    """A key with '.' or '/' would split wrongly into key and extension, so it is refused
    and nothing of it lands in the shard."""
    with ShardWriter(str(tmp_path)) as writer:
        writer.write("000000", {"txt": b"ok"})
        with pytest.raises(ValueError, match="must not contain"):
            writer.write(key, {"txt": b"bad"})
    assert [k for k, _ in _read_all(writer.urls)] == ["000000"]


def test_exception_in_block_publishes_nothing_in_progress(tmp_path, monkeypatch):
    """An error in the with-block leaves finished shards whole and the open one absent,
    with no temporary file left behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(str(dest), max_samples=2) as writer:
        for i in range(3):
            writer.write(*_sample(i))
        raise RuntimeError("boom")
    assert sorted(p.name for p in dest.iterdir()) == [
        "shard-000000.tar",
        "shard-000000.tar.index.json",
    ]
    assert len(load_index(str(dest / "shard-000000.tar")).samples) == 2
    assert list(tmp.iterdir()) == []


def test_failed_roll_reports_the_upload_error(tmp_path):
    """When publishing fails while rolling to the next shard, the caller sees that error."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(NotADirectoryError), ShardWriter(str(blocker / "out"), max_samples=1) as w:
        w.write("000000", {"txt": b"a"})


def test_s3_write_then_expand_load_and_parse(s3):
    """Shards written to s3://ckpts/shards come back through expand_urls, load_index and
    parse_sample, with the sidecar index next to each."""
    import s3fs

    dest = f"s3://ckpts/shards/{uuid.uuid4().hex[:8]}"  # moto's store outlives one server
    writer = _write(dest, 5, max_samples=2)
    expected = [f"{dest}/shard-{i:06d}.tar" for i in range(3)]
    assert writer.urls == expected
    assert expand_urls(dest) == expected
    assert expand_urls(dest + "/shard-{000000..000002}.tar") == expected
    assert _read_all(expected) == [_sample(i)[:2] for i in range(5)]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3})
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(dest, refresh=True))
    assert names == sorted(
        [f"shard-{i:06d}.tar" for i in range(3)]
        + [f"shard-{i:06d}.tar{INDEX_SUFFIX}" for i in range(3)]
    )
    assert scan_index(expected[0]).samples == load_index(expected[0]).samples


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The delays retry() waits, recorded instead of slept."""
    delays: list[float] = []
    monkeypatch.setattr(shards.time, "sleep", delays.append)
    return delays


def test_s3_failed_upload_raises_and_leaves_no_object(s3, sleeps):
    """Uploading to a bucket the server does not have raises, at once and without retries,
    and no shard or index object appears under the final names."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=s3)
    with pytest.raises(FileNotFoundError, match="bucket"), ShardWriter("s3://missing/shards") as w:
        w.write(*_sample(0))
    assert sleeps == []
    assert "missing" not in [b["Name"] for b in client.list_buckets()["Buckets"]]
    for key in ("shards/shard-000000.tar", "shards/shard-000000.tar" + INDEX_SUFFIX):
        with pytest.raises(ClientError):
            client.head_object(Bucket="missing", Key=key)


def test_retry_backs_off_on_transient_errors(sleeps):
    """A transient OSError is retried with doubling sleeps, then the value is returned."""
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("connection reset")
        return 42

    assert retry(flaky, what="flaky", base_delay=0.5) == 42
    assert len(calls) == 3
    assert sleeps == [0.5, 1.0]


def test_retry_gives_up_after_attempts_and_skips_missing_files(sleeps):
    """Retries stop after ``attempts`` calls; FileNotFoundError is raised on the first call."""
    calls = []

    def down():
        calls.append(1)
        raise TimeoutError("read timed out")

    with pytest.raises(TimeoutError):
        retry(down, what="down", attempts=3, base_delay=0.25)
    assert (len(calls), sleeps) == (3, [0.25, 0.5])

    calls.clear()
    sleeps.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://ckpts/absent.tar")

    with pytest.raises(FileNotFoundError):
        retry(missing, what="missing")
    assert (len(calls), sleeps) == (1, [])


def test_shards_are_plain_tars_with_key_dot_ext_members(tmp_path):
    """tarfile lists a shard's members as KEY.EXT in write order, sample by sample."""
    writer = _write(tmp_path, 3)
    with tarfile.open(writer.urls[0]) as tar:
        names = tar.getnames()
    assert names == [f"{_sample(i)[0]}.{ext}" for i in range(3) for ext in _sample(i)[1]]
