"""The tiny audio DiT on the built-in tones: after training, generated clips have the
prompted pitch and stop at the requested length (an untrained model does neither);
``trainer.sample`` writes wav files of the requested length with their spectrograms;
resume is exact on the same and on another number of ranks; bad audio is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, launch_env, run_launch, run_module, train_caption_tokenizer, train_losses

from cluster.env import DistEnv
from data_pipeline.audio import NOTES, judge_tones
from trainer import distributed as D
from trainer.loop import Trainer
from trainer.registry import load_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECIPE, RATE = "recipes/tiny/audio_dit.yaml", 4000
# every note in both timbres, asked for 0.5 s and 1 s (the window is 2 s)
PROMPTS = [f"a {timbre} tone at {note}" for timbre in ("pure", "bright") for note in NOTES]
SECONDS = np.array([0.5, 1.0] * 8, dtype=np.float32)
# a trained model follows most prompts and lengths; an untrained one (noise) neither
MIN_PITCH, MIN_DURATION, MAX_UNTRAINED = 0.6, 0.7, 0.3


def build_tones(out, rate: int = RATE) -> None:
    cmd = [sys.executable, "-m", "data_pipeline.build", "builtin:tones", "--out", str(out)]
    cmd += ["--sample-rate", str(rate), "--shard-size", "128"]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio_dit_inputs")
    build_tones(root / "tones")
    tokenizer = train_caption_tokenizer(root / "tones", root / "tones_tok")
    return root, [
        f"data.urls={root / 'tones'}",
        f"objective.conditioning.t5.tokenizer_path={tokenizer}",
    ]


def judge(trainer: Trainer, guidance: float = 1.0) -> dict[str, float]:
    """Pitch and length of 16 clips generated for PROMPTS x SECONDS by the EMA weights
    (what evaluation and trainer.sample use; at step 0 they are the initial weights)."""
    with trainer.ema.swapped_in():
        return _judge(trainer, guidance)


def _judge(trainer: Trainer, guidance: float) -> dict[str, float]:
    noise = torch.randn(len(PROMPTS), 1, 2 * RATE, generator=torch.Generator().manual_seed(5))
    extra = {"seconds_start": torch.zeros(len(PROMPTS)), "seconds_total": torch.from_numpy(SECONDS)}
    audio = trainer.objective.generate(
        {"model": trainer.modules["model"]}, noise, steps=20, prompts=PROMPTS, guidance=guidance,
        extra=extra,
    )  # fmt: skip
    return judge_tones(audio.numpy(), RATE, PROMPTS, SECONDS)


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    run = tmp_path_factory.mktemp("audio_dit_run")
    _, data = inputs
    cfg = load_config(RECIPE, [f"run.output_dir={run}", *data, "logging.progress_bar=false"])
    trainer = Trainer(cfg, DistEnv("single"))
    try:
        before = judge(trainer)
        assert trainer.run() == 0
        after = judge(trainer)
    finally:
        D.close()
    return run, before, after


def test_generated_tones_follow_prompt_and_length(trained):
    run, before, after = trained
    print(f"untrained {before}\ntrained {after}")
    assert before["pitch_match"] <= MAX_UNTRAINED and before["duration_ok"] <= MAX_UNTRAINED
    assert after["pitch_match"] >= MIN_PITCH, after
    assert after["duration_ok"] >= MIN_DURATION, after
    # the run's own evaluation scored its samples and wrote what a person listens to
    evals = [
        r
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "eval/pitch_match" in r
    ]
    assert evals and evals[-1]["eval/pitch_match"] >= 0.5 and evals[-1]["eval/duration_ok"] >= 0.5
    assert (run / "samples" / "samples_step00000600.png").is_file()
    assert len(list((run / "samples").glob("samples_step00000600_*.wav"))) == 16


def test_sample_cli_writes_wavs_of_the_requested_length(trained, tmp_path):
    import soundfile as sf

    run, _, _ = trained
    out = tmp_path / "clips"
    proc = run_module(
        "trainer.sample", "--run", str(run), "--prompts", "a pure tone at C4", "a bright tone at A4",
        "--num-per-prompt", "2", "--seconds", "0.75", "--steps", "20", "--cfg", "1.5", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in range(4):
        wave, rate = sf.read(out / f"{i:03d}.wav")
        assert rate == RATE and len(wave) == round(0.75 * RATE)
        assert (out / f"{i:03d}.png").is_file()
    assert (out / "spectrograms.png").is_file()
    saved = np.load(out / "samples.npz")
    assert saved["audio"].shape == (4, 1, 2 * RATE) and list(saved["seconds"]) == [0.75] * 4
    scores = judge_tones(saved["audio"], RATE, list(saved["prompts"]), saved["seconds"])
    assert scores["pitch_match"] >= 0.5 and scores["duration_ok"] >= 0.5, scores
    too_long = run_module("trainer.sample", "--run", str(run), "--prompts", "a pure tone at C4",
                          "--seconds", "3", "--out", str(tmp_path / "x"))  # fmt: skip
    assert too_long.returncode == 2
    assert "error: --seconds 3.0 must be in (0, 2.0]" in too_long.stderr


@pytest.mark.parametrize(("first", "second"), [(1, 1), (2, 1)])
def test_resume_is_exact_on_the_same_and_another_number_of_ranks(inputs, tmp_path, first, second):
    _, data = inputs
    common = (*data, "run.max_steps=8", "checkpoint.every=4", "eval.every=0", "train.batch_size=8",
              "train.log_every=1", "schedule.warmup_steps=2", "data.num_workers=1")  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_launch(RECIPE, f"run.output_dir={straight}", f"cluster.num_workers={first}", *common)
    run_launch(RECIPE, f"run.output_dir={resumed}", f"cluster.num_workers={first}", *common[:-6],
               "run.max_steps=4", *common[2:])  # fmt: skip
    run_launch(RECIPE, f"run.output_dir={resumed}", f"cluster.num_workers={second}", *common)
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(b) == list(range(1, 9))
    for step in range(5, 9):  # only float summation order differs across rank counts
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_clips_at_another_sample_rate_stop_the_run_in_one_line(inputs, tmp_path):
    _, data = inputs
    build_tones(tmp_path / "tones8k", rate=8000)
    proc = run_launch(
        RECIPE, f"run.output_dir={tmp_path / 'run'}", *data, f"data.urls={tmp_path / 'tones8k'}",
        "run.max_steps=2", "schedule.warmup_steps=0", "eval.every=0", check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]  # data found unusable after the start
    lines = [
        line
        for line in proc.stderr.splitlines()
        if "8000 Hz is not data.sample_rate 4000 Hz" in line
    ]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_v_prediction_ddpm_trains_and_samples_audio(inputs, tmp_path):
    """The reference recipe's objective (Stable Audio's v-prediction, cosine schedule) on
    the tiny twin: loss falls over a few steps and evaluation writes scored clips."""
    root, data = inputs
    recipe = tmp_path / "ddpm.yaml"
    recipe.write_text(
        f"base: {REPO / RECIPE}\n"
        "objective:\n  name: ddpm\n  prediction: v\n  schedule: cosine\n  zero_terminal_snr: true\n"
        "  sampler: dpmpp_2m\n  autoencoder: {name: identity, channels: 1, scale: 3.0}\n"
        f"  conditioning:\n    t5: {{path: null, random_init: true, size: tiny, tokenizer_path: {root / 'tones_tok.model'}, max_length: 16}}\n"
        "    context_dim: 32\n"
    )
    cfg = load_config(
        recipe,
        [f"run.output_dir={tmp_path / 'run'}", data[0], "run.max_steps=30", "eval.every=30",
         "eval.sample_steps=10", "eval.num_samples=4", "checkpoint.every=30",
         "logging.progress_bar=false", "train.log_every=1", "schedule.warmup_steps=5"],
    )  # fmt: skip
    trainer = Trainer(cfg, DistEnv("single"))
    try:
        assert trainer.run() == 0
    finally:
        D.close()
    losses = train_losses(tmp_path / "run")
    assert np.mean([losses[s] for s in range(26, 31)]) < 0.8 * np.mean(
        [losses[s] for s in range(1, 6)]
    )
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("eval/pitch_match" in r for r in records)
    assert len(list((tmp_path / "run" / "samples").glob("*.wav"))) == 4


def test_trains_on_audio_vae_latents(inputs, tmp_path):
    """The reference recipe's path: the DiT over an audio VAE's latents (random weights,
    explicitly: this checks the plumbing, not quality) trains, and evaluation decodes
    its samples back to 2 s clips."""
    _, data = inputs
    recipe = tmp_path / "latents.yaml"
    recipe.write_text(
        f"base: {REPO / RECIPE}\n"
        "model: {in_channels: 8, patch_size: 2}\n"
        "objective:\n  autoencoder: {name: audio_vae, random_init: true, size: tiny, in_channels: 1}\n"
    )
    cfg = load_config(
        recipe,
        [f"run.output_dir={tmp_path / 'run'}", *data, "run.max_steps=4", "eval.every=4",
         "eval.sample_steps=4", "eval.num_samples=2", "checkpoint.every=4",
         "logging.progress_bar=false", "train.batch_size=8", "schedule.warmup_steps=1"],
    )  # fmt: skip
    trainer = Trainer(cfg, DistEnv("single"))
    try:
        assert trainer.objective.autoencoder.latent_shape(1, 2 * RATE) == (8, 250)
        assert trainer.flops_per_sample == trainer.modules["model"].flops_per_sample()
        assert trainer.run() == 0
    finally:
        D.close()
    wave, rate = __import__("soundfile").read(
        tmp_path / "run" / "samples" / "samples_step00000004_000.wav"
    )
    assert rate == RATE and len(wave) == 2 * RATE
