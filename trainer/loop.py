"""The one training loop every family runs through.

``train(cfg, env, fresh)`` is called once per rank. It builds the model on the meta
device, lets the family parallelize it, materialises and initialises it, restores the
latest checkpoint when there is one, and trains until ``run.max_steps`` or a
preemption signal. It returns a process exit code (see trainer.signals).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cluster.env import DistEnv
from configlib import ConfigError
from data_pipeline.storage import storage_errors
from trainer import distributed as D
from trainer.backends import make_backend
from trainer.backends.base import make_optimizer  # noqa: F401  (re-exported for benchmarks)
from trainer.checkpoint import CheckpointManager
from trainer.config import Config, OptimizerConfig, check_world_size, dump_config
from trainer.export import load_start
from trainer.metrics import MetricsLogger, device_peak_tflops, truncate_jsonl
from trainer.objectives.base import EvalContext, Objective
from trainer.registry import DATA, MODELS, OBJECTIVES
from trainer.signals import EXIT_OK, EXIT_PREEMPTED, PreemptionGuard
from trainer.warm_start import Start

log = logging.getLogger("trainer")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps."""


@dataclass
class Counters:
    step: int = 0
    samples: int = 0
    nonfinite_in_row: int = 0
    skipped_steps: int = 0


def lr_lambda(schedule, max_steps: int):
    """Multiplier of the peak LR at a given step: linear warmup, then the decay shape."""

    def factor(step: int) -> float:
        if schedule.warmup_steps and step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        if schedule.name == "constant":
            return 1.0
        span = max(1, max_steps - schedule.warmup_steps)
        progress = min(1.0, (step - schedule.warmup_steps) / span)
        floor = schedule.min_lr_ratio
        if schedule.name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return factor


