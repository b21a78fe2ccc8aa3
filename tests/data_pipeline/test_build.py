"""``python -m data_pipeline.build``: built-in digits, image folders with sidecar or manifest
captions, text files, the CLI summary, user mistakes, and building straight to S3."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest
from conftest import REPO, launch_env
from PIL import Image

from data_pipeline.build import main
from data_pipeline.shards import expand_urls, load_index, parse_sample

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SUMMARY = re.compile(
    r"wrote (\d+) samples in (\d+) shards \((\d+\.\d) MB\) to (\S+); skipped: (.+)$", re.M
)


def _build(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _summary(out: str) -> tuple[int, int, str, str, str]:
    match = SUMMARY.search(out)
    assert match, out
    samples, shards, mb, dest, skipped = match.groups()
    return int(samples), int(shards), mb, dest, skipped


def _samples(dest) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample under ``dest``, read through the shard indexes."""
    out = []
    for url in expand_urls(str(dest)):
        fs, path = fsspec.core.url_to_fs(url)
        data = fs.cat_file(path)
        for entry in load_index(url).samples:
            out.append((entry.key, parse_sample(data[entry.offset : entry.offset + entry.size])))
    return out


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _image_bytes(size: tuple[int, int], fmt: str, seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def s3(s3_endpoint):
    """The moto endpoint, with s3fs instances cached against an earlier endpoint dropped."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_endpoint
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def image_folder(tmp_path) -> tuple[Path, dict[str, tuple[bytes, tuple[int, int]]]]:
    """Three decodable images (png, jpg, one in a subfolder), one without caption, one
    undecodable; returns the folder and {relative path: (bytes, size)} of the good ones."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    good = {
        "a.png": (_image_bytes((10, 6), "PNG", 1), (10, 6)),
        "b.jpg": (_image_bytes((8, 12), "JPEG", 2), (8, 12)),
        "sub/c.png": (_image_bytes((5, 5), "PNG", 3), (5, 5)),
    }
    for rel, (data, _) in good.items():
        (folder / rel).write_bytes(data)
    (folder / "d.png").write_bytes(_image_bytes((4, 4), "PNG", 4))  # never captioned
    (folder / "e.png").write_bytes(random.Random(5).randbytes(300))  # not an image
    return folder, good


def _captions(rel: str) -> str:
    return f"caption of {rel}, with a comma"


def _check_images(dest, good) -> None:
    """The shards hold exactly the good images, bytes unchanged, with caption and size."""
    got = _samples(dest)
    assert len(got) == len(good)
    for (_, fields), (rel, (data, size)) in zip(got, sorted(good.items())):
        ext = "jpg" if rel.endswith(".jpg") else "png"
        assert fields[ext] == data
        assert fields["txt"].decode() == _captions(rel)
        meta = json.loads(fields["json"])
        assert (meta["width"], meta["height"]) == size == _decode(data).size
        assert meta["aspect"] == pytest.approx(size[0] / size[1])


def test_digits_full_dataset(tmp_path, capsys):
    """All 1797 digits are written, in order, captioned with the word of their label."""
    from sklearn.datasets import load_digits

    dest = tmp_path / "digits"
    code, out, _ = _build(capsys, "builtin:digits", "--out", dest)
    assert code == 0
    assert _summary(out)[:2] == (1797, 2)
    got = _samples(dest)
    targets = load_digits().target
    assert [k for k, _ in got] == [f"{i:06d}" for i in range(1797)]
    assert [int(f["cls"]) for _, f in got] == [int(t) for t in targets]
    for _, fields in got:
        assert fields["txt"].decode() == f"a photo of the digit {WORDS[int(fields['cls'])]}"
    assert {len(load_index(u).samples) for u in expand_urls(str(dest))} == {1000, 797}


def test_digits_decode_to_the_requested_size(tmp_path, capsys):
    """With --size 24 every PNG decodes to a 24x24 RGB image that is not blank."""
    dest = tmp_path / "digits"
    assert _build(capsys, "builtin:digits", "--out", dest, "--limit", 10, "--size", 24)[0] == 0
    got = _samples(dest)
    assert len(got) == 10
    for _, fields in got:
        image = _decode(fields["png"])
        assert (image.size, image.mode) == ((24, 24), "RGB")
        assert image.getextrema()[0][1] > 100  # the stroke is there
        meta = json.loads(fields["json"])
        assert (meta["width"], meta["height"], meta["label"]) == (24, 24, int(fields["cls"]))


def test_digits_alternate_sizes_for_aspect_buckets(tmp_path, capsys):
    """--sizes 32x32,48x32 alternates the image size; json and index meta match the image."""
    dest = tmp_path / "digits"
    code = _build(capsys, "builtin:digits", "--out", dest, "--limit", 6, "--sizes", "32x32,48x32")
    assert code[0] == 0
    got = _samples(dest)
    sizes = [_decode(f["png"]).size for _, f in got]
    assert sizes == [(32, 32), (48, 32)] * 3
    for (_, fields), size in zip(got, sizes):
        meta = json.loads(fields["json"])
        assert (meta["width"], meta["height"]) == size
        assert meta["aspect"] == pytest.approx(size[0] / size[1])
    index_meta = [e.meta for u in expand_urls(str(dest)) for e in load_index(u).samples]
    assert index_meta == [{"width": w, "height": h, "aspect": w / h} for w, h in sizes]


