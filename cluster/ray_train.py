"""Run one recipe on a Ray cluster with Ray Train.

``ray job submit --working-dir . -- python -m trainer.launch RECIPE.yaml [overrides]``
(detected by the variable the job supervisor sets in the entrypoint's environment), or
``cluster.launcher: ray`` from a shell on a cluster node, ends up in ``run_ray``: this
process (the driver) joins the cluster and runs ``trainer.loop.train`` on
``cluster.num_workers`` Ray Train workers. Ray places them, wires them into one process
group (gloo on CPU, gloo for CPU tensors + nccl on GPU, with ``cluster.timeout_s``) and,
when one fails, restarts them all together up to ``cluster.max_failures`` times. A
mistake a restart cannot fix ends the run with the one-line error a local launch
prints: at once for a bad config or an input or output the store refuses, after one
restart for bad data or tokenizer or a diverged run.

A restart resumes from our own ``latest`` checkpoint, exactly as rerunning the command
would; Ray's checkpoint API (``ray.train.report``) is deliberately unused, since our DCP
checkpoints already live on storage every worker reads (a shared disk or s3://).

Paths: inside a Ray job the driver runs in Ray's unpacked copy of ``--working-dir``, a
temporary folder on one node, so a relative ``run.output_dir`` would vanish with it.
Inside a job ``run.output_dir`` and a local ``checkpoint.dir`` must therefore be absolute
(on storage all nodes see) and a relative one is refused with one line. Relative input
paths (data, tokenizers) resolve inside the working-dir copy, which every worker gets too.
Outside a job, relative paths resolve against the launching directory, and the workers
run in that directory when their node has it (a shared file system).

Stopping: ``ray job stop`` (SIGTERM to the driver) and SIGUSR1 stop a run as they stop a
local or SLURM one: the driver passes the request on through a small Ray actor, which
rank 0 polls once a second (the loop shares it with the other ranks at each step); the
workers save a checkpoint at the next step boundary and return, and the driver exits 75.
Ray SIGKILLs a stopped job after ``RAY_JOB_STOP_WAIT_TIME_S`` (3 s unless set in the
job's runtime env), so give it the time a checkpoint takes. A second SIGTERM exits at
once. The first Ctrl-C in a driver shell is Ray Train's own: it aborts the workers
without a checkpoint, as does ``ray job stop`` under ``RAY_JOB_STOP_SIGNAL=SIGINT``.

Logs: every rank writes ``<output_dir>/logs/rank_*.log`` as in any launch; rank 0's
console (warnings: start, resume, errors) is what Ray streams to the job logs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from cluster.env import DistEnv

# Ray 2.60's job supervisor sets this (the job's runtime env as JSON) in the entrypoint's
# environment only: not in the shell that ran `ray job submit`, nor in Ray's workers.
RAY_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_ray_job(environ: dict[str, str] | None = None) -> bool:
    """True in the entrypoint of a ``ray job submit`` job."""
    return RAY_JOB_ENV_VAR in (os.environ if environ is None else environ)


def resolve_output_paths(cfg: Any, *, in_job: bool, cwd: str) -> Any:
    """``cfg`` with absolute run.output_dir and checkpoint.dir; ConfigError for a relative
    one inside a Ray job (see the module doc)."""
    from configlib import ConfigError

    problems: list[str] = []

    def absolute(key: str, value: str | None) -> str | None:
        if value is None or "://" in value or os.path.isabs(value):
            return value
        if in_job:
            problems.append(
                f"{key}: '{value}' is relative; inside a Ray job it would land in Ray's "
                "temporary copy of the working dir: give an absolute path on storage every "
                "node sees" + (" (or an s3:// URL)" if key == "checkpoint.dir" else "")
            )
        return os.path.normpath(os.path.join(cwd, value))

    output_dir = absolute("run.output_dir", cfg.run.output_dir)
    ckpt_dir = absolute("checkpoint.dir", cfg.checkpoint.dir)
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, output_dir=output_dir),
        checkpoint=dataclasses.replace(cfg.checkpoint, dir=ckpt_dir),
    )


class _OtherRanksErrorsOnly(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank != 0 and record.levelno >= logging.ERROR


def _quiet_ray_console(rank: int) -> None:
    """Ray Train sends every rank's INFO logs (and prints) to the job logs. Keep what a
    local launch shows: rank 0's warnings (through its own console handler, set up by the
    loop) plus any rank's errors; the rest stays in the rank log files."""
    for handler in logging.getLogger().handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        )
        if console and not getattr(handler, "_genflow", False):
            handler.addFilter(_OtherRanksErrorsOnly(rank))


