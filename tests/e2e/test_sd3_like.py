"""The tiny SD3-like recipe end to end: digit shards + tokenizer -> MMDiT trained with
rectified flow on 2 CPU ranks -> `trainer.sample` with CFG -> a digit classifier (trained
here on scikit-learn's digits) reads the prompted digit in >= 90% of the samples, while an
untrained model of the same recipe fails the same check."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, launch_env, read_metrics, run_launch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECIPE = REPO / "recipes" / "tiny" / "sd3_like.yaml"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PER_DIGIT = 10
THRESHOLD = 0.9
# 1000 steps reach 100% on this setup (measured); the recipe's own 40 steps are the CI smoke run
TRAIN = ("run.max_steps=1000", "eval.every=500", "checkpoint.every=500")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Digit shards (16 px) and a caption tokenizer for the tiny T5, as `make demo` builds them."""
    root = tmp_path_factory.mktemp("sd3_inputs")
    shards, tok = root / "digits16", root / "tok" / "captions"
    build = [
        sys.executable,
        "-m",
        "data_pipeline.build",
        "builtin:digits",
        "--out",
        str(shards),
        "--size",
        "16",
        "--shard-size",
        "300",
    ]
    train_tok = [
        sys.executable,
        "-m",
        "data_pipeline.tokenizer",
        "train",
        "--input",
        str(shards),
        "--out",
        str(tok),
        "--vocab-size",
        "40",
        "--model-type",
        "bpe",
    ]
    for cmd in (build, train_tok):
        proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return [f"data.urls={shards}", f"objective.conditioning.t5.tokenizer_path={tok}.model"]


def digit_classifier():
    """Logistic regression on scikit-learn's 8x8 digits (the data the shards came from)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    return LogisticRegression(max_iter=5000).fit(digits.data / 16.0, digits.target)


def to_digit_features(images_NHWC: np.ndarray) -> np.ndarray:
    """uint8 RGB images -> grey 8x8 in [0, 1], the classifier's input space."""
    from PIL import Image

    out = []
    for image in images_NHWC:
        grey = Image.fromarray(image).convert("L").resize((8, 8), Image.BILINEAR)
        out.append(np.asarray(grey, dtype=np.float32).reshape(-1) / 255.0)
    return np.stack(out)


def prompted_accuracy(run_dir, out_dir, classifier) -> float:
    prompts = [f"a photo of the digit {w}" for w in WORDS]
    cmd = [
        sys.executable,
        "-m",
        "trainer.sample",
        "--run",
        str(run_dir),
        "--prompts",
        *prompts,
        "--num-per-prompt",
        str(PER_DIGIT),
        "--steps",
        "20",
        "--cfg",
        "3.0",
        "--seed",
        "0",
        "--out",
        str(out_dir),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = np.load(out_dir / "samples.npz")
    images, labels = data["images"], data["prompts"]
    assert images.shape == (10 * PER_DIGIT, 8, 8, 3) and images.dtype == np.uint8
    assert list(labels[:PER_DIGIT]) == [prompts[0]] * PER_DIGIT
    assert (out_dir / "grid.png").exists()
    target = np.array([WORDS.index(p.rsplit(" ", 1)[-1]) for p in labels])
    predicted = classifier.predict(to_digit_features(images))
    return float((predicted == target).mean())


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
    accuracy = (
        digit_classifier().predict(to_digit_features(images)) == batch["label"].numpy()
    ).mean()
    assert accuracy > 0.95


def test_trained_tiny_sd3_draws_the_prompted_digit_untrained_does_not(inputs, tmp_path):
    classifier = digit_classifier()
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
    accuracy = prompted_accuracy(trained, tmp_path / "samples_trained", classifier)
    baseline = prompted_accuracy(untrained, tmp_path / "samples_untrained", classifier)
    assert baseline < THRESHOLD, f"the untrained baseline must fail the bound ({baseline:.2f})"
    assert accuracy >= THRESHOLD, (
        f"prompted-digit accuracy {accuracy:.2f} (untrained {baseline:.2f})"
    )


DDPM_BOUND = 0.8


def test_ddpm_family_on_the_same_setup(inputs, tmp_path):
    """The DDPM family (v-prediction, cosine schedule rescaled to zero terminal SNR, DDIM)
    trained on the same tiny MMDiT setup for the same 1000 steps draws the prompted digit.

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
    accuracy = prompted_accuracy(run, tmp_path / "samples", digit_classifier())
    assert accuracy >= DDPM_BOUND, accuracy
