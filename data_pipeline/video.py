"""Video samples: mp4 encoding, what a folder's clips hold, and the loader's decode step (PyAV).
The built-in moving digits are a build source (``data_pipeline.build``).

Shards hold ``mp4`` members (H.264, yuv420p) or raw ``npy`` frame arrays ((T, H, W, 3)
uint8, lossless, larger), and a ``json`` with ``{"width", "height", "frames", "fps",
"duration"}``. The loader returns, per sample, ``x`` (3, T, H, W) float in [-1, 1]:
``num_frames`` consecutive frames (at ``data.fps`` when set: the frame shown at each
1 / fps step, so a 30 fps and a 10 fps clip give the same motion per frame) from a start
drawn from (seed, epoch, sample) (the first frames at evaluation), each resized to cover
the bucket resolution and centre-cropped. A clip with fewer frames than asked is a bad
sample (skipped and counted).

Shapes: T frames, H x W pixels.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch

VIDEO_EXTS = {".mp4": "mp4"}


class VideoError(ValueError):
    """A clip the recipe cannot use (too short)."""


def encode_mp4(frames_THWC: np.ndarray, fps: int, crf: int = 12) -> bytes:
    """uint8 RGB frames -> H.264 mp4 bytes (even sides; near-lossless at the default crf)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames_THWC.shape[2], frames_THWC.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def probe(data: bytes) -> dict:
    """(width, height, frames, fps, duration) of an encoded video; ValueError if undecodable."""
    import av

    try:
        return _probe(av, data)
    except Exception as err:  # PyAV raises its own error types for every broken container
        raise ValueError(err) from None


def _probe(av, data: bytes) -> dict:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        fps = float(stream.average_rate or 0) or None
        return {"width": stream.width, "height": stream.height, "aspect": stream.width / stream.height,
                "frames": frames, "fps": fps, "duration": frames / fps if fps else None}  # fmt: skip


def npy_frames(frames_THWC: np.ndarray) -> bytes:
    """(T, H, W, 3) uint8 frames -> the bytes of a raw ``npy`` member."""
    if frames_THWC.dtype != np.uint8 or frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(
            f"frames must be (T, H, W, 3) uint8, got {frames_THWC.shape} {frames_THWC.dtype}"
        )
    buf = io.BytesIO()
    np.save(buf, frames_THWC, allow_pickle=False)
    return buf.getvalue()


def read_frames(fields: dict[str, bytes]) -> tuple[list[np.ndarray], float | None]:
    """A sample's frames (each (H, W, 3) uint8) and their rate (None: unknown), from its
    ``mp4`` (decoded with PyAV) or ``npy`` member (the rate from its ``json``)."""
    if "mp4" in fields:
        import av

        with av.open(io.BytesIO(fields["mp4"])) as container:
            rate = container.streams.video[0].average_rate
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        return frames, float(rate) if rate else None
    if "npy" in fields:
        array = np.load(io.BytesIO(fields["npy"]), allow_pickle=False)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise VideoError(
                f"npy frames must be (T, H, W, 3) uint8, got {array.shape} {array.dtype}"
            )
        meta = json.loads(fields["json"]) if "json" in fields else {}
        return list(array), float(meta["fps"]) if meta.get("fps") else None
    raise ValueError("no video member (mp4 or npy)")


def frame_indices(
    available: int, source_fps: float | None, fps: float | None, frames: int,
    rng: np.random.Generator | None,
) -> list[int]:  # fmt: skip
    """Which of ``available`` source frames make a clip of ``frames`` at ``fps``: the
    frame on screen at each 1 / fps step from a start drawn by ``rng`` (the first without
    one). ``fps`` None: consecutive source frames."""
    if fps is not None and source_fps is None:
        raise VideoError("clip has no frame rate to resample to data.fps from")
    ratio = 1.0 if fps is None else source_fps / fps  # source frames per output frame
    usable = math.floor((available - 1) / ratio + 1e-9) + 1  # output frames the clip spans
    if usable < frames:
        at = "" if fps is None else f" at {fps:g} fps ({available} at {source_fps:g})"
        raise VideoError(f"clip has {usable} frames{at}, fewer than data.num_frames {frames}")
    start = int(rng.integers(0, usable - frames + 1)) if rng is not None else 0
    return [math.floor((start + k) * ratio + 1e-9) for k in range(frames)]


def decode_video(
    data: bytes | dict[str, bytes],
    *,
    frames: int,
    width: int,
    height: int,
    rng: np.random.Generator | None,
    fps: float | None = None,
) -> torch.Tensor:
    """A sample's video (mp4 bytes, or its members: see :func:`read_frames`) ->
    (3, frames, height, width) in [-1, 1]: frames picked by :func:`frame_indices`, each
    resized to cover and centre-cropped."""
    from PIL import Image

    decoded, source_fps = read_frames(data if isinstance(data, dict) else {"mp4": data})
    out = []
    for index in frame_indices(len(decoded), source_fps, fps, frames, rng):
        array = decoded[index]
        image = Image.fromarray(array)
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        out.append(np.asarray(image.crop((left, top, left + width, top + height))))
    video = torch.from_numpy(np.stack(out)).float() / 127.5 - 1.0  # (T, H, W, 3)
    return video.permute(3, 0, 1, 2).contiguous()


def to_uint8_frames(video_CTHW: np.ndarray) -> np.ndarray:
    """A clip in [-1, 1] (C, T, H, W) -> uint8 RGB frames (T, H, W, 3)."""
    frames = ((np.clip(video_CTHW, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    frames = frames.transpose(1, 2, 3, 0)
    return np.repeat(frames, 3, axis=-1) if frames.shape[-1] == 1 else frames


def write_video_samples(
    videos_NCTHW: np.ndarray,
    out_dir: Path,
    tag: str,
    fps: int = 8,
    prompts: list[str] | None = None,
    *,
    per_clip: str = "{tag}_{i:03d}.mp4",
) -> None:
    """Generated clips -> an mp4 per clip (``per_clip`` names it) and ``{tag}.png``: the
    frames of each clip in a row, labelled with its prompt (the quick look)."""
    from data_pipeline.grid import save_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    for i, video in enumerate(videos_NCTHW):
        frames = to_uint8_frames(video)
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2  # H.264 needs even sides
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        path = out_dir / per_clip.format(tag=tag, i=i)
        tmp = path.with_name(path.name + ".tmp.mp4")
        tmp.write_bytes(encode_mp4(frames, fps))
        tmp.replace(path)
    n, c, t, h, w = videos_NCTHW.shape
    strips = videos_NCTHW.transpose(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    save_grid(strips, out_dir / f"{tag}.png", columns=t, row_labels=prompts)
