"""The tiny SD3-like recipe under DeepSpeed ZeRO-2 and ZeRO-3 on 2 gloo ranks, against the
same recipe under FSDP2: per-step losses, gradient norms and EMA samples; exact resume on
2 ranks; resume on 1 rank through DeepSpeed's universal checkpoint; export.

Why a tolerance of 1e-5 (relative) on losses: both backends start from the same weights
(init_weights(seed) before partitioning), see the same samples and noise, and run the same
fp32 AdamW update; only the order in which gradients are summed across ranks differs,
which moves losses by about 1e-7 over 20 steps here. Steps move the loss by more than
2e-4 each, so a run that is off by one update, a different learning rate or a different
Adam step count misses it by far."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, launch_env, read_metrics, run_launch, train_losses
from test_sd3_like import inputs  # noqa: F401  (module fixture: digit shards + tokenizer)

from trainer.export import consolidated_state_dict

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECIPE = REPO / "recipes" / "tiny" / "sd3_like.yaml"
COMMON = (
    "run.max_steps=20",
    "train.log_every=1",
    "checkpoint.every=10",
    "checkpoint.keep_last=0",
    "eval.every=20",  # EMA samples at the end (pixel statistics in metrics.jsonl)
    "eval.num_samples=8",
    "eval.sample_steps=4",
    "logging.progress_bar=false",
    "data.num_workers=1",  # fewer processes to start on a 2-core machine
)
BACKENDS = {
    "fsdp2": (),
    "zero2": ("parallel.backend=deepspeed", "parallel.zero_stage=2"),
    "zero3": (
        "parallel.backend=deepspeed",
        "parallel.zero_stage=3",
        # partition every weight matrix (DeepSpeed keeps parameters under 100k values whole
        # by default: all of this model's), keep biases and norms whole (both paths run),
        # and shard the frozen text encoders too (FSDP2 on the same ranks)
        "parallel.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 1000}}",
        "objective.conditioning.shard_encoders=true",
    ),
}
LOSS_RTOL = 1e-5
RESHARD_RTOL = 1e-4  # as tests/e2e/test_resume.py allows FSDP2 across world sizes


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """20 steps of each backend on 2 ranks, checkpoints at 10 and 20."""
    root = tmp_path_factory.mktemp("deepspeed_runs")
    out = {}
    for name, overrides in BACKENDS.items():
        out[name] = root / name
        run_launch(RECIPE, f"run.output_dir={out[name]}", *COMMON, *inputs, *overrides, timeout=900)
    out["inputs"] = inputs
    return out


def eval_record(run: Path) -> dict:
    return [r for r in read_metrics(run) if "eval/pixel_std" in r][-1]


def grad_norms(run: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(run) if "grad_norm" in r}


def rewound_copy(run: Path, dest: Path) -> Path:
    """The run as it was at its step-10 checkpoint (the resume then trims metrics)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / "step_00000020")
    (dest / "checkpoints" / "latest").write_text("step_00000010\n")
    return dest


def resume(run: Path, runs: dict, backend: str, *extra: str) -> subprocess.CompletedProcess:
    return run_launch(
        RECIPE,
        f"run.output_dir={run}",
        *COMMON,
        *runs["inputs"],
        *BACKENDS[backend],
        *extra,
        timeout=900,
    )


