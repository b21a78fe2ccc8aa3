"""Evaluation shared by the language-model objectives (MDLM, SEDD, BD3-LM, AR).

One call of ``evaluate_lm`` during training (every ``eval.every`` steps) reports:

- ``eval/bits_per_token`` and ``eval/ppl`` (AR: exact) or ``eval/ppl_bound`` (diffusion:
  exp of the NELBO per token, an upper bound on perplexity) on the data source's held-out
  sequences, summed over all ranks;
- samples: ``eval.num_samples`` sequences of the training length drawn with the
  objective's sampler (``eval.sample_steps`` steps), decoded and written to
  ``<output_dir>/samples/samples_step<N>.jsonl`` (one ``{"text": ...}`` per sample);
- ``eval/gen_ppl``: perplexity of those samples under a trained AR model
  (``eval.gen_ppl_run``, a run directory), the usual sample-quality measure;
- ``eval/arith_valid_frac`` with ``eval.text_checks: [arith]``: the fraction of complete
  sample lines that are correct ``A + B = C`` statements (the builtin:arith corpus), and
  ``eval/arith_wellformed_frac``: the fraction in that format whatever the sum.

Shapes: B sequences, L tokens.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.objectives.base import EvalContext

# Held-out sequences scored per evaluation: enough for a stable figure, bounded in time.
MAX_EVAL_SEQUENCES = 512
EVAL_BATCH = 16
# Per-process cache of AR scorers for generative perplexity: run dir -> model
_SCORERS: dict[str, Any] = {}


def heldout_nelbo(objective, model, data, device: torch.device, *, seed: int) -> dict[str, float]:
    """NELBO (or exact NLL) per token over this rank's held-out sequences, summed over ranks."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [nats, tokens]
    gen = torch.Generator(device=device).manual_seed(seed)
    seen = 0
    limit = max(1, MAX_EVAL_SEQUENCES // max(1, _world()))
    for batch in data.eval_batches(EVAL_BATCH):
        tokens_BL = batch["tokens"][: limit - seen].to(device)
        nats_B = objective.nelbo(model, tokens_BL, generator=gen)
        totals[0] += nats_B.double().sum()
        totals[1] += tokens_BL.numel()
        seen += tokens_BL.shape[0]
        if seen >= limit:
            break
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    if totals[1] == 0:
        return {}
    nats_per_token = float(totals[0] / totals[1])
    key = "eval/ppl" if getattr(objective, "exact_likelihood", False) else "eval/ppl_bound"
    return {
        "eval/bits_per_token": nats_per_token / math.log(2),
        key: math.exp(min(nats_per_token, 50.0)),
    }


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def generate_share(
    objective, model, total: int, length: int, steps: int, *, seed: int, device: torch.device
) -> torch.Tensor:
    """This rank's share of ``total`` samples (sample i on rank i % world), as (n, L)."""
    count = len(range(_rank(), total, _world()))
    if count == 0:
        return torch.zeros((0, length), dtype=torch.long)
    gen = torch.Generator(device=device).manual_seed(seed * 1000003 + _rank())
    return objective.generate(model, count, length, steps=steps, generator=gen).cpu()


def gather_texts(texts: list[str]) -> list[str]:
    """Every rank's texts, interleaved back into sample order (rank-0 view; all ranks get it)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return texts
    parts: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, texts)
    out = []
    for i in range(max(len(p) for p in parts)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


def generative_ppl(
    run_dir: str,
    tokens_NL: torch.Tensor,
    device: torch.device,
    load_run: Callable[[str], tuple[nn.Module, Any]] | None,
) -> float:
    """Perplexity of token sequences under the AR model trained in ``run_dir``, loaded
    with ``load_run`` (the loop's ``EvalContext.load_run``)."""
    if run_dir not in _SCORERS:
        if load_run is None:
            raise ValueError("eval.gen_ppl_run needs a way to load that run (EvalContext.load_run)")
        scorer_model, scorer_objective = load_run(run_dir)
        if not getattr(scorer_objective, "exact_likelihood", False):
            raise ValueError(
                f"eval.gen_ppl_run {run_dir} is a {type(scorer_objective).__name__} run; "
                "generative perplexity needs an autoregressive ('ar') run"
            )
        _SCORERS[run_dir] = (scorer_model, scorer_objective)
    scorer_model, scorer_objective = _SCORERS[run_dir]
    if int(tokens_NL.max()) >= scorer_model.vocab_size:
        raise ValueError(
            f"samples use token ids outside the vocabulary of the AR scorer in {run_dir}"
        )
    gen = torch.Generator(device=device).manual_seed(0)
    nats = 0.0
    with torch.no_grad():
        for start in range(0, tokens_NL.shape[0], EVAL_BATCH):
            part = tokens_NL[start : start + EVAL_BATCH].to(device)
            nats += float(scorer_objective.nelbo(scorer_model, part, generator=gen).sum())
    return math.exp(min(nats / tokens_NL.numel(), 50.0))


def write_jsonl(path: Path, texts: list[str]) -> None:
    """One ``{"text": ...}`` object per line, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)


def evaluate_lm(objective, ctx: EvalContext) -> dict[str, float]:
    """Held-out likelihood, samples, and the sample checks the recipe asks for."""
    from data_pipeline.text_tokens import decode_text
    from models.common.parallelize import gathered_for_inference

    model = ctx.modules["model"]
    logs: dict[str, float] = {}
    length = int(getattr(getattr(ctx.data, "cfg", None), "seq_len", 0) or model.max_seq_len)
    with gathered_for_inference(model):
        if hasattr(ctx.data, "eval_batches"):
            logs.update(heldout_nelbo(objective, model, ctx.data, ctx.device, seed=ctx.step))
        tokens_NL = generate_share(
            objective,
            model,
            ctx.num_samples,
            length,
            ctx.sample_steps,
            seed=ctx.step,
            device=ctx.device,
        )
    texts = gather_texts([decode_text(objective.tokenizer, row.tolist()) for row in tokens_NL])
    if ctx.rank == 0 and ctx.out_dir is not None:
        write_jsonl(ctx.out_dir / f"samples_step{ctx.step:08d}.jsonl", texts)
    if "arith" in ctx.text_checks:
        from data_pipeline.arith import arith_score

        score = arith_score(texts)
        logs["eval/arith_valid_frac"] = score["valid_frac"]
        logs["eval/arith_wellformed_frac"] = score["wellformed_frac"]
        logs["eval/complete_lines"] = float(score["complete_lines"])
    if ctx.gen_ppl_run:
        all_tokens = _gather_tokens(tokens_NL)
        if ctx.rank == 0:
            logs["eval/gen_ppl"] = generative_ppl(
                ctx.gen_ppl_run, all_tokens, ctx.device, ctx.load_run
            )
    return logs


def _gather_tokens(tokens_NL: torch.Tensor) -> torch.Tensor:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tokens_NL
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tokens_NL)
    return torch.cat([p for p in parts if p is not None and p.numel()])
