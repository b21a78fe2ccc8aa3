"""Context parallelism (DeepSpeed-Ulysses): one sample's token sequence is split across
the P ranks of a context-parallel group, so each rank holds N / P tokens of every
activation. Per-token layers (norms, projections, MLPs, cross-attention to the text,
which every rank holds whole) run on the local tokens alone; self-attention, which needs
all tokens, swaps the split with one all-to-all: every rank then holds all N tokens of
H / P heads, attends, and a second all-to-all swaps back. Attention inputs on a rank are
therefore N H K / P values either way.

At the end of the network the output tokens are gathered, so the objective sees the
whole sample on every rank of the group and computes the same loss. The gather's
backward is a reduce-scatter (sum over the group), which makes every rank's gradients P
times its share; FSDP2's mean over all dp x cp ranks then gives the data-parallel mean of
the full-sequence gradient, exactly what the same batch gives without context parallel.

Every collective here is an autograd function whose backward is its adjoint (the
all-to-all is its own inverse), so activation checkpointing may re-run them.

Shapes: B batch, N tokens (n = N / P local), H heads (h = H / P), K head dim, D width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Chunk j of dim 0 goes to rank j; the chunk received from rank j lands at j."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.group), None


class _GatherTokens(torch.autograd.Function):
    """(B, n, D) on each rank -> (B, N, D), rank r's tokens at [r n, (r + 1) n)."""

    @staticmethod
    def forward(ctx, x_BnD: torch.Tensor, group, size: int) -> torch.Tensor:
        ctx.group, ctx.size = group, size
        b, n, d = x_BnD.shape
        out = torch.empty((size * b, n, d), dtype=x_BnD.dtype, device=x_BnD.device)
        dist.all_gather_into_tensor(out, x_BnD.contiguous(), group=group)
        return out.view(size, b, n, d).transpose(0, 1).reshape(b, size * n, d)

    @staticmethod
    def backward(ctx, grad_BND: torch.Tensor):
        b, big_n, d = grad_BND.shape
        n = big_n // ctx.size
        stacked = grad_BND.reshape(b, ctx.size, n, d).transpose(0, 1).contiguous()
        out = torch.empty((b, n, d), dtype=grad_BND.dtype, device=grad_BND.device)
        dist.reduce_scatter_tensor(out, stacked.view(ctx.size * b, n, d), group=ctx.group)
        return out, None, None


class ContextParallel:
    """The context-parallel group a model splits its token sequence over."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def check(self, num_tokens: int, num_heads: int) -> None:
        if num_tokens % self.size or num_heads % self.size:
            raise ValueError(
                f"context parallel over {self.size} ranks needs tokens ({num_tokens}) and "
                f"heads ({num_heads}) divisible by {self.size}"
            )

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous 1 / P of ``x`` along ``dim`` (tokens)."""
        return x.chunk(self.size, dim=dim)[self.rank]

    def shard(
        self, tokens_BND: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], num_heads: int
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """This rank's tokens and their (cos, sin) RoPE rows, after checking the split."""
        self.check(tokens_BND.shape[1], num_heads)
        return self.local(tokens_BND), (self.local(rope[0]), self.local(rope[1]))

    def gather(self, x_BnD: torch.Tensor) -> torch.Tensor:
        return _GatherTokens.apply(x_BnD, self.group, self.size)

    def tokens_to_heads(self, x_BnHK: torch.Tensor) -> torch.Tensor:
        """(B, n, H, K) local tokens, all heads -> (B, N, h, K) all tokens, local heads."""
        b, n, heads, k = x_BnHK.shape
        p = self.size
        chunks = x_BnHK.reshape(b, n, p, heads // p, k).permute(2, 0, 1, 3, 4)
        out = _AllToAll.apply(chunks, self.group)  # [j]: rank j's tokens, my heads
        return out.permute(1, 0, 2, 3, 4).reshape(b, p * n, heads // p, k)

    def heads_to_tokens(self, x_BNhK: torch.Tensor) -> torch.Tensor:
        """(B, N, h, K) all tokens, local heads -> (B, n, H, K): the inverse swap."""
        b, big_n, h, k = x_BNhK.shape
        p = self.size
        chunks = x_BNhK.reshape(b, p, big_n // p, h, k).transpose(0, 1)
        out = _AllToAll.apply(chunks, self.group)  # [j]: my tokens, rank j's heads
        return out.permute(1, 2, 0, 3, 4).reshape(b, big_n // p, p * h, k)


def enable_context_parallel(model: torch.nn.Module, group) -> None:
    """Make ``model`` split its sequence over ``group``; the family must support it."""
    if not hasattr(model, "context_parallel"):
        raise ValueError(f"{type(model).__name__} does not support context parallelism")
    model.context_parallel = ContextParallel(group)