def test_zero2_and_zero3_follow_fsdp2(runs):
    """Same losses and gradient norms at every one of the 20 steps, and the same EMA
    samples (the EMA of each rank's partition, swapped in for evaluation)."""
    reference = train_losses(runs["fsdp2"])
    assert sorted(reference) == list(range(1, 21))
    moves = [abs(reference[s + 1] - reference[s]) / reference[s] for s in range(1, 20)]
    assert min(moves) > 20 * LOSS_RTOL  # the tolerance tells steps apart
    ref_norms, ref_eval = grad_norms(runs["fsdp2"]), eval_record(runs["fsdp2"])
    for backend in ("zero2", "zero3"):
        losses, norms = train_losses(runs[backend]), grad_norms(runs[backend])
        assert sorted(losses) == list(range(1, 21)), backend
        for step in range(1, 21):
            assert losses[step] == pytest.approx(reference[step], rel=LOSS_RTOL), (backend, step)
            assert norms[step] == pytest.approx(ref_norms[step], rel=10 * LOSS_RTOL), (
                backend,
                step,
            )
        record = eval_record(runs[backend])
        for key in ("eval/pixel_mean", "eval/pixel_std"):
            assert record[key] == pytest.approx(ref_eval[key], rel=1e-4, abs=1e-6), (backend, key)
        ckpt = runs[backend] / "checkpoints" / "step_00000020"
        meta = json.loads((ckpt / "meta.json").read_text())
        assert (meta["format"], meta["world_size"]) == ("deepspeed", 2)
        assert (ckpt / "deepspeed" / "model").is_dir() and (ckpt / "trainer.pt").exists()
        assert sorted(p.name for p in (ckpt / "ema").iterdir()) == [
            "rank_00000.pt",
            "rank_00001.pt",
        ]
        assert (ckpt / "rank_00000.pt").exists() and (ckpt / "rank_00001.pt").exists()
        assert (runs[backend] / "checkpoints" / "latest").read_text().strip() == ckpt.name
        assert (runs[backend] / "samples" / "samples_step00000020.png").exists()


def test_exact_resume_on_the_same_ranks(runs, tmp_path):
    """ZeRO-3 stopped at step 10 and resumed on 2 ranks: steps 11-20 and the EMA samples
    are bit for bit those of the uninterrupted run."""
    run = rewound_copy(runs["zero3"], tmp_path / "resumed")
    proc = resume(run, runs, "zero3")
    assert "resuming" in proc.stderr
    assert "saved on 2 ranks, now 2" in (run / "train.log").read_text()
    straight, resumed = train_losses(runs["zero3"]), train_losses(run)
    assert sorted(resumed) == list(range(1, 21))
    assert resumed == straight
    assert eval_record(run) == eval_record(runs["zero3"])
    assert not (run / "checkpoints" / "step_00000010" / "universal").exists()


@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_resume_on_one_rank_through_a_universal_checkpoint(runs, tmp_path, backend):
    """A 2-rank checkpoint resumed on 1 rank: rank 0 converts it (DeepSpeed's
    ds_to_universal, into universal/ of the step), every engine loads that, the EMA pieces
    are re-cut; training continues as the same function. The model weights exported from
    the original checkpoint equal the fp32 weights DeepSpeed's converter extracted."""
    run = rewound_copy(runs[backend], tmp_path / "one_rank")
    resume(run, runs, backend, "cluster.num_workers=1")
    log = (run / "train.log").read_text()
    assert "saved on 2 ranks, now 1" in log and "universal checkpoint for 1 ranks" in log
    step10 = run / "checkpoints" / "step_00000010"
    assert (step10 / "universal" / "model" / "zero").is_dir()
    assert not list(step10.glob("universal.tmp-*"))
    straight, resumed = train_losses(runs[backend]), train_losses(run)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(straight[step], rel=RESHARD_RTOL), step
    for key in ("eval/pixel_mean", "eval/pixel_std"):
        assert eval_record(run)[key] == pytest.approx(eval_record(runs[backend])[key], rel=1e-4)
    meta = json.loads((run / "checkpoints" / "step_00000020" / "meta.json").read_text())
    assert meta["world_size"] == 1

    exported, step = consolidated_state_dict(str(run), 10, "model")
    assert step == 10
    universal = step10 / "universal" / "model" / "zero"
    assert sorted(exported) == sorted(p.name for p in universal.iterdir() if p.is_dir())
    for name, tensor in exported.items():
        fp32 = torch.load(universal / name / "fp32.pt", weights_only=False)
        fp32 = fp32["param"] if isinstance(fp32, dict) else fp32  # ZeRO-1/2 wrap it
        assert torch.equal(fp32.view(tensor.shape), tensor), name


