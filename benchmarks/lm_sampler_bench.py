"""Sample quality of each sampler of trained language-model runs on builtin:arith: the share
of correct ``A + B = C`` lines (the scoring of ``eval/arith_valid_frac``), side by side on
the same checkpoints.

    python benchmarks/lm_sampler_bench.py --run RUN_DIR [--run ...] [--samplers ...]
        [--steps 32] [--num 256] [--seed 1] [--step N]

For each run (a run directory with checkpoints, e.g. recipes/tiny/mdlm.yaml trained on
`make arith` data) and each sampler its objective offers (or those of ``--samplers`` it
has), prints one markdown row: objective, step, sampler, sampler steps, correct share,
well-formed share, complete lines, sampling seconds. Every sampler draws ``--num``
windows of the run's ``data.seq_len`` tokens from the same seed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import get_args, get_type_hints

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, action="append", required=True)
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: latest)")
    parser.add_argument("--samplers", nargs="*", default=None, help="default: all of each run")
    parser.add_argument("--steps", type=int, nargs="+", default=[32])
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    from data_pipeline.arith import arith_score
    from data_pipeline.text_tokens import decode_text
    from trainer.sample import load_run

    print(
        "| objective | train steps | sampler | sampler steps | correct | well formed | lines | s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in args.run:
        cfg, model, objective, step = load_run(run, args.step, None, torch.device("cpu"))
        offered = get_args(get_type_hints(type(cfg.objective))["sampler"])
        samplers = [s for s in offered if args.samplers is None or s in args.samplers]
        for steps in args.steps:
            for sampler in samplers:
                gen = torch.Generator().manual_seed(args.seed)
                start = time.perf_counter()
                tokens = objective.generate(
                    model, args.num, cfg.data.seq_len, steps=steps, generator=gen, sampler=sampler
                )
                seconds = time.perf_counter() - start
                texts = [decode_text(objective.tokenizer, row.tolist()) for row in tokens]
                score = arith_score(texts)
                print(
                    f"| {cfg.objective.name} | {step} | {sampler} | {steps} | "
                    f"{score['valid_frac']:.2f} | {score['wellformed_frac']:.2f} | "
                    f"{score['complete_lines']} | {seconds:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
