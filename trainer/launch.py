"""``python -m trainer.launch RECIPE.yaml [dotted.key=value ...] [--fresh]``

Parse the recipe, work out where we run (torchrun / SLURM / local), start the ranks,
train, close. Locally with ``cluster.num_workers: N > 1`` this process becomes a small
supervisor that starts N copies of itself as ranks, forwards signals to them, and
stops them all if one fails.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from configlib import ConfigError

if TYPE_CHECKING:
    from cluster.env import SlurmNode
from trainer.signals import EXIT_COLLECTIVE_TIMEOUT, EXIT_CONFIG_ERROR, EXIT_FAILED


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.launch", description=__doc__.splitlines()[0]
    )
    parser.add_argument("recipe", help="path to a recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of recipe fields")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="ignore and delete existing checkpoints; start from step 0",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the recipe and look up every input and output (data, weights, "
        "tokenizers, checkpoint dir, credentials), print what was found, exit 0 or 2; "
        "trains nothing",
    )
    return parser.parse_intermixed_args(argv)


def supervise_local(num_workers: int, argv: list[str], node: SlurmNode | None = None) -> int:
    """Start ``num_workers`` ranks of this same command on this machine and wait for them.

    With ``node`` (one launcher per node of a SLURM job, see cluster/slurm.py) they are
    ranks ``node_rank * num_workers ...`` of ``num_nodes * num_workers``, meeting at the
    node's ``master_addr:master_port``.
    """
    from cluster.env import free_port

    if node is None:
        node_rank, num_nodes, addr, port = 0, 1, "127.0.0.1", free_port()
    else:
        node_rank, num_nodes = node.node_rank, node.num_nodes
        addr, port = node.master_addr, node.master_port
        print(
            f"launch: node {node_rank} of {num_nodes}: ranks {node_rank * num_workers}.."
            f"{(node_rank + 1) * num_workers - 1} of {num_nodes * num_workers}, "
            f"rendezvous {addr}:{port}",
            file=sys.stderr,
            flush=True,
        )
    procs = []
    for local_rank in range(num_workers):
        rank = node_rank * num_workers + local_rank
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(num_nodes * num_workers),
            LOCAL_RANK=str(local_rank),
            LOCAL_WORLD_SIZE=str(num_workers),
            MASTER_ADDR=addr,
            MASTER_PORT=str(port),
            GENFLOW_LOCAL_SUPERVISOR="1",
        )
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_workers)))
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer.launch", *argv], env=env))

    interrupts = 0

    def forward(signum, frame):
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
        for proc in procs:
            if proc.poll() is None:
                # a second Ctrl-C aborts even ranks stuck in a collective
                proc.kill() if interrupts >= 2 else proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)
    exit_code = 0
    while True:
        codes = [proc.poll() for proc in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed and exit_code == 0:
            exit_code = failed[0]
            # one rank died: give the others a moment to exit on their own, then stop them;
            # after a collective timeout the others are hung (or stopped) in it: stop them now
            grace = 0 if exit_code == EXIT_COLLECTIVE_TIMEOUT else 30
            rank = node_rank * num_workers + codes.index(exit_code)
            if exit_code != EXIT_CONFIG_ERROR:  # that rank's error line already says why
                print(
                    f"launch: rank {rank} exited with code {exit_code}; stopping", file=sys.stderr
                )
            deadline = time.time() + grace
            while time.time() < deadline and any(p.poll() is None for p in procs):
                time.sleep(0.2)
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        if all(c is not None for c in (proc.poll() for proc in procs)):
            break
        time.sleep(0.2)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        from trainer.registry import load_config

        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from cluster.ray_train import in_ray_job

    wants_ray = cfg.cluster.launcher == "ray" or (cfg.cluster.launcher == "auto" and in_ray_job())
    # once per launcher: the ranks a local supervisor starts skip it
    if args.check or os.environ.get("GENFLOW_LOCAL_SUPERVISOR") != "1":
        from trainer.preflight import check_run, format_table

        rows = check_run(cfg)
        if args.check:
            print(f"check: {args.recipe}\n{format_table(rows)}")
        problems = [row.problem for row in rows if row.problem]
        if wants_ray and not args.check:
            # the driver's node may not see what the workers' nodes see (node-local
            # copies); a remote store looks the same from every node
            for row in rows:
                if row.problem and not row.remote:
                    print(
                        f"warning: {row.problem} (on this node; Ray workers may see it)",
                        file=sys.stderr,
                    )
            problems = [row.problem for row in rows if row.problem and row.remote]
        if problems:
            print(f"error: {ConfigError(problems, args.recipe)}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        if args.check:
            return 0

    from cluster.env import detect, slurm_node

    # SLURM batch job (cluster/slurm.py): srun starts one launcher per node; each one
    # supervises cluster.num_workers ranks on its node
    node = slurm_node(cfg.cluster.launcher) if cfg.cluster.num_workers > 1 else None
    if node is not None:
        return supervise_local(cfg.cluster.num_workers, argv, node=node)

    env = detect(cfg.cluster.launcher)
    if env.kind == "single" and wants_ray:
        from cluster.ray_train import run_ray

        return run_ray(cfg, fresh=args.fresh)
    if (
        env.kind == "single"
        and cfg.cluster.num_workers > 1
        and cfg.cluster.launcher in ("auto", "local")
    ):
        return supervise_local(cfg.cluster.num_workers, argv)

    from data_pipeline.loader import DataError
    from data_pipeline.storage import InputError
    from data_pipeline.tokenizer import TokenizerError
    from trainer.loop import TrainingDiverged, train

    try:
        return train(cfg, env, fresh=args.fresh)
    except (ConfigError, InputError) as err:
        # every rank reads the same stores (each one lists every shard for the global
        # plan) and meets the same InputError: rank 0 says it, the others stay quiet. A
        # recipe problem found once the run is built (model against objective, init.path)
        # is said once per node: a local file may be missing on one node only.
        if env.rank == 0 or (isinstance(err, ConfigError) and env.local_rank == 0):
            print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (TrainingDiverged, DataError, TokenizerError) as err:
        # data found broken after the start (corrupt shards, a tokenizer that does not
        # match them): a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except RuntimeError as err:
        from trainer.distributed import report_timeout

        message = report_timeout(err, env.rank, cfg.cluster.timeout_s)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_COLLECTIVE_TIMEOUT


if __name__ == "__main__":
    sys.exit(main())
