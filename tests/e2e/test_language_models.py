"""Language models end to end: the tiny recipes (recipes/tiny/{ar_baseline,mdlm,sedd,bd3lm}.yaml)
trained on the built-in arithmetic corpus really learn it, resume exactly, run on 2 ranks,
and sample through ``python -m trainer.sample``.

"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, launch_env, read_metrics, run_launch, train_losses

pytestmark = pytest.mark.e2e

# Untrained: uniform over the 18 ids = log2(18) = 4.17 bits per token. After LEARN_STEPS
# every objective is far below (measured 2.0 to 2.6 at 300 steps); the floor of this corpus
# (A and B uniform, everything else determined) is about 1.0 bit per token.
LEARN_STEPS = 300
LEARNED_BITS = 3.0


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def arith(tmp_path_factory) -> list[str]:
    """Arithmetic text shards -> char tokenizer -> token shards, as `make arith` builds them."""
    root = tmp_path_factory.mktemp("arith")
    py = [sys.executable, "-m"]
    _run([*py, "data_pipeline.build", "builtin:arith", "--num", "20000", "--out", f"{root}/text"])
    _run(
        [
            *py,
            "data_pipeline.tokenizer",
            "train",
            "--input",
            f"{root}/text",
            "--out",
            f"{root}/tok/arith",
            "--vocab-size",
            "18",
            "--model-type",
            "char",
        ]
    )
    tok = f"{root}/tok/arith.model"
    _run([*py, "data_pipeline.build", f"{root}/text", "--tokenizer", tok, "--out", f"{root}/tok"])
    return [f"data.urls={root}/tok", f"data.tokenizer={tok}", f"objective.tokenizer={tok}"]


def recipe(name: str) -> Path:
    return REPO / "recipes" / "tiny" / f"{name}.yaml"


def sample_texts(run_dir: Path, out: Path, num: int = 8) -> list[str]:
    cmd = [sys.executable, "-m", "trainer.sample", "--run", str(run_dir), "--num", str(num)]
    _run([*cmd, "--steps", "16", "--seed", "1", "--out", str(out)])
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == num
    return [json.loads(line)["text"] for line in lines]


def eval_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if any(k.startswith("eval/") for k in r)]


@pytest.mark.parametrize("objective", ["ar_baseline", "mdlm", "sedd", "bd3lm"])
def test_tiny_recipe_learns_and_samples(objective, arith, tmp_path):
    """Held-out bits per token fall from the untrained value to well below it, and the
    sampling CLI writes decodable arithmetic-looking text."""
    run = tmp_path / "run"
    run_launch(
        recipe(objective),
        *arith,
        f"run.output_dir={run}",
        f"run.max_steps={LEARN_STEPS}",
        f"eval.every={LEARN_STEPS}",
        "eval.num_samples=8",
        "checkpoint.every=1000",
        timeout=900,
    )
    record = eval_records(run)[-1]
    key = "eval/ppl" if objective == "ar_baseline" else "eval/ppl_bound"
    assert record["eval/bits_per_token"] < LEARNED_BITS, record
    assert record[key] == pytest.approx(2 ** record["eval/bits_per_token"], rel=1e-6)
    assert 0.0 <= record["eval/arith_valid_frac"] <= 1.0
    texts = sample_texts(run, tmp_path / "samples")
    assert any(" + " in t or " = " in t for t in texts), texts

    untrained = tmp_path / "untrained"
    run_launch(
        recipe(objective),
        *arith,
        f"run.output_dir={untrained}",
        "run.max_steps=1",
        "schedule.warmup_steps=0",
        "eval.every=1",
        "eval.num_samples=8",
    )
    assert eval_records(untrained)[-1]["eval/bits_per_token"] > 4.0


def test_mdlm_resumes_exactly_and_across_rank_counts(arith, tmp_path):
    """Stop/resume on 2 ranks is bit-identical to an uninterrupted run; resuming those
    2-rank checkpoints on 1 rank continues the same training (losses within 1e-4)."""
    common = (*arith, "train.log_every=1", "eval.every=0", "schedule.warmup_steps=2")
    two = (*common, "cluster.num_workers=2")
    full, split, moved = tmp_path / "full", tmp_path / "split", tmp_path / "moved"
    run_launch(recipe("mdlm"), *two, f"run.output_dir={full}", "run.max_steps=12")
    run_launch(recipe("mdlm"), *two, f"run.output_dir={split}", "run.max_steps=6")
    run_launch(recipe("mdlm"), *two, f"run.output_dir={split}", "run.max_steps=12")
    assert train_losses(split) == train_losses(full)

    run_launch(recipe("mdlm"), *two, f"run.output_dir={moved}", "run.max_steps=6")
    run_launch(recipe("mdlm"), *common, f"run.output_dir={moved}", "run.max_steps=12")
    reference, resumed = train_losses(full), train_losses(moved)
    assert sorted(resumed) == sorted(reference)
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4)