def test_export_of_deepspeed_checkpoints(runs, tmp_path):
    """`python -m trainer.export` on a ZeRO-3 run writes every model tensor; model and EMA
    of both stages equal FSDP2's to training noise; the file loads into a plain MMDiT."""
    from safetensors.torch import load_file

    from trainer.registry import MODELS, load_config

    out = tmp_path / "ema.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.export", str(runs["zero3"]), "--out", str(out)],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote ema weights of step 20" in proc.stdout
    ema = load_file(out)
    cfg = load_config(RECIPE, [f"run.output_dir={tmp_path}", *runs["inputs"]])
    model = MODELS[cfg.model.name].build(cfg.model)
    model.load_state_dict(ema)  # strict: every key, every shape
    for weights in ("model", "ema"):
        reference, _ = consolidated_state_dict(str(runs["fsdp2"]), 20, weights)
        for backend in ("zero2", "zero3"):
            tensors, _ = consolidated_state_dict(str(runs[backend]), 20, weights)
            assert sorted(tensors) == sorted(reference), (backend, weights)
            for name, value in tensors.items():
                assert value.shape == reference[name].shape, name
                torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-5)
    model_weights, _ = consolidated_state_dict(str(runs["zero3"]), 20, "model")
    assert any(not torch.equal(model_weights[k], ema[k]) for k in ema)  # the EMA lags


def test_resuming_with_another_backend_is_refused(runs, tmp_path):
    """A DCP (FSDP2) checkpoint is not silently ignored or misread by DeepSpeed."""
    run = tmp_path / "fsdp2"
    shutil.copytree(runs["fsdp2"], run)
    proc = run_launch(
        RECIPE,
        f"run.output_dir={run}",
        *COMMON,
        *runs["inputs"],
        *BACKENDS["zero2"],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "holds dcp shards, this run writes deepspeed" in proc.stderr


TWO_PLAYER = """
import json, sys, torch
sys.path[:0] = [{tests!r}, {tests_trainer!r}]
from test_loop import ToyAdversarial, ToyAdversarialConfig
from cluster.env import DistEnv
from trainer.config import ObjectiveSection
from trainer.registry import load_config
from trainer.loop import Trainer
from trainer.registry import OBJECTIVES, ObjectiveEntry

OBJECTIVES["toy_adversarial"] = ObjectiveEntry(ToyAdversarialConfig, ToyAdversarial)
ObjectiveSection.REGISTRY["toy_adversarial"] = ToyAdversarialConfig
out = sys.argv[1]
cfg = load_config("recipes/tiny/flow2d.yaml", [f"run.output_dir={{out}}", *sys.argv[2:]])
trainer = Trainer(cfg, DistEnv("single"))
logs = [trainer.train_step() for _ in range(6)]
weights = {{}}
for name in ("model", "critic"):
    module = getattr(trainer.modules[name], "module", trainer.modules[name])  # engine or not
    weights[name] = [  # 1 rank: FSDP2's DTensors hold everything locally
        getattr(p, "full_tensor", p.detach)().clone() for p in module.parameters()
    ]
torch.save(weights, out + "/weights.pt")
json.dump({{"logs": logs, "calls": trainer.objective.calls,
           "skipped": trainer.counters.skipped_steps}}, open(out + "/result.json", "w"))
"""


def test_two_player_objective_and_nonfinite_guard_under_zero2(tmp_path):
    """An objective with its own trainable critic (a second engine, stepped every 2nd
    step) and a frozen teacher, with a NaN loss at step 3: under ZeRO-2 the step is
    skipped on the same step and both networks end where FSDP2 puts them."""
    results = {}
    common = (
        "eval.every=0",
        "schedule.warmup_steps=0",
        "objective.name=toy_adversarial",
        "objective.nan_at_steps=[3]",
        "run.max_steps=6",
        "cluster.num_workers=1",
    )
    script = TWO_PLAYER.format(tests=str(REPO / "tests"), tests_trainer=str(REPO / "tests/trainer"))
    for name, extra in (("fsdp2", ()), ("zero2", BACKENDS["zero2"])):
        out = tmp_path / name
        out.mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", script, str(out), *common, *extra],
            cwd=REPO,
            env=launch_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = (
            json.loads((out / "result.json").read_text()),
            torch.load(out / "weights.pt"),
        )
    (ref, ref_weights), (ds, ds_weights) = results["fsdp2"], results["zero2"]
    assert ds["calls"] == ref["calls"] == {"model": 6, "critic": 3}
    assert ds["skipped"] == ref["skipped"] == 1
    for ours, theirs in zip(ds["logs"], ref["logs"]):
        for key in ("loss", "critic/loss"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=LOSS_RTOL, nan_ok=True), key
        assert ("critic/loss" in ours) == ("critic/loss" in theirs)
    for name in ("model", "critic"):
        for a, b in zip(ds_weights[name], ref_weights[name]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
