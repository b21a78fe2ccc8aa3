"""The tiny audio VAE on the built-in tones: it learns to reconstruct held-out clips with
their pitch (an untrained one does not), writes wav pairs and spectrograms at evaluation,
and exports, with its latent statistics, into a frozen autoencoder for a latent recipe."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, launch_env, read_metrics, run_module

from cluster.env import DistEnv
from configlib import from_dict
from data_pipeline.loader import WebDatasetConfig, WebDatasetSource
from trainer import distributed as D
from trainer.loop import Trainer
from trainer.objectives.autoencoding import snr, stft_distance
from trainer.registry import load_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECIPE, RATE, SIZES = "recipes/tiny/audio_vae.yaml", 8000, [64, 128, 256]


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    """512 clips in 4 shards: 0-2 train, 3 is held out."""
    out = tmp_path_factory.mktemp("audio_inputs") / "tones"
    cmd = [sys.executable, "-m", "data_pipeline.build", "builtin:tones", "--out", str(out)]
    cmd += ["--sample-rate", str(RATE), "--shard-size", "128"]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def heldout(tones) -> torch.Tensor:
    cfg = from_dict(
        WebDatasetConfig,
        {"urls": f"{tones}/shard-000003.tar", "kind": "audio", "sample_rate": RATE, "window_seconds": 1.0},
    )  # fmt: skip
    source = WebDatasetSource(cfg, seed=0, rank=0, world_size=1, micro_batch=128, accum_steps=1)
    try:
        return source.eval_audio(128)["x"]
    finally:
        source.close()


def dominant_hz(audio_BCT: torch.Tensor) -> np.ndarray:
    spectrum = np.abs(np.fft.rfft(audio_BCT[:, 0].numpy(), axis=-1))
    return np.fft.rfftfreq(audio_BCT.shape[-1], 1 / RATE)[spectrum.argmax(-1)]


def judge(model, clips: torch.Tensor) -> tuple[float, float, float]:
    """(STFT distance, SNR dB, share of clips whose dominant frequency is kept within 3 Hz)."""
    with torch.no_grad():
        noise = torch.zeros(clips.shape[0], *model.latent_shape(1, clips.shape[-1]))
        recon = model(clips, noise)[0].clamp(-1, 1)
    kept = float(np.mean(np.abs(dominant_hz(recon) - dominant_hz(clips)) < 3.0))
    return float(stft_distance(recon, clips, SIZES)), snr(recon, clips), kept


@pytest.fixture(scope="module")
def trained(tones, tmp_path_factory):
    run = tmp_path_factory.mktemp("audio_vae_run")
    cfg = load_config(
        RECIPE,
        [f"run.output_dir={run}", f"data.urls={tones}/shard-{{000000..000002}}.tar",
         "logging.progress_bar=false"],
    )  # fmt: skip
    clips = heldout(tones)
    trainer = Trainer(cfg, DistEnv("single"))
    try:
        before = judge(trainer.modules["model"], clips)
        assert trainer.run() == 0
        after = judge(trainer.modules["model"], clips)
    finally:
        D.close()
    return run, before, after


def test_audio_vae_learns_to_reconstruct_held_out_tones(trained):
    """Measured on a 2-core CPU after 300 steps (~2 min): STFT distance 6.36 untrained ->
    2.43, dominant frequency kept for 0 -> 75% of held-out clips, SNR -0.3 -> 2.1 dB.
    Decimating by 4 (the same number of values) and interpolating back keeps 100% of the
    pitches at 16.9 dB: the tiny twin shows learning, not a codec that beats resampling."""
    run, (stft0, snr0, kept0), (stft1, snr1, kept1) = trained
    print(f"audio VAE held-out: STFT {stft0:.2f} -> {stft1:.2f}, SNR {snr0:.1f} -> {snr1:.1f} dB, "
          f"pitch kept {kept0:.2f} -> {kept1:.2f}")  # fmt: skip
    assert kept0 < 0.1 and stft0 > 5.0, "the untrained model must fail the bars"
    assert stft1 < 0.6 * stft0 and stft1 < 3.0
    assert kept1 >= 0.5 and snr1 > snr0 + 1.0
    records = [r for r in read_metrics(run) if "stft" in r]
    assert records and records[-1]["stft"] < records[0]["stft"]
    final = [r for r in read_metrics(run) if "eval/snr" in r][-1]
    assert final["eval/stft"] < 3.0
    samples = run / "samples"
    assert (samples / "spectrograms_step00000300.png").is_file()
    import soundfile as sf

    wave, rate = sf.read(samples / "reconstruction0_step00000300.wav")
    assert rate == RATE and len(wave) == 2 * RATE + RATE // 4  # original, gap, reconstruction


def test_exported_audio_vae_decodes_its_latents(trained, tones, tmp_path):
    from models.autoencoders import build_autoencoder, pretrained_config

    out = tmp_path / "audio_vae.safetensors"
    export = run_module("trainer.export", str(trained[0]), "--out", str(out), "--weights", "model")
    assert export.returncode == 0, export.stderr[-3000:]
    stats = run_module(
        "data_pipeline.latent_stats", str(out), "--data", f"{tones}/shard-{{000000..000002}}.tar",
        "--images", "128", "--sample-rate", str(RATE), "--seconds", "1.0", "--no-progress",
    )  # fmt: skip
    assert stats.returncode == 0, stats.stderr[-3000:]
    frozen = build_autoencoder(pretrained_config(out))
    clips = heldout(tones)[:16]
    latents = frozen.encode(clips)
    # normalised by the stored statistics: roughly unit variance on held-out clips
    assert 0.5 < float(latents.std()) < 2.0 and abs(float(latents.mean())) < 0.5
    assert latents.shape == (16, 8, RATE // 32)
    recon = frozen.decode(latents).clamp(-1, 1)
    kept = np.mean(np.abs(dominant_hz(recon) - dominant_hz(clips)) < 3.0)
    assert kept >= 0.4
    images = run_module(
        "data_pipeline.latent_stats", str(out), "--data", str(tones), "--resolution", "8", "8"
    )
    assert images.returncode == 2
    assert "needs --sample-rate and --seconds" in images.stderr