class RunControl:
    """Held by a Ray actor the driver creates: whether the run was asked to stop, whether
    the workers then stopped at a checkpoint (not at the end of the run), and a mistake a
    worker found that a restart cannot fix (bad data, a diverged run)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.checkpointed = False
        self.fatal: tuple[int, str] | None = None

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def get(self) -> str | None:
        return self.reason

    def attempt_started(self) -> None:
        """A (re)started worker group: what an earlier attempt marked no longer holds."""
        self.checkpointed = False

    def mark_checkpointed(self) -> None:
        self.checkpointed = True

    def was_checkpointed(self) -> bool:
        return self.checkpointed

    def set_fatal(self, code: int, message: str) -> None:
        self.fatal = self.fatal or (code, message)

    def get_fatal(self) -> tuple[int, str] | None:
        return self.fatal


POLL_S = 1.0  # how often rank 0 asks the driver's RunControl


def _watch_stop_request(control: Any, done: threading.Event) -> None:
    """A worker's thread: turn the driver's stop request into ``request_stop``."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    from trainer.signals import request_stop

    while not done.wait(POLL_S):
        try:
            reason = ray.get(control.get.remote(), timeout=60)
        except GetTimeoutError:  # a busy node: ask again
            continue
        except RayActorError as err:  # it lives beside the driver: the run is ending
            logging.getLogger("trainer").warning("stop requests no longer reach this run: %s", err)
            return
        if reason:
            request_stop(f"{reason} on the Ray driver")
            return


class _DriverStop:
    """The driver's SIGTERM / SIGUSR1 handler: forwards the first one to the RunControl; a
    second one gets the previous handler (Ray's: exit at once), e.g. for a run whose
    workers never start."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, control: Any) -> None:
        self.control = control
        self.reason: str | None = None
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def install(self) -> _DriverStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        threading.Thread(target=self._forward, daemon=True, name="stop-forward").start()
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        # a signal handler does the least: Ray calls and printing happen in _forward
        if self.reason is None:
            self.reason = signal.Signals(signum).name
            self._event.set()
            return
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    def _forward(self) -> None:
        import ray

        self._event.wait()
        grace = os.environ.get("RAY_JOB_STOP_WAIT_TIME_S")
        print(
            f"received {self.reason}: the workers will checkpoint and stop at the next step "
            "boundary"
            + (
                f" (a stopped Ray job is killed after RAY_JOB_STOP_WAIT_TIME_S="
                f"{grace or '3 (default)'} s)"
                if in_ray_job()
                else ""
            ),
            file=sys.stderr,
            flush=True,
        )
        try:
            ray.get(self.control.request.remote(self.reason), timeout=60)
        except Exception as err:
            print(f"warning: could not reach the workers ({err})", file=sys.stderr, flush=True)


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: one rank of ``trainer.loop.train``. Raises on any failure so
    that Ray counts it against ``cluster.max_failures`` and restarts the group; returns
    after a stop the driver asked for (checkpoint saved).

    A mistake that a restart cannot fix (the errors a local launch reports in one line:
    bad config, an input or output the store refuses, bad data or tokenizer, a diverged
    run) is recorded for the driver. Config and store mistakes meet every rank alike, so
    the worker returns without raising and the run ends at once; for the others the
    worker raises, the restarted group returns at once, and the run ends after one
    restart with that message, even under ``cluster.max_failures: -1``."""
    import ray
    import ray.train

    from configlib import ConfigError
    from data_pipeline.loader import DataError
    from data_pipeline.storage import InputError
    from data_pipeline.tokenizer import TokenizerError
    from trainer import distributed as D
    from trainer.loop import TrainingDiverged, train
    from trainer.signals import (
        EXIT_CONFIG_ERROR,
        EXIT_FAILED,
        EXIT_OK,
        EXIT_PREEMPTED,
        clear_stop_request,
    )

    cfg = config["cfg"]
    if config["cwd"] and os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])
    ctx = ray.train.get_context()
    env = DistEnv(
        "ray",
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        local_world_size=ctx.get_local_world_size(),
    )
    _quiet_ray_console(env.rank)
    control, done = config["control"], threading.Event()
    if ray.get(control.get_fatal.remote(), timeout=60) is not None:
        return  # an earlier attempt failed for good: end the run (the driver reports it)
    clear_stop_request()
    if env.rank == 0:  # the loop tells the other ranks (it all-reduces the request each step)
        ray.get(control.attempt_started.remote())
        threading.Thread(target=_watch_stop_request, args=(control, done), daemon=True).start()
    # Ray Train already joined the process group (TorchConfig); init_distributed keeps it.
    try:
        code = train(cfg, env)
    except (ConfigError, InputError, DataError, TokenizerError, TrainingDiverged) as err:
        same_everywhere = isinstance(err, (ConfigError, InputError))
        code = EXIT_CONFIG_ERROR if same_everywhere else EXIT_FAILED
        ray.get(control.set_fatal.remote(code, f"rank {env.rank}: {err}"), timeout=60)
        if same_everywhere:
            # every rank meets the same recipe and stores and returns here: the driver
            # prints the line, and Ray Train has no worker traceback to add to the logs
            return
        raise
    except RuntimeError as err:
        message = D.report_timeout(err, env.rank, cfg.cluster.timeout_s)
        if message is None:
            raise
        logging.getLogger("trainer").error(message)
        raise RuntimeError(message) from None
    finally:
        done.set()
        clear_stop_request()
    if code == EXIT_PREEMPTED:  # every rank stops at the same step (the loop agrees on it)
        if env.rank == 0:
            try:
                ray.get(control.mark_checkpointed.remote(), timeout=60)
            except Exception as err:  # the checkpoint is saved: not a reason to restart
                logging.getLogger("trainer").warning("could not tell the driver: %s", err)
        return
    if code != EXIT_OK:
        raise RuntimeError(f"rank {env.rank}: training stopped with exit code {code}")


