"""The tiny SD3-like recipe end to end: digit shards + tokenizer -> MMDiT trained with
rectified flow on 2 CPU ranks -> `trainer.sample` with CFG -> `trainer.digit_judge` (a
classifier trained on scikit-learn's digits) reads every prompted digit in its own row, and
each row is varied, while an untrained model of the same recipe fails, and so does a model
trained without one digit and on one image of each other digit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGIT_WORDS as WORDS
from conftest import (
    MIN_DIGIT_ACCURACY,
    MIN_DIVERSITY,
    REPO,
    assert_every_digit_drawn,
    launch_env,
    prompted_report,
    read_metrics,
    run_launch,
    run_module,
    train_caption_tokenizer,
)

from trainer import digit_judge

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECIPE = REPO / "recipes" / "tiny" / "sd3_like.yaml"
THRESHOLD = 0.9  # mean over digits (every digit and the diversity: conftest's bars)
# 1000 steps reach 100% on this setup (measured); the recipe's own 40 steps are the CI smoke run
TRAIN = ("run.max_steps=1000", "eval.every=500", "checkpoint.every=500")
BUG_TRAIN = ("run.max_steps=500", "eval.every=0", "checkpoint.every=500")
BUG_MEAN = 0.8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Digit shards (16 px) and a caption tokenizer for the tiny T5, as `make demo` builds them."""
    root = tmp_path_factory.mktemp("sd3_inputs")
    shards, tok = root / "digits16", root / "tok" / "captions"
    build = [sys.executable, "-m", "data_pipeline.build", "builtin:digits", "--out", str(shards)]
    build += ["--size", "16", "--shard-size", "300"]
    proc = subprocess.run(build, cwd=REPO, env=launch_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = train_caption_tokenizer(shards, tok)
    return [f"data.urls={shards}", f"objective.conditioning.t5.tokenizer_path={tok}"]


def test_classifier_reads_the_shard_images(inputs):
    """The measuring stick itself: real 16 px shard images are read correctly."""
    from data_pipeline.loader import WebDatasetConfig, WebDatasetSource

    urls = inputs[0].split("=", 1)[1]
    src = WebDatasetSource(
        WebDatasetConfig(urls=urls, resolutions=[(16, 16)]),
        seed=0,
        rank=0,
        world_size=1,
        micro_batch=200,
        accum_steps=1,
    )
    batch = src.next_batch()
    images = ((batch["x"].numpy() + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    read = digit_judge.classifier().predict(digit_judge.features(images))
    assert (read == batch["label"].numpy()).mean() > 0.95
    # real shard images are as varied as the judge's reference digits (about 1)
    report = digit_judge.judge(
        images, [digit_judge.PROMPT.format(WORDS[y]) for y in batch["label"]]
    )
    assert report.min_diversity > 0.8 and max(r.diversity for r in report.rows) < 1.2


def test_trained_tiny_sd3_draws_every_prompted_digit_untrained_does_not(inputs, tmp_path):
    trained, untrained = tmp_path / "trained", tmp_path / "untrained"
    run_launch(RECIPE, f"run.output_dir={trained}", *TRAIN, *inputs, timeout=1500)
    records = [r for r in read_metrics(trained) if "loss" in r]
    assert records[-1]["loss"] < records[0]["loss"]
    run_launch(
        RECIPE,
        f"run.output_dir={untrained}",
        "run.max_steps=1",
        "optimizer.lr=1e-12",
        "schedule.warmup_steps=0",
        "eval.every=0",
        *inputs,
    )
    baseline = prompted_report(untrained, tmp_path / "samples_untrained")
    assert baseline.mean_accuracy < THRESHOLD, baseline.table()
    assert_every_digit_drawn(prompted_report(trained, tmp_path / "samples_trained"), THRESHOLD)


DDPM_BOUND = 0.8


def test_ddpm_family_on_the_same_setup(inputs, tmp_path):
    """The DDPM family (v-prediction, cosine schedule rescaled to zero terminal SNR, DDIM)
    trained on the same tiny MMDiT setup for the same 1000 steps draws every prompted digit.

    Bound: this configuration measured 0.98 here (benchmarks/RESULTS.md); 0.8 leaves room for
    float differences between machines and still fails chance (0.1) and the untrained model.
    The SD-style scaled-linear schedule is not used: it keeps ~7% signal at t = T, so pure-noise
    sampling starts off the training distribution and left coloured noise at 8x8 (0.05).
    """
    conditioning = (
        "objective.conditioning={clip: [{arch: ViT-L-14, random_init: true, size: tiny, max_length: 16}], "
        "t5: {random_init: true, size: tiny, tokenizer_path: "
        + inputs[1].split("=", 1)[1]
        + ", max_length: 16}, "
        "context_dim: 32, clip_drop_prob: 0.1, t5_drop_prob: 0.1}"
    )
    run = tmp_path / "ddpm"
    run_launch(
        RECIPE,
        f"run.output_dir={run}",
        *TRAIN,
        inputs[0],
        "objective.name=ddpm",
        "objective.prediction=v",
        "objective.schedule=cosine",
        "objective.zero_terminal_snr=true",
        "objective.sampler=ddim",
        "objective.autoencoder={name: identity}",
        conditioning,
        timeout=1500,
    )
    assert_every_digit_drawn(prompted_report(run, tmp_path / "samples"), DDPM_BOUND)


def one_image_per_digit_without_zero(root: Path) -> Path:
    """The bug as shards: no zeros at all, and each other digit a single image (repeated
    so that each of the 2 ranks has a shard), captioned like builtin:digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    real_x, real_y = digit_judge.reference(16)
    confidence = digit_judge.classifier().decision_function(real_x)
    images = root / "images"
    images.mkdir(parents=True)
    for digit in range(1, 10):
        # the image the judge reads most surely: the check, not the judge, must fail
        clearest = int(np.argmax(np.where(real_y == digit, confidence[:, digit], -1.0)))
        pixels = (digits.images[clearest] / 16.0 * 255).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels).resize((16, 16), Image.BILINEAR).convert("RGB")
        for copy in range(4):
            image.save(images / f"{digit}_{copy}.png")
            (images / f"{digit}_{copy}.txt").write_text(digit_judge.PROMPT.format(WORDS[digit]))
    shards = root / "shards"
    proc = run_module(
        "data_pipeline.build", str(images), "--out", str(shards), "--shard-size", "18"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return shards


def test_per_digit_checks_fail_a_model_missing_a_digit_and_collapsed(inputs, tmp_path):
    """A model trained without zeros and on one image per digit: the mean accuracy alone
    (the check this module had) lets it through; the per-digit accuracy (zero is drawn as
    another digit) and the diversity (each row is one image repeated) fail it."""
    run = tmp_path / "bug"
    shards = one_image_per_digit_without_zero(tmp_path / "bug_data")
    run_launch(
        RECIPE,
        f"run.output_dir={run}",
        *BUG_TRAIN,
        f"data.urls={shards}",
        inputs[1],
        timeout=1500,
    )
    report = prompted_report(run, tmp_path / "samples")
    assert report.mean_accuracy >= BUG_MEAN, report.table()
    assert report.rows[0].accuracy < MIN_DIGIT_ACCURACY, report.table()
    assert report.min_diversity < MIN_DIVERSITY, report.table()