def setup_logging(output_dir: Path, rank: int) -> None:
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if getattr(handler, "_genflow", False):
            root.removeHandler(handler)
    logs = output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(logs / f"rank_{rank:05d}.log")
    file_handler.setFormatter(fmt)
    file_handler._genflow = True
    root.addHandler(file_handler)
    if rank == 0:
        train_log = logging.FileHandler(output_dir / "train.log")
        train_log.setFormatter(fmt)
        train_log._genflow = True
        root.addHandler(train_log)
        console = logging.StreamHandler()
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        console._genflow = True
        root.addHandler(console)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    """State and steps of one rank's training run."""

    def __init__(self, cfg: Config, env: DistEnv, *, fresh: bool = False):
        self.cfg = cfg
        self.env = env
        self.device = D.pick_device(cfg.cluster.device, env.local_rank)
        D.init_distributed(env, self.device, cfg.cluster.timeout_s)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.micro_batch, self.accum_steps = check_world_size(cfg, self.world_size)
        # the ranks of a context-parallel group split one sample's tokens: they read the
        # same data and draw the same noise, as one data-parallel rank
        self.context_parallel = cfg.parallel.context_parallel
        self.dp_rank = self.rank // self.context_parallel
        self.dp_size = self.world_size // self.context_parallel
        self.output_dir = Path(cfg.run.output_dir)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        setup_logging(self.output_dir, self.rank)

        ckpt_root = cfg.checkpoint.dir or str(self.output_dir / "checkpoints")
        self.backend = make_backend(
            cfg.parallel,
            grad_clip=cfg.train.grad_clip,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            micro_batch=self.micro_batch,
            accum_steps=self.accum_steps,
            local_rank=env.local_rank,
        )
        self.ckpt = CheckpointManager(
            ckpt_root,
            rank=self.rank,
            world_size=self.world_size,
            keep_last=cfg.checkpoint.keep_last,
            async_save=cfg.checkpoint.async_save,
            device=self.device,
            shards=self.backend.shards,
        )
        if fresh and self.rank == 0:
            log.warning("--fresh: removing checkpoints under %s and old metrics", ckpt_root)
            with self._ckpt_errors():
                self.ckpt.store.wipe()
            (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
        dist.barrier()
        if self.rank == 0:
            tmp = self.output_dir / "config.yaml.tmp"
            tmp.write_text(dump_config(cfg))
            tmp.replace(self.output_dir / "config.yaml")

        torch.manual_seed(cfg.run.seed * 7919 + self.dp_rank)
        np.random.seed((cfg.run.seed * 7919 + self.dp_rank) % 2**32)
        random.seed(cfg.run.seed * 7919 + self.dp_rank)

        resume_meta = None
        if cfg.checkpoint.resume:
            # Before building: a checkpoint of another backend is a user mistake, and an
            # engine may have to be built for what it loads (DeepSpeed: universal loading).
            with self._ckpt_errors():
                resume_meta = self.ckpt.latest_meta()
                self.backend.expect_resume(resume_meta)
        start = Start(cfg.run.seed, trainable=cfg.train.trainable)
        if cfg.init.path is not None and resume_meta is None:  # a resumed run has its own
            start.state, start.source = load_start(cfg.init, cfg.model.name)
        self.model = self.backend.build_model(
            MODELS[cfg.model.name], cfg.model, cfg.optimizer, start
        )
        if self.rank == 0 and (start.state is not None or start.frozen):
            log.warning(
                "model starts from %s; %d of its parameter tensors frozen",
                start.source or f"random weights (seed {cfg.run.seed})",
                len(start.frozen),
            )
        self.objective: Objective = OBJECTIVES[cfg.objective.name].build(
            cfg.objective, seed=cfg.run.seed, rank=self.dp_rank, device=self.device
        )
        problems = self.objective.model_problems(cfg.model)
        if problems:
            raise ConfigError(problems)
        for name, extra in self.objective.extra_modules().items():
            opt_cfg = OptimizerConfig(**{**cfg.optimizer.__dict__, **extra.optimizer})
            self.backend.add_module(name, extra, opt_cfg)
        self.modules: dict[str, nn.Module] = self.backend.modules
        self.optimizers: dict[str, torch.optim.Optimizer] = self.backend.optimizers
        factor = lr_lambda(cfg.schedule, cfg.run.max_steps)
        self.schedulers = {
            name: torch.optim.lr_scheduler.LambdaLR(opt, factor)
            for name, opt in self.optimizers.items()
        }
        self.ema = self.backend.make_ema(cfg.ema.decay) if cfg.ema.enabled else None
        self.data = DATA[cfg.data.name].build(
            cfg.data,
            seed=cfg.run.seed,
            rank=self.dp_rank,
            world_size=self.dp_size,
            micro_batch=self.micro_batch,
            accum_steps=self.accum_steps,
        )
        self.counters = Counters()
        self.flops_per_sample = self.backend.flops_per_sample
        device_name = (
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        )
        self.peak_tflops = device_peak_tflops(device_name, cfg.logging.peak_tflops)

    # -------------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {
            "counters": self.counters.__dict__.copy(),
            "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()},
            "world_size": self.world_size,
            "context_parallel": self.context_parallel,
        }

    def rank_state(self) -> dict[str, Any]:
        return {
            "rng": _rng_state(),
            "data": self.data.state_dict(),
            "objective": self.objective.state_dict(),
        }

    def _ckpt_errors(self):
        """A store that refuses the checkpoint dir (credentials, bucket, access) names its key."""
        key = "checkpoint.dir" if self.cfg.checkpoint.dir else "run.output_dir"
        return storage_errors(key, self.ckpt.store.root)

    def save(self, *, blocking: bool | None = None) -> float:
        with self._ckpt_errors():
            return self.ckpt.save(
                self.counters.step,
                self.backend.checkpoint_state(self.ema),
                self.trainer_state(),
                self.rank_state(),
                blocking=blocking,
            )

    def maybe_resume(self) -> bool:
        with self._ckpt_errors():
            return self._resume()

    def _resume(self) -> bool:
        self.ckpt.clean_incomplete()
        if not self.cfg.checkpoint.resume or self.ckpt.store.latest_step() is None:
            # Nothing to load: building the state now would not be free. DCP's
            # get_optimizer_state_dict initialises empty optimizer state with a zero-LR
            # step, so a fresh run's first real AdamW step would count as its second.
            return False
        state = self.backend.checkpoint_state(self.ema)
        loaded = self.ckpt.load_latest(state)
        if loaded is None:
            return False
        self.backend.restore(state)
        self.counters = Counters(**loaded.trainer_state["counters"])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(loaded.trainer_state["schedulers"][name])
        # one state per data-parallel rank: the first rank of each context-parallel group
        saved_cp = loaded.trainer_state.get("context_parallel", 1)
        dp_states = loaded.all_rank_states[::saved_cp]
        self.data.load_state_dict([s["data"] for s in dp_states])
        same_layout = (loaded.saved_world_size, saved_cp) == (
            self.world_size,
            self.context_parallel,
        )
        if loaded.rank_state is not None and same_layout:
            _set_rng_state(loaded.rank_state["rng"])
            self.objective.load_state_dict(loaded.rank_state["objective"])
        else:
            # New world size: per-rank random streams cannot be carried over one to one;
            # reseed them from (seed, rank, step) so the run stays reproducible.
            seed = self.cfg.run.seed * 7919 + self.dp_rank + 104729 * loaded.step
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            if self.dp_rank < len(dp_states):
                self.objective.load_state_dict(dp_states[self.dp_rank]["objective"])
        if self.rank == 0:
            dropped = truncate_jsonl(self.output_dir / "metrics.jsonl", loaded.step)
            log.warning(
                "resumed from step %d (saved on %d ranks, now %d)%s",
                loaded.step,
                loaded.saved_world_size,
                self.world_size,
                f"; dropped {dropped} metric records past it" if dropped else "",
            )
        return True

    # -------------------------------------------------------------------------- steps
    def train_step(self) -> dict[str, float]:
        """One optimizer step of every phase due now; returns logs (averaged over ranks)."""
        step = self.counters.step
        wait = 0.0
        batches = []
        for _ in range(self.accum_steps):
            t0 = time.perf_counter()
            batches.append(self.data.next_batch())
            wait += time.perf_counter() - t0
        logs: dict[str, float] = {"data_wait_s": wait}
        all_finite = True
        for phase in self.objective.phases():
            if step % phase.every:
                continue
            modules = self.backend.begin_phase(phase.module)
            loss_sum = torch.zeros((), device=self.device)
            extra_sums: dict[str, list[float]] = {}  # key -> [sum, count] of finite values
            for index, batch in enumerate(batches):
                with self.backend.autocast():
                    loss, extra = self.objective.loss(phase.name, modules, batch, step)
                self.backend.backward(phase.module, loss, index, len(batches))
                loss_sum += loss.detach().float()
                for key, value in extra.items():
                    acc = extra_sums.setdefault(key, [0.0, 0.0])
                    if math.isfinite(float(value)):  # NaN = "no data" (e.g. an empty time bin)
                        acc[0] += float(value)
                        acc[1] += 1
            loss_mean = D.all_mean(loss_sum / len(batches))
            grad_norm, applied = self.backend.finish_phase(
                phase.module, bool(torch.isfinite(loss_mean))
            )
            all_finite = all_finite and applied
            prefix = "" if phase.module == "model" else f"{phase.name}/"
            logs[f"{prefix}loss"] = float(loss_mean)
            logs[f"{prefix}grad_norm"] = grad_norm
            logs[f"{prefix}lr"] = self.optimizers[phase.module].param_groups[0]["lr"]
            for key, value in D.all_nanmean(extra_sums, self.device).items():
                logs[f"{prefix}{key}"] = value
        self.backend.reshard()
        for scheduler in self.schedulers.values():  # every LR follows the global step
            scheduler.step()
        if all_finite:
            self.counters.nonfinite_in_row = 0
            if self.ema is not None:
                if step + 1 <= self.cfg.ema.start_step:
                    self.ema.copy_from_model()  # track the weights until averaging starts
                elif (step + 1) % self.cfg.ema.every == 0:
                    self.ema.update()
        else:
            self.counters.nonfinite_in_row += 1
            self.counters.skipped_steps += 1
            log.warning(
                "step %d: non-finite loss or gradient, update skipped (%d in a row)",
                step + 1,
                self.counters.nonfinite_in_row,
            )
            if self.counters.nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"stopping at step {step + 1}: {self.counters.nonfinite_in_row} consecutive steps had a non-finite "
                    f"loss or gradient (train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); "
                    "lower optimizer.lr, enable train.grad_clip, or check the data"
                )
        self.counters.step += 1
        self.counters.samples += getattr(self.data, "last_global_batch", self.cfg.train.batch_size)
        return logs

    def evaluate(self) -> dict[str, float]:
        if self.ema is not None and self.cfg.eval.use_ema:
            ctx_manager = self.ema.swapped_in()
        else:
            import contextlib

            ctx_manager = contextlib.nullcontext()
        was_training = self.model.training
        self.model.eval()
        with ctx_manager, torch.no_grad():
            result = self.objective.evaluate(
                EvalContext(
                    modules=self.modules,
                    data=self.data,
                    out_dir=self.output_dir / "samples",
                    step=self.counters.step,
                    num_samples=self.cfg.eval.num_samples,
                    sample_steps=self.cfg.eval.sample_steps,
                    device=self.device,
                    rank=self.rank,
                    world_size=self.world_size,
                    guidance=self.cfg.eval.guidance,
                    text_checks=tuple(self.cfg.eval.text_checks),
                    gen_ppl_run=self.cfg.eval.gen_ppl_run,
                    load_run=self._load_other_run,
                )
            )
        self.model.train(was_training)
        self.backend.reshard()
        return result

    def _load_other_run(self, run_dir: str) -> tuple[nn.Module, Objective]:
        """Another run's weights and objective, for evaluations that score with it."""
        from trainer.sample import load_run

        _, model, objective, _ = load_run(Path(run_dir), None, None, self.device)
        return model, objective

    # --------------------------------------------------------------------------- run
    def run(self) -> int:
        cfg = self.cfg
        resumed = self.maybe_resume()
        start_step = self.counters.step
        if self.rank == 0:
            n_params = self.backend.num_params()
            log.warning(
                "%s: %s (%.2fM params) on %d rank(s) [%s], %s, steps %d -> %d",
                "resuming" if resumed else "starting",
                cfg.model.name,
                n_params / 1e6,
                self.world_size,
                self.device.type,
                cfg.parallel.backend,
                start_step,
                cfg.run.max_steps,
            )
        metrics = MetricsLogger(
            self.output_dir,
            enabled=self.rank == 0,
            total_steps=cfg.run.max_steps,
            start_step=start_step,
            cfg_logging=cfg.logging,
            run_config={},
        )
        guard = PreemptionGuard().install()
        window_time = window_wait = 0.0
        window_steps = window_samples = 0
        window_logs: dict[str, list[float]] = {}  # key -> [sum, count] over the window
        last_ckpt_step = start_step if resumed else -1
        try:
            while self.counters.step < cfg.run.max_steps:
                D.current_step = self.counters.step + 1  # named by collective-timeout reports
                t0 = time.perf_counter()
                logs = self.train_step()
                self.ckpt.poll()
                step = self.counters.step
                window_time += time.perf_counter() - t0
                window_wait += logs.pop("data_wait_s")
                window_steps += 1
                for key, value in logs.items():  # mean over the logging window (last LR)
                    if key.endswith("lr"):
                        window_logs[key] = [value, 1]
                    elif math.isfinite(value):
                        acc = window_logs.setdefault(key, [0.0, 0])
                        acc[0] += value
                        acc[1] += 1
                    else:
                        window_logs.setdefault(key, [0.0, 0])
                window_samples += getattr(self.data, "last_global_batch", cfg.train.batch_size)
                samples_per_s = window_samples / max(window_time, 1e-9)
                metrics.progress(step, logs.get("loss"), samples_per_s)
                if step % cfg.train.log_every == 0 or step == cfg.run.max_steps:
                    record = {
                        "step": step,
                        **{
                            k: (total / n if n else float("nan"))
                            for k, (total, n) in window_logs.items()
                        },
                        "samples_per_s": samples_per_s,
                        "data_wait_frac": window_wait / max(window_time, 1e-9),
                        "samples": self.counters.samples,
                        "skipped_steps": self.counters.skipped_steps,
                    }
                    if self.flops_per_sample and self.peak_tflops:
                        achieved = self.flops_per_sample * samples_per_s / self.world_size
                        record["mfu"] = achieved / (self.peak_tflops * 1e12)
                    metrics.log(record)
                    window_time = window_wait = 0.0
                    window_steps = window_samples = 0
                    window_logs = {}
                if cfg.eval.every and step % cfg.eval.every == 0:
                    eval_logs = self.evaluate()
                    if eval_logs:
                        metrics.log({"step": step, **eval_logs})
                stop = D.any_rank(guard.requested is not None, self.device)
                if stop or step % cfg.checkpoint.every == 0:
                    blocked = self.save(blocking=True if stop else None)
                    last_ckpt_step = step
                    log.info("step %d: checkpoint took %.2fs of training time", step, blocked)
                if stop:
                    self.ckpt.wait()
                    if self.rank == 0:
                        log.warning(
                            "stopped at step %d on %s; checkpoint saved, rerun the same command to resume",
                            step,
                            guard.requested or "a signal on another rank",
                        )
                    return EXIT_PREEMPTED
            if last_ckpt_step != self.counters.step:
                self.save(blocking=True)
            self.ckpt.wait()
            if cfg.eval.every and self.counters.step % cfg.eval.every != 0:
                eval_logs = self.evaluate()
                if eval_logs:
                    metrics.log({"step": self.counters.step, **eval_logs})
            return EXIT_OK
        finally:
            guard.uninstall()
            metrics.close()
            self.ckpt.close()


def train(cfg: Config, env: DistEnv, *, fresh: bool = False) -> int:
    trainer = Trainer(cfg, env, fresh=fresh)
    try:
        return trainer.run()
    finally:
        D.close()
