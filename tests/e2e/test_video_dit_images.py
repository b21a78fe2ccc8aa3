"""Images train the video DiT as 1-frame videos: the tiny video recipe on the digit image
shards (8 px, (1, 2, 2) tubelets) draws every prompted digit through ``trainer.sample``,
judged per digit like the SD3-like MMDiT; the same run stopped after one step does not."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import (
    REPO,
    assert_every_digit_drawn,
    launch_env,
    prompted_report,
    run_launch,
    train_caption_tokenizer,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECIPE = "recipes/tiny/video_dit.yaml"
AS_IMAGES = ("data.kind=images", "data.resolutions=[[8, 8]]", "model.patch_size=[1, 2, 2]",
             "model.sample_shape=[1, 8, 8]", "eval.every=0", "cluster.num_workers=1")  # fmt: skip
MEAN_BAR = 0.9


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_dit_images")
    cmd = [sys.executable, "-m", "data_pipeline.build", "builtin:digits", "--out",
           str(root / "digits16"), "--size", "16", "--shard-size", "300"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokenizer = train_caption_tokenizer(root / "digits16", root / "tok")
    return [
        f"data.urls={root / 'digits16'}",
        f"objective.conditioning.t5.tokenizer_path={tokenizer}",
    ]


def test_images_as_one_frame_videos_draw_every_prompted_digit(inputs, tmp_path):
    untrained, trained = tmp_path / "untrained", tmp_path / "trained"
    run_launch(RECIPE, f"run.output_dir={untrained}", "run.max_steps=1", "schedule.warmup_steps=0",
               *AS_IMAGES, *inputs)  # fmt: skip
    baseline = prompted_report(untrained, tmp_path / "samples_untrained")
    assert baseline.mean_accuracy < MEAN_BAR, baseline.table()
    run_launch(RECIPE, f"run.output_dir={trained}", "run.max_steps=1000", "checkpoint.every=500",
               *AS_IMAGES, *inputs, timeout=900)  # fmt: skip
    report = prompted_report(trained, tmp_path / "samples_trained")
    print(f"untrained\n{baseline.table()}\ntrained\n{report.table()}")
    assert_every_digit_drawn(report, MEAN_BAR)