def test_image_folder_with_sidecar_captions(image_folder, tmp_path, capsys):
    """Sidecar NAME.txt captions; the uncaptioned and the undecodable file are skipped and
    counted in the summary."""
    folder, good = image_folder
    for rel in good:
        (folder / rel).with_suffix(".txt").write_text(_captions(rel) + "\n")
    (folder / "e.txt").write_text("caption of random bytes")
    dest = tmp_path / "out"
    code, out, _ = _build(capsys, folder, "--out", dest)
    assert code == 0
    assert _summary(out)[0] == 3
    assert _summary(out)[4] == "1 missing caption, 1 undecodable image"
    _check_images(dest, good)


def test_image_folder_with_jsonl_manifest(image_folder, tmp_path, capsys):
    """A jsonl manifest captions by bare file name too (sub/c.png as c.png); no sidecars."""
    folder, good = image_folder
    manifest = tmp_path / "captions.jsonl"
    rows = [{"file": Path(rel).name, "caption": _captions(rel)} for rel in good]
    rows.append({"file": "e.png", "caption": "caption of random bytes"})
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    dest = tmp_path / "out"
    code, out, _ = _build(capsys, folder, "--out", dest, "--captions", manifest)
    assert code == 0
    assert _summary(out)[4] == "1 missing caption, 1 undecodable image"
    _check_images(dest, good)


def test_image_folder_with_csv_manifest(image_folder, tmp_path, capsys):
    """A csv manifest keyed by relative path, extra columns ignored, quoted commas kept."""
    folder, good = image_folder
    manifest = tmp_path / "captions.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "caption", "license"])
        for rel in good:
            writer.writerow([rel, _captions(rel), "cc0"])
        writer.writerow(["e.png", "caption of random bytes", "cc0"])
    dest = tmp_path / "out"
    code, out, _ = _build(capsys, folder, "--out", dest, "--captions", manifest)
    assert code == 0
    assert _summary(out)[4] == "1 missing caption, 1 undecodable image"
    _check_images(dest, good)


def _document(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "é", "日本", "\t"]
    return "".join(
        " ".join(rng.choice(words) for _ in range(rng.randrange(0, 20))) + "\n"
        for _ in range(lines)
    )


def test_text_file_is_chunked_at_line_boundaries(tmp_path, capsys):
    """Samples hold whole lines, at most --chars-per-sample characters, packed greedily; their
    concatenation is the input text."""
    text = _document(0, 200)
    source = tmp_path / "doc.txt"
    source.write_text(text, encoding="utf-8")
    dest = tmp_path / "out"
    code, out, _ = _build(capsys, source, "--out", dest, "--chars-per-sample", 300)
    assert code == 0
    chunks = [f["txt"].decode() for _, f in _samples(dest)]
    assert len(chunks) > 5
    assert _summary(out)[0] == len(chunks)
    assert "".join(chunks) == text
    for chunk, following in zip(chunks, chunks[1:]):
        assert chunk.endswith("\n")
        assert len(chunk) + len(following.splitlines(keepends=True)[0]) > 300  # greedy
    assert all(0 < len(c) <= 300 for c in chunks)
    metas = [json.loads(f["json"]) for _, f in _samples(dest)]
    assert [m["length"] for m in metas] == [len(c) for c in chunks]

    exact = tmp_path / "exact.txt"  # 10-character lines fill 30-character samples exactly
    exact.write_text("".join(f"line {i:04d}\n" for i in range(7)))
    assert _build(capsys, exact, "--out", tmp_path / "exact", "--chars-per-sample", 30)[0] == 0
    sizes = [len(f["txt"].decode()) for _, f in _samples(tmp_path / "exact")]
    assert sizes == [30, 30, 10]


def test_text_folder_keeps_documents_apart(tmp_path, capsys):
    """--kind text reads every .txt of a folder in order; no sample spans two documents."""
    folder = tmp_path / "texts"
    folder.mkdir()
    docs = {"a.txt": _document(1, 40), "b.txt": _document(2, 30)}
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    dest = tmp_path / "out"
    code = _build(capsys, folder, "--kind", "text", "--out", dest, "--chars-per-sample", 250)[0]
    assert code == 0
    got = [(json.loads(f["json"])["source"], f["txt"].decode()) for _, f in _samples(dest)]
    for name, text in docs.items():
        assert "".join(t for source, t in got if source == name) == text
    assert [s for s, _ in got] == sorted(s for s, _ in got)


def test_text_trailing_blank_lines_are_kept(tmp_path, capsys):
    """Blank lines at the end of a document are part of the text written."""
    text = "abcdefghi\n\n\n"
    source = tmp_path / "doc.txt"
    source.write_text(text)
    assert _build(capsys, source, "--out", tmp_path / "out", "--chars-per-sample", 10)[0] == 0
    assert "".join(f["txt"].decode() for _, f in _samples(tmp_path / "out")) == text


