"""Language-model throughput: training tokens/s of each objective and sampling tokens/s of
each sampler, on one backbone, measured side by side in one run.

    python benchmarks/dlm_bench.py [--width 256 --depth 4 --seq-len 128 --batch 16]
        [--steps 10] [--num-samples 8] [--device cpu|cuda] [--dtype fp32|bf16]

Training: forward + backward + AdamW step of ``objective.loss`` on random tokens; the
ratio column is against the autoregressive baseline (same backbone, same tokens per
step; BD3-LM's pass reads 2L tokens for L trained ones). Sampling: ``--num-samples``
sequences of ``--seq-len`` tokens; diffusion samplers take one step per token (BD3-LM:
per token of a block), AR decodes with its KV cache; ratio against AR.

The tokenizer is a character-level one trained on the built-in arithmetic corpus (18
ids), so the output head is small; at V = 50k the head adds the same cost to every
objective.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def make_tokenizer(folder: Path) -> str:
    from data_pipeline.arith import arith_lines
    from data_pipeline.tokenizer import train_tokenizer

    text = folder / "arith.txt"
    text.write_text("\n".join(arith_lines(5000, seed=0)) + "\n")
    train_tokenizer([str(text)], str(folder / "arith"), 18, "char", progress=False)
    return str(folder / "arith.model")


def build(name: str, tokenizer: str, args, device):
    from models.dlm import DLMConfig
    from models.dlm import build as build_model
    from trainer.registry import OBJECTIVES

    entry = OBJECTIVES[name]
    extra = {"block_size": args.block_size} if name == "bd3lm" else {}
    objective = entry.build(
        entry.config(name=name, tokenizer=tokenizer, **extra), seed=0, rank=0, device=device
    )
    model = build_model(
        DLMConfig(
            vocab_size=objective.tokenizer.vocab_size,
            max_seq_len=args.seq_len,
            width=args.width,
            depth=args.depth,
            num_heads=args.heads,
            time_conditioning=name == "sedd",
        )
    )
    model.init_weights(0)
    return objective, model.to(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_tokens_per_s(name, tokenizer, args, device) -> float:
    objective, model = build(name, tokenizer, args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    vocab = objective.tokenizer.vocab_size
    batches = [
        {
            "tokens": torch.randint(5, vocab, (args.batch, args.seq_len), generator=gen),
            "index": torch.arange(args.batch) + i * args.batch,
        }
        for i in range(args.steps + 2)
    ]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(i: int) -> None:
        with autocast:
            loss, _ = objective.loss("model", {"model": model}, batches[i], i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(2):  # warm-up
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(2, args.steps + 2):
        step(i)
    sync(device)
    return args.steps * args.batch * args.seq_len / (time.perf_counter() - t0)


def sample_tokens_per_s(name, options, tokenizer, args, device) -> float:
    objective, model = build(name, tokenizer, args, device)
    model.eval()
    steps = args.block_size if name == "bd3lm" else args.seq_len
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        out = objective.generate(
            model, args.num_samples, args.seq_len, steps=steps, generator=gen, **options
        )
        sync(device)
    assert out.shape == (args.num_samples, args.seq_len)
    return out.numel() / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(Path(tmp))
        print(
            f"backbone width {args.width} depth {args.depth}, L={args.seq_len}, "
            f"batch {args.batch}, {device.type} {args.dtype}"
        )
        train = {n: train_tokens_per_s(n, tokenizer, args, device) for n in ("ar", "mdlm")}
        train |= {n: train_tokens_per_s(n, tokenizer, args, device) for n in ("sedd", "bd3lm")}
        print(f"\n{'training':<28}{'tokens/s':>12}{'vs AR':>8}")
        for name, rate in train.items():
            print(f"{name:<28}{rate:>12.0f}{rate / train['ar']:>8.2f}")
        samplers = {
            "ar (kv cache)": ("ar", {}),
            "mdlm ancestral (cache)": ("mdlm", {"cache": True}),
            "mdlm ancestral (no cache)": ("mdlm", {"cache": False}),
            "sedd analytic": ("sedd", {"sampler": "analytic"}),
            "sedd euler": ("sedd", {"sampler": "euler"}),
            "bd3lm (kv cache)": ("bd3lm", {"kv_cache": True}),
            "bd3lm (no kv cache)": ("bd3lm", {"kv_cache": False}),
        }
        rates = {
            label: sample_tokens_per_s(name, opts, tokenizer, args, device)
            for label, (name, opts) in samplers.items()
        }
        print(f"\n{'sampling (L=' + str(args.seq_len) + ')':<28}{'tokens/s':>12}{'vs AR':>8}")
        for label, rate in rates.items():
            print(f"{label:<28}{rate:>12.0f}{rate / rates['ar (kv cache)']:>8.2f}")


if __name__ == "__main__":
    main()
