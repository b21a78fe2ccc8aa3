"""One rank of tests/models/test_context_parallel.py: each family's DiT on the same
batch, once whole and once with its tokens split over the 2-rank context-parallel group;
prints (rank 0) a JSON line with the largest differences and the attention-input sizes."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import models.common.cross_dit as cross_dit
from models.audio_dit import AudioDiT, AudioDiTConfig
from models.common.context_parallel import enable_context_parallel
from models.video_dit import VideoDiT, VideoDiTConfig

SIZE = {"depth": 2, "num_heads": 4, "head_dim": 8}


def cases():
    torch.manual_seed(11)  # the same batch on every rank
    for mode in ("full", "factorized"):
        cfg = VideoDiTConfig(in_channels=3, patch_size=(1, 2, 2), context_dim=12, attention=mode,
                             pooled_dim=6, **SIZE)  # fmt: skip
        x = torch.randn(2, 3, 4, 4, 8, generator=torch.Generator().manual_seed(1))
        cond = {"context": torch.randn(2, 5, 12), "pooled": torch.randn(2, 6)}
        yield f"video_{mode}", VideoDiT(cfg), x, cond
    cfg = AudioDiTConfig(in_channels=2, patch_size=2, context_dim=12, **SIZE)
    x = torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(2))
    cond = {"context": torch.randn(2, 5, 12), "seconds_start": torch.tensor([0.0, 1.0]),
            "seconds_total": torch.tensor([2.0, 3.0])}  # fmt: skip
    yield "audio", AudioDiT(cfg), x, cond


def run(model, x, cond, attention_inputs):
    torch.manual_seed(7)
    weight = torch.randn_like(x)
    attention_inputs.clear()
    out = model(x, torch.tensor([0.3, 0.8]), cond)
    loss = (out * weight).sum()
    model.zero_grad()
    loss.backward()
    return out.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def main() -> int:
    dist.init_process_group("gloo")
    sizes: list[int] = []
    original = cross_dit.attention

    def recording(q, k, v, *args, **kwargs):
        sizes.append(q.numel())
        return original(q, k, v, *args, **kwargs)

    cross_dit.attention = recording
    report = {}
    for name, model, x, cond in cases():
        torch.manual_seed(0)
        model.init_weights(seed=0)
        with torch.no_grad():  # adaLN-zero starts at the identity: give every weight a value
            for p in model.parameters():
                p.normal_(0, 0.2)
        whole = run(model, x, cond, sizes)
        whole_attention = max(s for s in sizes[::2])  # self-attention, not cross
        enable_context_parallel(model, dist.group.WORLD)
        split = run(model, x, cond, sizes)
        split_attention = max(s for s in sizes[::2])
        grads = split[2]
        for g in grads.values():
            dist.all_reduce(g, op=dist.ReduceOp.AVG)  # what FSDP2's reduce-scatter does
        report[name] = {
            "out": (split[0] - whole[0]).abs().max().item(),
            "loss": abs(split[1] - whole[1]).item() / abs(whole[1]).item(),
            "grad": max(
                ((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                for n, g in whole[2].items()
            ),
            "attention_input": [whole_attention, split_attention],
        }
    if dist.get_rank() == 0:
        print(json.dumps(report))
    dist.barrier()  # both ranks are done before either tears gloo down
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