def test_cli_summary_counts_samples_shards_and_bytes(tmp_path, capsys):
    """The summary line reports what is on disk: samples, shards, megabytes and destination."""
    dest = tmp_path / "digits"
    code, out, _ = _build(
        capsys, "builtin:digits", "--out", dest, "--limit", 25, "--shard-size", 10, "--size", 64
    )
    assert code == 0
    urls = expand_urls(str(dest))
    on_disk = sum(os.path.getsize(u) for u in urls)
    assert _summary(out) == (25, 3, f"{on_disk / 1e6:.1f}", str(dest), "none")
    assert on_disk > 100_000  # so the MB figure is not a trivial 0.0
    assert [len(load_index(u).samples) for u in urls] == [10, 10, 5]


def test_cli_as_a_module_in_a_subprocess(tmp_path):
    """``python -m data_pipeline.build`` runs from the repository and prints the summary;
    a mistake exits 2 with one error line."""

    def run(*argv):
        return subprocess.run(
            [sys.executable, "-m", "data_pipeline.build", *map(str, argv)],
            cwd=REPO,
            env=launch_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    dest = tmp_path / "digits"
    ok = run("builtin:digits", "--out", dest, "--limit", 12, "--shard-size", 5)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert _summary(ok.stdout)[:2] == (12, 3)
    assert len(_samples(dest)) == 12
    bad = run("builtin:mnist", "--out", tmp_path / "bad")
    assert bad.returncode == 2
    assert "error: unknown built-in source 'builtin:mnist'" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


def _wrong_csv(tmp_path: Path) -> Path:
    path = tmp_path / "wrong.csv"
    path.write_text("path,text\na.png,a caption\n")
    return path


def _wrong_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "wrong.jsonl"
    path.write_text(json.dumps({"image": "a.png", "caption": "a caption"}) + "\n")
    return path


MISTAKES = {
    "unknown builtin": (lambda t, f: ["builtin:cifar"], "unknown built-in source"),
    "missing folder": (lambda t, f: [t / "nowhere"], "does not exist"),
    "csv wrong columns": (lambda t, f: [f, "--captions", _wrong_csv(t)], "needs 'file' and"),
    "jsonl wrong keys": (lambda t, f: [f, "--captions", _wrong_jsonl(t)], "needs 'file' and"),
    "missing manifest": (lambda t, f: [f, "--captions", t / "none.csv"], "does not exist"),
    "bad sizes": (lambda t, f: ["builtin:digits", "--sizes", "32by32"], "--sizes: '32by32'"),
    "half size": (lambda t, f: ["builtin:digits", "--sizes", "32x32,48x"], "--sizes: '48x'"),
    "empty folder": (lambda t, f: [t], "no images"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_user_mistakes_exit_2_with_one_error_line(case, image_folder, tmp_path, capsys):
    """Each user mistake returns 2, prints ``error: ...`` and writes no shard."""
    folder, _ = image_folder
    empty = tmp_path / "empty"
    empty.mkdir()
    make_args, message = MISTAKES[case]
    source = empty if case == "empty folder" else tmp_path
    dest = tmp_path / "out"
    code, out, err = _build(capsys, *make_args(source, folder), "--out", dest)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert message in err
    assert out == ""
    assert not dest.exists() or not list(dest.iterdir())


@pytest.mark.parametrize("flag", [["--sizes", "0x32"], ["--size", "0"]])
def test_zero_image_size_is_a_user_mistake(flag, tmp_path, capsys):
    """A zero width or height is reported as an error, not a traceback."""
    code, _, err = _build(capsys, "builtin:digits", *flag, "--limit", 2, "--out", tmp_path)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ")


def test_jsonl_manifest_row_that_is_not_an_object(image_folder, tmp_path, capsys):
    """A jsonl line that is valid JSON but not an object is a user mistake (exit 2)."""
    folder, _ = image_folder
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text('{"file": "a.png", "caption": "a"}\n1\n')
    code, _, err = _build(capsys, folder, "--captions", manifest, "--out", tmp_path / "out")
    assert code == 2
    assert "error: " in err


def test_build_straight_to_s3(s3, capsys):
    """Digits built to s3://ckpts/digits are read back through the indexes on the server."""
    import s3fs

    dest = f"s3://ckpts/digits/{uuid.uuid4().hex[:8]}"  # moto's store outlives one server
    code, out, _ = _build(capsys, "builtin:digits", "--out", dest, "--limit", 10, "--shard-size", 4)
    assert code == 0
    assert _summary(out)[:2] == (10, 3)
    assert _summary(out)[3] == dest
    urls = expand_urls(dest)
    assert urls == [f"{dest}/shard-{i:06d}.tar" for i in range(3)]
    got = _samples(dest)
    assert len(got) == 10
    for _, fields in got:
        assert fields["txt"].decode() == f"a photo of the digit {WORDS[int(fields['cls'])]}"
        assert _decode(fields["png"]).size == (32, 32)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3})
    assert fs.exists(urls[0].removeprefix("s3://") + ".index.json")
