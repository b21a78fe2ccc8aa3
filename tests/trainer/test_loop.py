"""The training loop in one process: phases with their own optimizers and update ratios,
frozen companion modules, the non-finite guard, EMA, LR schedules, metric sinks."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from cluster.env import DistEnv
from configlib import option
from trainer import distributed as D
from trainer.config import ObjectiveSection
from trainer.loop import Trainer, TrainingDiverged, lr_lambda
from trainer.objectives.base import ExtraModule, Objective, Phase
from trainer.registry import OBJECTIVES, ObjectiveEntry, config_from_dict, load_config

RECIPE = "recipes/tiny/flow2d.yaml"


@pytest.fixture(autouse=True)
def _close_process_group():
    yield
    D.close()


def make_cfg(tmp_path, *overrides):
    return load_config(
        RECIPE,
        [
            f"run.output_dir={tmp_path}",
            "cluster.num_workers=1",
            "eval.every=0",
            "schedule.warmup_steps=0",
            *overrides,
        ],
    )


# ------------------------------------------------------------ a two-player objective
@dataclass(kw_only=True)
class ToyAdversarialConfig:
    name: str = option("toy_adversarial", "Objective.")
    critic_every: int = option(2, "Update the critic every N steps.", ge=1)
    nan_at_steps: tuple[int, ...] = option((), "Steps whose model loss is NaN (guard test).")


class ToyAdversarial(Objective):
    """Model phase every step, a critic phase every N steps, plus a frozen 'teacher'."""

    def __init__(self, cfg, *, seed, rank, device):
        self.cfg = cfg
        self.calls = {"model": 0, "critic": 0}
        torch.manual_seed(0)
        self.critic = nn.Linear(2, 1)
        self.teacher = nn.Linear(2, 2)

    def phases(self):
        return [Phase("generator", "model"), Phase("critic", "critic", every=self.cfg.critic_every)]

    def extra_modules(self):
        return {
            "critic": ExtraModule(self.critic, trainable=True, optimizer={"lr": 1e-2}),
            "teacher": ExtraModule(self.teacher, trainable=False),
        }

    def loss(self, phase, modules, batch, step):
        x = batch["x"]
        t = torch.full((x.shape[0],), 0.5)
        if phase == "generator":
            self.calls["model"] += 1
            out = modules["model"](x, t)
            loss = (out - modules["teacher"](x)).pow(2).mean() - modules["critic"](out).mean()
            if step + 1 in self.cfg.nan_at_steps:
                loss = loss * float("nan")
            return loss, {"teacher_gap": 0.0}
        self.calls["critic"] += 1
        with torch.no_grad():
            fake = modules["model"](x, t)
        return modules["critic"](fake).mean() - modules["critic"](x).mean(), {}


@pytest.fixture
def toy_objective():
    OBJECTIVES["toy_adversarial"] = ObjectiveEntry(ToyAdversarialConfig, ToyAdversarial)
    ObjectiveSection.REGISTRY["toy_adversarial"] = ToyAdversarialConfig
    yield
    del OBJECTIVES["toy_adversarial"], ObjectiveSection.REGISTRY["toy_adversarial"]


def toy_cfg(tmp_path, *overrides):
    return make_cfg(tmp_path, "objective.name=toy_adversarial", *overrides)


def test_phases_update_their_own_modules_at_their_own_rate(tmp_path, toy_objective):
    """Critic phase runs every 2nd step with its own optimizer; the frozen teacher never changes."""
    cfg = toy_cfg(tmp_path, "run.max_steps=6", "checkpoint.every=6")
    trainer = Trainer(cfg, DistEnv("single"))
    teacher_before = trainer.modules["teacher"].weight.detach().clone()
    critic_before = [p.full_tensor().clone() for p in trainer.modules["critic"].parameters()]
    assert trainer.run() == 0
    assert set(trainer.optimizers) == {"model", "critic"}
    assert trainer.objective.calls == {"model": 6, "critic": 3}
    factor = lr_lambda(cfg.schedule, 6)(6)  # both LRs follow the global step
    assert trainer.optimizers["critic"].param_groups[0]["lr"] == pytest.approx(
        1e-2 * factor, rel=1e-6
    )
    assert trainer.optimizers["model"].param_groups[0]["lr"] == pytest.approx(
        cfg.optimizer.lr * factor, rel=1e-6
    )
    assert torch.equal(trainer.modules["teacher"].weight, teacher_before)
    assert not trainer.modules["teacher"].weight.requires_grad
    critic_after = [p.full_tensor() for p in trainer.modules["critic"].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(critic_after, critic_before))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "critic/loss" in records[0] and "teacher_gap" in records[0]
    assert (tmp_path / "checkpoints" / "step_00000006" / "meta.json").exists()


def test_extra_trainable_modules_are_checkpointed_and_restored(tmp_path, toy_objective):
    cfg = toy_cfg(tmp_path, "run.max_steps=4", "checkpoint.every=4")
    trainer = Trainer(cfg, DistEnv("single"))
    trainer.run()
    saved = {k: v.full_tensor().clone() for k, v in trainer.modules["critic"].state_dict().items()}
    D.close()
    cfg = toy_cfg(tmp_path, "run.max_steps=4", "checkpoint.every=4")
    again = Trainer(cfg, DistEnv("single"))
    assert again.maybe_resume()
    restored = {k: v.full_tensor() for k, v in again.modules["critic"].state_dict().items()}
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert again.counters.step == 4


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, toy_objective):
    """One NaN step is skipped (weights unchanged, counted); N in a row stop the run."""
    cfg = toy_cfg(
        tmp_path, "run.max_steps=3", "objective.nan_at_steps=[2]", "objective.critic_every=100"
    )
    trainer = Trainer(cfg, DistEnv("single"))
    trainer.train_step()
    before = [p.full_tensor().clone() for p in trainer.model.parameters()]
    logs = trainer.train_step()
    assert math.isnan(logs["loss"])
    assert all(torch.equal(a, p.full_tensor()) for a, p in zip(before, trainer.model.parameters()))
    assert trainer.counters.skipped_steps == 1 and trainer.counters.nonfinite_in_row == 1
    trainer.train_step()
    assert trainer.counters.nonfinite_in_row == 0
    D.close()
    cfg = toy_cfg(
        tmp_path / "b",
        "run.max_steps=9",
        "objective.nan_at_steps=[2,3,4]",
        "train.max_nonfinite_steps=3",
        "objective.critic_every=100",
    )
    trainer = Trainer(cfg, DistEnv("single"))
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        trainer.run()


def test_ema_tracks_the_weights_with_its_decay(tmp_path):
    cfg = make_cfg(tmp_path, "run.max_steps=3", "ema.decay=0.5", "ema.start_step=1")
    trainer = Trainer(cfg, DistEnv("single"))
    trainer.train_step()  # step 1 <= start_step: EMA copies the weights
    name, param = next((n, p) for n, p in trainer.ema.named if n == "out_proj.weight")
    assert torch.equal(trainer.ema.shadow[name].full_tensor(), param.full_tensor())
    before_ema = trainer.ema.shadow[name].full_tensor().clone()
    trainer.train_step()  # step 2: ema = 0.5 ema + 0.5 w
    expected = 0.5 * before_ema + 0.5 * param.full_tensor()
    assert torch.allclose(trainer.ema.shadow[name].full_tensor(), expected, atol=1e-7)
    with trainer.ema.swapped_in():
        assert torch.equal(param.full_tensor(), trainer.ema.shadow[name].full_tensor())
    assert not torch.equal(param.full_tensor(), trainer.ema.shadow[name].full_tensor())


def test_lr_schedules():
    cfg = load_config(
        RECIPE, ["schedule.name=cosine", "schedule.warmup_steps=10", "schedule.min_lr_ratio=0.1"]
    )
    f = lr_lambda(cfg.schedule, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert (
        f(10) == pytest.approx(1.0)
        and f(60) == pytest.approx(0.55)
        and f(110) == pytest.approx(0.1)
    )
    cfg = load_config(
        RECIPE, ["schedule.name=linear", "schedule.warmup_steps=0", "schedule.min_lr_ratio=0"]
    )
    g = lr_lambda(cfg.schedule, 100)
    assert (
        g(0) == pytest.approx(1.0) and g(50) == pytest.approx(0.5) and g(100) == pytest.approx(0.0)
    )


def test_activation_checkpointing_and_no_sharding_give_the_same_step(tmp_path):
    """Parallel plans change how a step is computed, never what: same loss and gradient norm."""
    results = []
    for extra in ([], ["parallel.activation_checkpointing=true"], ["parallel.backend=none"]):
        trainer = Trainer(
            make_cfg(tmp_path / str(len(results)), "run.max_steps=2", *extra), DistEnv("single")
        )
        results.append(trainer.train_step())
        D.close()
    for other in results[1:]:
        assert other["loss"] == pytest.approx(results[0]["loss"], rel=1e-6)
        assert other["grad_norm"] == pytest.approx(results[0]["grad_norm"], rel=1e-5)


def test_bf16_mixed_precision_trains(tmp_path):
    trainer = Trainer(
        make_cfg(tmp_path, "run.max_steps=2", "parallel.mixed_precision=bf16"), DistEnv("single")
    )
    logs = trainer.train_step()
    assert math.isfinite(logs["loss"])
    assert next(trainer.model.parameters()).dtype == torch.float32  # fp32 master weights


def test_metric_sinks_and_mfu(tmp_path):
    """TensorBoard and offline W&B get the metrics; MFU is logged when a peak is known."""
    cfg = make_cfg(
        tmp_path,
        "run.max_steps=4",
        "train.log_every=2",
        "logging.tensorboard=true",
        "logging.wandb=true",
        "logging.peak_tflops=0.001",
    )
    trainer = Trainer(cfg, DistEnv("single"))
    assert trainer.run() == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = trainer.flops_per_sample * records[-1]["samples_per_s"] / 1e9
    assert records[-1]["mfu"] == pytest.approx(expected, rel=1e-6)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_resolved_config_is_written_and_reloads(tmp_path):
    cfg = make_cfg(tmp_path, "run.max_steps=1", "optimizer.lr=0.0005")
    Trainer(cfg, DistEnv("single"))
    import yaml

    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg and again.optimizer.lr == 0.0005


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """4 micro-batches of 16 give the same step as one batch of 64 (up to float rounding)."""
    results = []
    for extra in ([], ["train.micro_batch_size=16"]):
        trainer = Trainer(
            make_cfg(tmp_path / str(len(results)), "run.max_steps=2", *extra), DistEnv("single")
        )
        assert trainer.accum_steps == (4 if extra else 1)
        results.append(
            (trainer.train_step(), [p.full_tensor().clone() for p in trainer.model.parameters()])
        )
        D.close()
    (logs_a, params_a), (logs_b, params_b) = results
    assert logs_b["loss"] == pytest.approx(logs_a["loss"], rel=1e-5)
    assert logs_b["grad_norm"] == pytest.approx(logs_a["grad_norm"], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params_a, params_b))


@pytest.mark.slow
def test_compiled_blocks_give_the_same_step(tmp_path):
    results = []
    for extra in ([], ["parallel.compile=true"]):
        trainer = Trainer(
            make_cfg(tmp_path / str(len(results)), "run.max_steps=2", *extra), DistEnv("single")
        )
        results.append(trainer.train_step())
        D.close()
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)
    assert results[1]["grad_norm"] == pytest.approx(results[0]["grad_norm"], rel=1e-4)
