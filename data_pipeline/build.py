"""``python -m data_pipeline.build SOURCE --out DEST [options]``: write WebDataset shards.

SOURCE is one of:

* ``builtin:digits`` - scikit-learn's 8x8 handwritten digits (shipped inside the
  package), upscaled to ``--size`` (or several ``--sizes WxH,...`` for aspect buckets),
  captioned "a photo of the digit seven", with the class label;
* a folder of images (png/jpg/jpeg/webp), captioned by a sidecar ``NAME.txt`` next to
  each image or by ``--captions manifest.jsonl|.csv`` (columns/keys ``file``, ``caption``);
* ``builtin:tones`` - ``--num`` (default 512) synthetic clips at ``--sample-rate`` (default
  16000): the 8 notes C4..C5 as a pure or a bright (harmonics) tone, 0.5 to 2 s long,
  captioned "a pure tone at A4", stored as FLAC (see :mod:`data_pipeline.audio`);
* a folder of audio (wav/flac; ``--kind audio`` when it holds images too), captioned like
  an image folder;
* ``builtin:moving_digits`` - ``--num`` (512) clips of ``--frames`` (9) frames at ``--fps``
  (8): a digit of half the ``--size`` canvas gliding edge to edge left, right, up or down,
  captioned "the digit three moving left", H.264 mp4 (see :mod:`data_pipeline.video`);
* a folder of videos (mp4; ``--kind video`` when it holds other media too);
* ``builtin:arith`` - ``--num`` lines ``A + B = C`` (A, B uniform in 0..99, seeded by
  ``--seed``), one line per sample (see :mod:`data_pipeline.arith`);
* text files (``.txt``, or a folder of them with ``--kind text``) for language models:
  documents are cut at line boundaries into samples of at most ``--chars-per-sample``;
* with ``--tokenizer``: also a folder or URL of text shards (the ``txt`` of each sample).

``--tokenizer TOK.model`` writes token shards instead of text: each sample (document)
becomes ``tokens.npy`` (int32 ids, EOS appended, no BOS), and every shard index records
the token counts and the tokenizer's sha256 (see :mod:`data_pipeline.text_tokens`).

DEST is a folder or fsspec URL (``s3://bucket/prefix``). A progress bar runs while
writing; a summary (samples, shards, bytes, skipped items and why) ends the run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec

from data_pipeline.shards import ShardWriter

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_EXTS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
MOTIONS = ("left", "right", "up", "down")

Sample = tuple[str, dict[str, bytes], dict[str, Any]]


class BuildError(ValueError):
    """A user mistake in the build command (bad source, unreadable manifest)."""


def digit_caption(label: int) -> str:
    return f"a photo of the digit {DIGIT_WORDS[label]}"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        w, sep, h = item.strip().lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
            raise BuildError(f"--sizes: {item!r} is not WIDTHxHEIGHT with positive sides")
        sizes.append((int(w), int(h)))
    return sizes


def digits_samples(
    sizes: list[tuple[int, int]], limit: int | None, skipped: Counter
) -> Iterator[Sample]:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = len(digits.images) if limit is None else min(limit, len(digits.images))
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        pixels = (digits.images[i] / 16.0 * 255).clip(0, 255).astype(np.uint8)
        image = (
            Image.fromarray(pixels, mode="L").resize((width, height), Image.BILINEAR).convert("RGB")
        )
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        label = int(digits.target[i])
        meta = {
            "width": width,
            "height": height,
            "aspect": width / height,
            "label": label,
            "source": "sklearn-digits",
            "index": i,
        }
        yield (
            f"{i:06d}",
            {
                "png": buf.getvalue(),
                "txt": digit_caption(label).encode(),
                "cls": str(label).encode(),
                "json": json.dumps(meta).encode(),
            },
            meta,
        )


def motion_caption(label: int, motion: str) -> str:
    return f"the digit {DIGIT_WORDS[label]} moving {motion}"


def moving_digits_samples(
    num: int, size: int, frames: int, fps: int, seed: int, video_format: str = "mp4"
) -> Iterator[Sample]:
    """scikit-learn's digits (half the canvas side) gliding across a ``size`` canvas over
    ``frames`` frames in one of four directions, edge to edge; the other coordinate and
    the digit image are drawn from ``seed``. ``video_format``: an ``mp4`` member (H.264)
    or the raw ``npy`` frames."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from data_pipeline.video import encode_mp4, npy_frames

    if video_format not in ("mp4", "npy"):
        raise BuildError(f"--video-format must be mp4 or npy, not {video_format!r}")

    digits = load_digits()
    rng = np.random.default_rng([seed, 2417])
    side = size // 2
    travel = size - side
    for i in range(num):
        index = int(rng.integers(len(digits.images)))
        label, motion = int(digits.target[index]), MOTIONS[i % len(MOTIONS)]
        pixels = (digits.images[index] / 16.0 * 255).clip(0, 255).astype(np.uint8)
        glyph = np.asarray(Image.fromarray(pixels).resize((side, side), Image.BILINEAR))
        across = int(rng.integers(0, travel + 1))
        video = np.zeros((frames, size, size, 3), dtype=np.uint8)
        for t in range(frames):
            step = round(travel * t / max(1, frames - 1))
            along = {"right": step, "left": travel - step, "down": step, "up": travel - step}[
                motion
            ]
            y, x = (across, along) if motion in ("left", "right") else (along, across)
            video[t, y : y + side, x : x + side] = glyph[:, :, None]
        meta = {"width": size, "height": size, "aspect": 1.0, "frames": frames, "fps": fps,
                "duration": frames / fps, "label": label, "motion": motion,
                "source": "sklearn-digits-moving", "index": i}  # fmt: skip
        fields = {
            video_format: encode_mp4(video, fps) if video_format == "mp4" else npy_frames(video),
            "txt": motion_caption(label, motion).encode(),
            "cls": str(label).encode(),
            "json": json.dumps(meta).encode(),
        }
        yield f"{i:06d}", fields, meta


