"""The tiny video DiT trained with its tokens split over 2 ranks (context parallel) takes
the steps of the 1-rank run, and a run resumes exactly with context parallel switched on
or off and on another number of ranks."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, launch_env, run_launch, train_caption_tokenizer, train_losses

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECIPE = "recipes/tiny/video_dit.yaml"
COMMON = ("run.max_steps=6", "checkpoint.every=3", "eval.every=0", "train.batch_size=8",
          "train.log_every=1", "schedule.warmup_steps=2", "data.num_workers=1")  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_cp_inputs")
    cmd = [sys.executable, "-m", "data_pipeline.build", "builtin:moving_digits", "--out",
           str(root / "moving"), "--size", "16", "--frames", "8", "--shard-size", "64",
           "--num", "256"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokenizer = train_caption_tokenizer(root / "moving", root / "moving_tok")
    return [f"data.urls={root / 'moving'}", f"objective.conditioning.t5.tokenizer_path={tokenizer}"]


@pytest.fixture(scope="module")
def straight(inputs, tmp_path_factory):
    """Six steps on one rank, no context parallel: the losses every layout must give."""
    run = tmp_path_factory.mktemp("straight")
    run_launch(RECIPE, f"run.output_dir={run}", "cluster.num_workers=1", *inputs, *COMMON)
    return train_losses(run)


def layout(ranks: int, cp: int) -> list[str]:
    return [f"cluster.num_workers={ranks}", f"parallel.context_parallel={cp}"]


@pytest.mark.parametrize(
    ("first", "second"),
    [((2, 2), (1, 1)), ((1, 1), (2, 2)), ((2, 1), (2, 2))],
    ids=["cp2-then-1rank", "1rank-then-cp2", "dp2-then-cp2"],
)
def test_losses_and_resume_match_the_one_rank_run(inputs, straight, tmp_path, first, second):
    run = tmp_path / "run"
    run_launch(RECIPE, f"run.output_dir={run}", *layout(*first), *inputs, *COMMON,
               "run.max_steps=3")  # fmt: skip
    run_launch(RECIPE, f"run.output_dir={run}", *layout(*second), *inputs, *COMMON)
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 7))
    for step in range(1, 7):  # only float summation order differs across layouts
        assert losses[step] == pytest.approx(straight[step], rel=1e-5), step


def test_context_parallel_that_does_not_divide_the_ranks_is_one_line(inputs, tmp_path):
    proc = run_launch(RECIPE, f"run.output_dir={tmp_path / 'run'}", *layout(3, 2), *inputs,
                      *COMMON, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "parallel.context_parallel: 2 does not divide the 3 ranks" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