def run_ray(cfg: Any, *, fresh: bool = False) -> int:
    """Drive a Ray Train run of ``cfg`` to its end; returns the process exit code."""
    from configlib import ConfigError
    from trainer.config import check_world_size
    from trainer.signals import EXIT_CONFIG_ERROR, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED

    in_job = in_ray_job()
    try:
        cfg = resolve_output_paths(cfg, in_job=in_job, cwd=os.getcwd())
        check_world_size(cfg, cfg.cluster.num_workers)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster = cfg.cluster
    try:
        ray.init(address=cluster.ray_address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as err:
        print(
            f"error: cluster.ray_address={cluster.ray_address!r}: cannot reach a Ray cluster "
            f"({err}); start one with `ray start --head`, or give HOST:PORT",
            file=sys.stderr,
        )
        return EXIT_FAILED
    stop = None
    try:
        # after ray.init, which installs its own SIGTERM handler (exit at once); the actor
        # lives on the driver's node, so it goes only when the driver's node goes
        control = (
            ray.remote(num_cpus=0)(RunControl)
            .options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    node_id=ray.get_runtime_context().get_node_id(), soft=False
                )
            )
            .remote()
        )
        stop = _DriverStop(control).install()
        available = ray.cluster_resources()
        use_gpu = cluster.device == "cuda" or (
            cluster.device == "auto" and available.get("GPU", 0) > 0
        )
        per_worker = {"CPU": cluster.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        for resource, amount in per_worker.items():
            if amount * cluster.num_workers > available.get(resource, 0):
                # not an error: an autoscaling cluster may still add nodes
                print(
                    f"warning: {cluster.num_workers} workers need {amount * cluster.num_workers:g} "
                    f"{resource} but the cluster has {available.get(resource, 0):g} now; "
                    "waiting for more nodes",
                    file=sys.stderr,
                )
        if fresh:
            _wipe_run(cfg)
        print(
            f"ray: {cluster.num_workers} workers x {per_worker} "
            f"({'gloo+nccl' if use_gpu else 'gloo'}, timeout {cluster.timeout_s}s, "
            f"max_failures {cluster.max_failures}), run dir {cfg.run.output_dir}",
            flush=True,
        )
        trainer = TorchTrainer(
            _train_worker,
            # a restart calls _train_worker again: never with --fresh (it was applied above)
            train_loop_config={
                "cfg": cfg,
                "cwd": None if in_job else os.getcwd(),
                "control": control,
            },
            torch_config=TorchConfig(
                backend="cpu:gloo,cuda:nccl" if use_gpu else "gloo",
                timeout_s=cluster.timeout_s,
            ),
            scaling_config=ScalingConfig(
                num_workers=cluster.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
            ),
            run_config=RunConfig(
                name="ray_train",
                storage_path=cfg.run.output_dir,
                failure_config=FailureConfig(max_failures=cluster.max_failures),
            ),
        )
        failed = None
        try:
            trainer.fit()
        except TrainingFailedError as err:
            failed = err
        # a worker's recorded mistake: Ray Train's error (or success, after the restarted
        # group returned at once) says less than the rank's own line
        fatal = ray.get(control.get_fatal.remote(), timeout=60)
        if fatal is not None:
            print(f"error: {fatal[1]} (not retried: a restart cannot fix it)", file=sys.stderr)
            return fatal[0]
        if failed is not None:
            print(
                f"error: Ray Train gave up (cluster.max_failures={cluster.max_failures}): {failed}",
                file=sys.stderr,
            )
            return EXIT_FAILED
        if stop.reason is not None and ray.get(control.was_checkpointed.remote(), timeout=60):
            print(
                f"stopped on {stop.reason}: checkpoint saved; run the same command again to resume",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_PREEMPTED
        return EXIT_OK
    finally:
        if stop is not None:
            stop.uninstall()
        ray.shutdown()


def _wipe_run(cfg: Any) -> None:
    """``--fresh`` on the driver, once: a restarted worker group must resume, not wipe."""
    from trainer.checkpoint import CheckpointStore

    root = cfg.checkpoint.dir or os.path.join(cfg.run.output_dir, "checkpoints")
    print(f"--fresh: removing checkpoints under {root} and old metrics", file=sys.stderr)
    CheckpointStore(root).wipe()
    (Path(cfg.run.output_dir) / "metrics.jsonl").unlink(missing_ok=True)