def _read_manifest(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise BuildError(f"--captions: {path} does not exist")
    rows: list[dict[str, Any]]
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise BuildError(
                        f"--captions: {path}:{number}: not valid JSON ({err.msg})"
                    ) from None
    elif path.suffix == ".csv":
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        raise BuildError(f"--captions: {path} must be .jsonl or .csv")
    out = {}
    for row in rows:
        if not isinstance(row, dict) or "file" not in row or "caption" not in row:
            raise BuildError(f"--captions: every row of {path} needs 'file' and 'caption'")
        out[str(row["file"])] = str(row["caption"])
    return out


def _describe_image(data: bytes) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(err) from None
    return {"width": width, "height": height, "aspect": width / height}


def media_folder_samples(
    files: list[Path], root: Path, captions: dict[str, str] | None, limit: int | None,
    skipped: Counter, kind: str, exts: dict[str, str],
    describe: Callable[[bytes], dict[str, Any]],
) -> Iterator[Sample]:  # fmt: skip
    """Media files of one ``kind`` under ``root``, captioned by the manifest ``captions``
    (relative path or file name) or a sidecar NAME.txt; ``describe`` gives each file's
    planning metadata and raises ValueError for one it cannot decode (skipped, counted)."""
    written = 0
    for path in files:
        if limit is not None and written >= limit:
            return
        rel = path.relative_to(root).as_posix()
        if captions is not None:
            caption = captions.get(rel, captions.get(path.name))
        else:
            sidecar = path.with_suffix(".txt")
            caption = sidecar.read_text().strip() if sidecar.is_file() else None
        if not caption:
            skipped["missing caption"] += 1
            continue
        data = path.read_bytes()
        try:
            meta = {**describe(data), "source": rel}
        except ValueError:
            skipped[f"undecodable {kind}"] += 1
            continue
        fields = {exts[path.suffix.lower()]: data, "txt": caption.encode()}
        yield f"{written:08d}", {**fields, "json": json.dumps(meta).encode()}, meta
        written += 1


def folder_samples(
    folder: Path, manifest: Path | None, limit: int | None, skipped: Counter
) -> Iterator[Sample]:
    captions = _read_manifest(manifest) if manifest else None
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise BuildError(f"no images (png/jpg/jpeg/webp) under {folder}")
    return media_folder_samples(
        files, folder, captions, limit, skipped, "image", IMAGE_EXTS, _describe_image
    )


def text_samples(
    paths: list[Path], chars_per_sample: int, limit: int | None, skipped: Counter
) -> Iterator[Sample]:
    written = 0
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            skipped["not UTF-8 text"] += 1
            continue
        chunk: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            if size + len(line) > chars_per_sample and chunk:
                yield _text_sample(written, "".join(chunk), path)
                written += 1
                if limit is not None and written >= limit:
                    return
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk and text.strip():  # trailing blank lines belong to the last sample
            yield _text_sample(written, "".join(chunk), path)
            written += 1
            if limit is not None and written >= limit:
                return
        elif not text.strip():
            skipped["empty text file"] += 1


def _text_sample(index: int, text: str, path: Path) -> Sample:
    meta = {"length": len(text), "source": path.name}
    return f"{index:08d}", {"txt": text.encode(), "json": json.dumps(meta).encode()}, meta


def arith_samples(num: int, seed: int) -> Iterator[Sample]:
    from data_pipeline.arith import arith_lines

    for i, line in enumerate(arith_lines(num, seed)):
        yield f"{i:08d}", {"txt": line.encode()}, {"length": len(line)}


def _text_shard_urls(source: str) -> list[str] | None:
    """Shards of a folder / URL / pattern of ``.tar`` files; None when it holds none."""
    from data_pipeline.shards import expand_urls

    try:
        return expand_urls(source)
    except (FileNotFoundError, NotADirectoryError):
        return None


def text_shard_samples(urls: list[str], limit: int | None, skipped: Counter) -> Iterator[Sample]:
    """The ``txt`` of every sample of existing shards, in order (keys kept)."""
    from data_pipeline.shards import load_index, parse_sample

    written = 0
    for url in urls:
        index = load_index(url)
        with fsspec.open(url, "rb") as fh:  # sequential reads: fsspec reads ahead
            for entry in index.samples:
                if limit is not None and written >= limit:
                    return
                fh.seek(entry.offset)
                fields = parse_sample(fh.read(entry.size))
                if "txt" not in fields:
                    skipped["sample without txt"] += 1
                    continue
                yield entry.key, {"txt": fields["txt"]}, {}
                written += 1


def build(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    skipped: Counter = Counter()
    source = args.source
    tokenizer = None
    if args.tokenizer:
        from data_pipeline.tokenizer import Tokenizer, TokenizerError

        try:
            tokenizer = Tokenizer.load(args.tokenizer)
        except TokenizerError as err:
            raise BuildError(f"--tokenizer: {err}") from None
    shard_urls = (
        _text_shard_urls(source)
        if tokenizer is not None and not source.startswith("builtin:")
        else None
    )
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name == "moving_digits":
            num = args.num if args.num is not None else 512
            total = num if args.limit is None else min(num, args.limit)
            samples = moving_digits_samples(
                total, args.size, args.frames, args.fps, args.seed, args.video_format
            )
        elif name in ("arith", "tones"):
            num = args.num if args.num is not None else (100_000 if name == "arith" else 512)
            total = num if args.limit is None else min(num, args.limit)
            if name == "arith":
                samples = arith_samples(total, args.seed)
            else:
                from data_pipeline.audio import tones_samples

                samples = tones_samples(total, args.sample_rate, args.seed)
        elif name == "digits":
            sizes = parse_sizes(args.sizes) if args.sizes else [(args.size, args.size)]
            samples = digits_samples(sizes, args.limit, skipped)
            total = args.limit or 1797
        else:
            raise BuildError(
                f"unknown built-in source {source!r}; available: builtin:digits, "
                "builtin:moving_digits, builtin:tones, builtin:arith"
            )
        if tokenizer is not None and name != "arith":
            raise BuildError(f"--tokenizer: builtin:{name} is not text")
    elif shard_urls:
        samples = text_shard_samples(shard_urls, args.limit, skipped)
        total = args.limit
    else:
        path = Path(source)
        if not path.exists():
            raise BuildError(f"source {source} does not exist")
        if path.is_file() or args.kind == "text":
            files = [path] if path.is_file() else sorted(path.rglob("*.txt"))
            if not files:
                raise BuildError(f"no .txt files under {source}")
            samples = text_samples(files, args.chars_per_sample, args.limit, skipped)
        else:
            from data_pipeline.audio import AUDIO_EXTS, describe_audio
            from data_pipeline.video import VIDEO_EXTS, probe

            audio = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTS)
            videos = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_EXTS)
            images = any(p.suffix.lower() in IMAGE_EXTS for p in path.rglob("*"))
            manifest = Path(args.captions) if args.captions else None
            only = args.kind == "auto" and not images
            if args.kind == "video" or (only and videos and not audio):
                if not videos:
                    raise BuildError(f"no videos (mp4) under {source}")
                captions = _read_manifest(manifest) if manifest else None
                samples = media_folder_samples(
                    videos, path, captions, args.limit, skipped, "video", VIDEO_EXTS, probe
                )
            elif args.kind == "audio" or (only and audio):
                if not audio:
                    raise BuildError(f"no audio (wav/flac) under {source}")
                captions = _read_manifest(manifest) if manifest else None
                samples = media_folder_samples(
                    audio, path, captions, args.limit, skipped, "audio", AUDIO_EXTS, describe_audio
                )
            else:
                samples = folder_samples(path, manifest, args.limit, skipped)
        total = args.limit
    index_meta = {}
    if tokenizer is not None:
        from data_pipeline.text_tokens import CHECKSUM_KEY, token_samples, tokenizer_checksum

        samples = token_samples(samples, tokenizer)
        index_meta = {CHECKSUM_KEY: tokenizer_checksum(tokenizer), "tokenizer": args.tokenizer}
    with ShardWriter(
        args.out,
        prefix=args.prefix,
        max_samples=args.shard_size,
        max_bytes=args.max_bytes,
        index_meta=index_meta,
    ) as writer:
        for key, fields, meta in tqdm(
            samples, total=total, desc="build", unit="sample", file=sys.stderr
        ):
            writer.write(key, fields, meta)
    return {**writer.summary, "skipped": dict(skipped), "out": args.out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.build", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "source",
        help="builtin:digits, builtin:moving_digits, builtin:tones, builtin:arith, a folder of "
        "images, audio or videos, text file(s), "
        "or (with --tokenizer) text shards",
    )
    parser.add_argument("--out", required=True, help="destination folder or fsspec URL")
    parser.add_argument(
        "--kind",
        choices=["auto", "images", "audio", "video", "text"],
        default="auto",
        help="how to read a folder",
    )
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="samples per shard (default 1000)"
    )
    parser.add_argument("--max-bytes", type=int, default=256 << 20, help="bytes per shard at most")
    parser.add_argument("--prefix", default="shard", help="shard file prefix")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    parser.add_argument("--size", type=int, default=32, help="digits: square side in pixels")
    parser.add_argument(
        "--sizes", default=None, help="digits: WxH[,WxH...] cycled over samples (aspect buckets)"
    )
    parser.add_argument(
        "--captions", default=None, help="image folder: manifest .jsonl/.csv with file, caption"
    )
    parser.add_argument(
        "--chars-per-sample", type=int, default=4096, help="text: characters per sample at most"
    )
    parser.add_argument(
        "--num", type=int, default=None, help="arith: lines (default 100000); tones: clips (512)"
    )
    parser.add_argument("--seed", type=int, default=0, help="arith, tones: seed (default 0)")
    parser.add_argument(
        "--sample-rate", type=int, default=16000, help="tones: samples per second (default 16000)"
    )
    parser.add_argument("--frames", type=int, default=9, help="moving_digits: frames per clip")
    parser.add_argument("--fps", type=int, default=8, help="moving_digits: frames per second")
    parser.add_argument(
        "--video-format",
        choices=("mp4", "npy"),
        default="mp4",
        help="moving_digits: H.264 mp4 members or raw npy frame arrays (lossless)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="sentencepiece .model: write token shards (tokens.npy per document) instead of text",
    )
    args = parser.parse_args(argv)
    if (args.num is not None and args.num < 0) or min(args.sample_rate, args.frames, args.fps) < 1:
        print("error: --num must be >= 0, --sample-rate, --frames and --fps >= 1", file=sys.stderr)
        return 2
    if args.shard_size < 1 or args.max_bytes < 1024 or args.size < 1:
        print(
            "error: --shard-size and --size must be >= 1 and --max-bytes >= 1024", file=sys.stderr
        )
        return 2
    try:
        summary = build(args)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "none"
    print(
        f"wrote {summary['samples']} samples in {summary['shards']} shards ({summary['bytes'] / 1e6:.1f} MB) "
        f"to {summary['out']}; skipped: {skipped}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
