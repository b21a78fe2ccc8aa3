"""Video shards: the built-in moving digits and video folders build, and the loader decodes
clips of num_frames at the bucket resolution, resumes exactly, and skips and counts clips
that are too short or undecodable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from configlib import ConfigError
from data_pipeline.build import main as build_main
from data_pipeline.loader import DataError, WebDatasetConfig, WebDatasetSource
from data_pipeline.shards import ShardWriter
from data_pipeline.video import VideoError, encode_mp4, frame_indices, npy_frames
from trainer.registry import load_config


@pytest.fixture(scope="module")
def moving(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moving") / "moving"
    args = ["builtin:moving_digits", "--out", str(out), "--num", "32", "--size", "16"]
    assert build_main([*args, "--shard-size", "8"]) == 0
    return out


def video_source(urls, *, rank=0, world=1, micro=4, **cfg) -> WebDatasetSource:
    config = WebDatasetConfig(
        urls=str(urls), kind="video", **{"resolutions": [(16, 16)], "num_frames": 9, **cfg}
    )
    return WebDatasetSource(
        config, seed=0, rank=rank, world_size=world, micro_batch=micro, accum_steps=1
    )


def centre(frame_HW: torch.Tensor) -> tuple[float, float]:
    weight = (frame_HW + 1).clamp_min(0)
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    return float((weight * ys).sum() / weight.sum()), float((weight * xs).sum() / weight.sum())


def test_moving_digits_move_as_their_captions_say(moving):
    src = video_source(moving, micro=16)
    try:
        batch = src.next_batch()
    finally:
        src.close()
    assert batch["x"].shape == (16, 3, 9, 16, 16) and batch["x"].min() >= -1
    for clip, caption in zip(batch["x"], batch["caption"], strict=True):
        (y0, x0), (y1, x1) = centre(clip[0, 0]), centre(clip[0, -1])
        dy, dx = y1 - y0, x1 - x0
        moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}[caption.rsplit(" ", 1)[1]]
        assert moved > 4.0, (caption, dy, dx)  # 8 px edge to edge, blurred by H.264


def test_video_windows_resume_exactly_on_another_number_of_ranks(moving):
    straight = video_source(moving, micro=4, num_frames=5)
    try:
        expected = [straight.next_batch() for _ in range(4)]
    finally:
        straight.close()
    first = [video_source(moving, rank=r, world=2, micro=2, num_frames=5) for r in range(2)]
    try:
        for _ in range(2):
            for s in first:
                s.next_batch()
        states = [s.state_dict() for s in first]
    finally:
        for s in first:
            s.close()
    resumed = video_source(moving, micro=4, num_frames=5)
    try:
        resumed.load_state_dict(states)
        for step in (2, 3):
            batch = resumed.next_batch()
            assert batch["key"] == expected[step]["key"]
            assert torch.equal(batch["x"], expected[step]["x"])  # same random start frames
    finally:
        resumed.close()


def test_short_and_broken_clips_are_skipped_counted_then_bounded(tmp_path):
    clip = (np.random.default_rng(0).random((9, 16, 16, 3)) * 255).astype(np.uint8)
    good, short = encode_mp4(clip, 8), encode_mp4(clip[:4], 8)
    with ShardWriter(str(tmp_path / "mixed"), max_samples=10**9) as writer:
        for i, data in enumerate([good] * 48 + [short, b"not an mp4"]):
            meta = {"width": 16, "height": 16}
            writer.write(
                f"v{i:03d}", {"mp4": data, "txt": b"x", "json": json.dumps(meta).encode()}, meta
            )
    src = video_source(tmp_path / "mixed", micro=50, max_corrupt_fraction=0.05)
    try:
        src.next_batch()
        assert sum(src.corrupt.values()) == 2
    finally:
        src.close()
    src = video_source(tmp_path / "mixed", micro=50, max_corrupt_fraction=0.01)
    try:
        with pytest.raises(DataError, match="2 samples failed to read or decode"):
            src.next_batch()
    finally:
        src.close()


def counter_clip(frames: int) -> np.ndarray:
    """Frame i is uniformly grey level 8 i: which source frame a clip shows is readable."""
    return np.repeat(np.arange(frames, dtype=np.uint8)[:, None, None, None] * 8, 16 * 48).reshape(
        frames, 16, 16, 3
    )


def write_clips(url: Path, member: str, fps: int, frames: int = 24) -> None:
    clip = counter_clip(frames)
    data = encode_mp4(clip, fps) if member == "mp4" else npy_frames(clip)
    with ShardWriter(str(url), max_samples=10**9) as writer:
        for i in range(4):
            meta = {"width": 16, "height": 16, "frames": frames, "fps": fps}
            fields = {member: data, "txt": b"grey", "json": json.dumps(meta).encode()}
            writer.write(f"c{i}", fields, meta)


def source_frames(video_CTHW: torch.Tensor) -> list[int]:
    """The source frame each output frame shows (grey level / 8)."""
    levels = (video_CTHW[0].mean((1, 2)) + 1) * 127.5
    return [round(float(v) / 8) for v in levels]


@pytest.mark.parametrize("member", ["mp4", "npy"])
def test_data_fps_resamples_clips_to_the_frame_on_screen(tmp_path, member):
    # a 24 fps and a 12 fps clip read at 6 fps: every 4th and every 2nd source frame
    for fps, stride in ((24, 4), (12, 2)):
        url = tmp_path / f"{member}{fps}"
        write_clips(url, member, fps)
        src = video_source(url, micro=4, num_frames=5, fps=6.0)
        try:
            batch = src.next_batch()
        finally:
            src.close()
        for clip in batch["x"]:
            shown = source_frames(clip)
            assert np.diff(shown).tolist() == [stride] * 4, (fps, shown)
        own = video_source(url, micro=4, num_frames=5)  # fps null: consecutive frames
        try:
            assert np.diff(source_frames(own.next_batch()["x"][0])).tolist() == [1] * 4
        finally:
            own.close()


def test_frame_indices_bound_a_clip_by_its_duration_at_the_target_rate():
    assert frame_indices(24, 24.0, 6.0, 6, rng=None) == [0, 4, 8, 12, 16, 20]
    assert frame_indices(9, 8.0, 16.0, 17, rng=None) == [i // 2 for i in range(17)]  # upsampled
    with pytest.raises(
        VideoError, match="clip has 6 frames at 6 fps .24 at 24., fewer than data.num_frames 7"
    ):
        frame_indices(24, 24.0, 6.0, 7, rng=None)
    with pytest.raises(VideoError, match="no frame rate"):
        frame_indices(24, None, 6.0, 4, rng=None)
    starts = {frame_indices(24, 24.0, 6.0, 3, np.random.default_rng(s))[0] for s in range(40)}
    assert starts == {0, 4, 8, 12}  # whole output steps, every start that fits


def test_raw_npy_shards_decode_to_the_exact_frames_and_build_from_the_cli(tmp_path):
    args = ["builtin:moving_digits", "--num", "8", "--size", "16"]
    assert build_main([*args, "--out", str(tmp_path / "raw"), "--video-format", "npy"]) == 0
    assert build_main([*args, "--out", str(tmp_path / "mp4")]) == 0
    raw, coded = video_source(tmp_path / "raw", micro=8), video_source(tmp_path / "mp4", micro=8)
    try:
        lossless, lossy = raw.next_batch(), coded.next_batch()
    finally:
        raw.close()
        coded.close()
    values = set(np.unique((lossless["x"].numpy() + 1) * 127.5).round().astype(int).tolist())
    assert values <= set(range(256)) and lossless["x"].shape == lossy["x"].shape
    # the same clips (same seed): npy is exact, H.264 only close
    assert lossless["key"] == lossy["key"]
    assert 0 < float((lossless["x"] - lossy["x"]).abs().mean()) < 0.1
    with pytest.raises(SystemExit):  # argparse: one line on stderr, exit 2
        build_main([*args, "--out", str(tmp_path / "gif"), "--video-format", "gif"])


def test_a_video_folder_builds_and_skips_undecodable_files(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(encode_mp4(np.zeros((9, 16, 16, 3), np.uint8), 8))
    (folder / "a.txt").write_text("a black clip")
    (folder / "b.mp4").write_bytes(b"garbage")
    (folder / "b.txt").write_text("never read")
    assert build_main([str(folder), "--out", str(tmp_path / "out")]) == 0
    index = json.loads(next((tmp_path / "out").glob("*.index.json")).read_text())
    ((_key, _offset, _size, meta),) = index["samples"]
    assert meta["frames"] == 9 and meta["width"] == 16


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["data.num_frames=8"], "data.num_frames: 8: the video_vae needs 1 + 2 * k frames"),
        (["data.resolutions=[[15, 16]]"], "data.resolutions[0]: [15, 16] is not divisible by the downsampling factor 2"),
        (["data.kind=images"], "data.kind: 'images': a video_vae trains on kind 'video'"),
    ],
)  # fmt: skip
def test_video_recipes_that_do_not_fit_get_one_line(overrides, problem):
    with pytest.raises(ConfigError) as err:
        load_config("recipes/tiny/video_vae.yaml", overrides)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_the_video_vae_trains_with_the_patchgan_and_perceptual_net_on_frames(moving, tmp_path):
    """The reference recipe's path on the tiny model: discriminator and feature network see
    frames (B * T, 3, H, W); both phases step and evaluation draws the frame strips."""
    import torch.nn as nn

    from cluster.env import DistEnv
    from trainer import distributed as D
    from trainer.loop import Trainer

    net = tmp_path / "features.pt"
    torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())).save(str(net))
    cfg = load_config(
        "recipes/tiny/video_vae.yaml",
        [f"run.output_dir={tmp_path / 'run'}", f"data.urls={moving}", "run.max_steps=3",
         "objective.gan_weight=0.1", "objective.gan_start_step=0", "objective.disc_channels=8",
         "objective.disc_layers=1", f"objective.perceptual={net}", "train.log_every=1",
         "eval.every=3", "checkpoint.every=3", "logging.progress_bar=false",
         "data.num_workers=1", "train.batch_size=4", "objective.eval_images=2",
         "schedule.warmup_steps=1"],
    )  # fmt: skip
    trainer = Trainer(cfg, DistEnv("single"))
    try:
        assert trainer.run() == 0
    finally:
        D.close()
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(records) == 3 and all(r["perceptual"] > 0 for r in records)
    assert all(r["discriminator/loss"] > 0 and r["g_weight"] > 0 for r in records)
    assert (tmp_path / "run" / "samples" / "reconstructions_step00000003.png").is_file()


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
