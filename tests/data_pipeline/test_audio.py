"""Audio shards: the built-in tones and audio folders build, and the loader decodes them
into fixed windows with padding masks and timing, resumes on another rank count, resamples
only when asked, and skips and counts clips it cannot use."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from configlib import ConfigError
from data_pipeline.audio import NOTES, encode_flac, tone
from data_pipeline.build import main as build_main
from data_pipeline.loader import DataError, WebDatasetConfig, WebDatasetSource
from data_pipeline.shards import ShardWriter
from trainer.registry import load_config

RATE = 8000


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tones") / "tones"
    args = ["builtin:tones", "--out", str(out), "--num", "48", "--shard-size", "16"]
    assert build_main([*args, "--sample-rate", str(RATE)]) == 0
    return out


def audio_source(urls, *, rank=0, world=1, micro=4, **cfg) -> WebDatasetSource:
    config = WebDatasetConfig(
        urls=str(urls), kind="audio", **{"sample_rate": RATE, "window_seconds": 1.0, **cfg}
    )
    return WebDatasetSource(
        config, seed=0, rank=rank, world_size=world, micro_batch=micro, accum_steps=1
    )


def dominant_hz(x_T: torch.Tensor, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x_T.numpy()))
    return float(np.fft.rfftfreq(len(x_T), 1 / rate)[spectrum.argmax()])


def test_tones_decode_to_windows_with_masks_timing_and_their_pitch(tones):
    src = audio_source(tones, micro=16)
    try:
        batch = src.next_batch()
        assert src.sample_shape() == (1, RATE)
    finally:
        src.close()
    assert batch["x"].shape == (16, 1, RATE) and batch["mask"].shape == (16, RATE)
    assert batch["x"].abs().max() <= 1.0
    for i in range(16):
        meta_total = float(batch["seconds_total"][i])
        start = float(batch["seconds_start"][i])
        real = int(batch["mask"][i].sum())
        # a clip shorter than the 1 s window is padded after its end; a longer one is cropped
        assert real == min(RATE, round((meta_total - start) * RATE))
        assert 0 <= start <= max(0.0, meta_total - 1.0) + 1e-6
        assert batch["x"][i, 0, real:].abs().sum() == 0  # silence over the padding
        note = batch["caption"][i].rsplit(" ", 1)[1]
        # the caption's note is the clip's dominant frequency (1 Hz bins over the window)
        assert dominant_hz(batch["x"][i, 0], RATE) == pytest.approx(NOTES[note], abs=2.0)
    assert {round(float(t), 2) for t in batch["seconds_total"]} > {1.0}  # varied lengths


@pytest.mark.parametrize("resume_world", [1, 2])
def test_windows_resume_exactly_on_another_number_of_ranks(tones, resume_world):
    """2 ranks for 3 steps, saved, then `resume_world` ranks: the same samples with the
    same crops as one uninterrupted rank of the global batch."""
    straight = audio_source(tones, micro=8)
    try:
        expected = [straight.next_batch() for _ in range(6)]
    finally:
        straight.close()
    first = [audio_source(tones, rank=r, world=2, micro=4) for r in range(2)]
    try:
        for _ in range(3):
            for s in first:
                s.next_batch()
        states = [s.state_dict() for s in first]
    finally:
        for s in first:
            s.close()
    per = 8 // resume_world
    resumed = [
        audio_source(tones, rank=r, world=resume_world, micro=per) for r in range(resume_world)
    ]
    try:
        for s in resumed:
            s.load_state_dict(states)
        for step in range(3, 6):
            parts = [s.next_batch() for s in resumed]
            assert [k for p in parts for k in p["key"]] == expected[step]["key"]
            assert torch.equal(torch.cat([p["x"] for p in parts]), expected[step]["x"])
            starts = torch.cat([p["seconds_start"] for p in parts])
            assert torch.equal(starts, expected[step]["seconds_start"])
    finally:
        for s in resumed:
            s.close()


def test_another_sample_rate_stops_the_run_unless_resampling_is_on(tones):
    src = audio_source(tones, sample_rate=16000)
    try:
        with pytest.raises(DataError) as err:
            src.next_batch()
    finally:
        src.close()
    line = str(err.value)
    assert "\n" not in line and "sample rate 8000 Hz is not data.sample_rate 16000 Hz" in line
    assert "data.resample: true" in line
    src = audio_source(tones, sample_rate=16000, resample=True, micro=8)
    try:
        batch = src.next_batch()
    finally:
        src.close()
    assert batch["x"].shape == (8, 1, 16000)
    for i in range(8):
        note = batch["caption"][i].rsplit(" ", 1)[1]
        assert dominant_hz(batch["x"][i, 0], 16000) == pytest.approx(NOTES[note], abs=2.0)


def write_clips(dest: Path, clips: list[bytes]) -> None:
    with ShardWriter(str(dest), max_samples=10**9) as writer:
        for i, data in enumerate(clips):
            meta = {"sample_rate": RATE}
            writer.write(
                f"c{i:04d}",
                {"flac": data, "txt": b"a pure tone at A4", "json": json.dumps(meta).encode()},
                meta,
            )


def test_short_and_corrupt_clips_are_skipped_and_counted_then_bounded(tmp_path, caplog):
    good = encode_flac(tone(440.0, 1.0, RATE, "pure", 0.5)[:, None], RATE)
    short = encode_flac(tone(440.0, 0.2, RATE, "pure", 0.5)[:, None], RATE)
    write_clips(tmp_path / "mixed", [good] * 98 + [short, b"not a flac file"])
    src = audio_source(tmp_path / "mixed", micro=100, min_seconds=0.5, max_corrupt_fraction=0.05)
    try:
        with caplog.at_level(logging.WARNING):
            batch = src.next_batch()
        assert sum(src.corrupt.values()) == 2
    finally:
        src.close()
    assert batch["x"].shape == (100, 1, RATE) and bool((batch["mask"].sum(1) == RATE).all())
    assert "shorter than data.min_seconds 0.5" in caplog.text
    src = audio_source(tmp_path / "mixed", micro=100, min_seconds=0.5, max_corrupt_fraction=0.01)
    try:
        with pytest.raises(DataError, match="2 samples failed to read or decode, more than"):
            src.next_batch()
    finally:
        src.close()


def test_an_audio_folder_builds_with_captions_and_skips_unreadable_files(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    stereo = np.stack([tone(392.0, 0.5, 22050, "pure", 0.4)] * 2, axis=1)
    sf.write(folder / "g4.wav", stereo, 22050)
    (folder / "g4.txt").write_text("a pure tone at G4")
    sf.write(folder / "nocaption.flac", stereo, 22050)
    (folder / "broken.wav").write_bytes(b"RIFF garbage")
    (folder / "broken.txt").write_text("never read")
    out = tmp_path / "shards"
    assert build_main([str(folder), "--out", str(out)]) == 0
    src = audio_source(out, micro=1, sample_rate=22050, window_seconds=0.5, audio_channels=2)
    try:
        batch = src.next_batch()
    finally:
        src.close()
    assert batch["caption"] == ["a pure tone at G4"] and batch["x"].shape == (1, 2, 11025)
    assert dominant_hz(batch["x"][0, 1], 22050) == pytest.approx(392.0, abs=2.5)


def test_build_reports_skipped_audio(tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    buf = io.BytesIO()
    sf.write(buf, tone(440.0, 0.5, RATE, "pure", 0.4), RATE, format="WAV")
    (folder / "a.wav").write_bytes(buf.getvalue())
    (folder / "a.txt").write_text("a pure tone at A4")
    (folder / "b.wav").write_bytes(b"RIFF garbage")
    (folder / "b.txt").write_text("x")
    assert build_main([str(folder), "--out", str(tmp_path / "out")]) == 0
    assert "wrote 1 samples" in capsys.readouterr().out.replace("skipped: 1 undecodable audio", "")


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["data.kind=audio", "data.resolutions=[[16, 16]]"], "data.resolutions: has no effect for kind 'audio'"),
        (["data.window_seconds=2.0"], "data.window_seconds: has no effect unless kind is 'audio'"),
        (["data.kind=audio", "data.window_seconds=1.0", "data.min_seconds=2.0"], "data.min_seconds: exceeds"),
    ],
)  # fmt: skip
def test_audio_keys_are_checked_against_the_kind(overrides, problem):
    with pytest.raises(ConfigError) as err:
        load_config("recipes/tiny/digits_flow.yaml", overrides)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems
