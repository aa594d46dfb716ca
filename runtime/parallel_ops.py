"""Differentiable collectives the model's parallel layers use (gloo on CPU, NCCL on GPU).

(runtime/comm.py holds the compressed/async collectives; these are the plain autograd ones.)

Each is an autograd Function whose backward is the collective's adjoint, so the model's
loss.backward() moves gradients across ranks exactly as the forward moved activations:
all-to-all <-> all-to-all with the splits swapped, all-gather <-> reduce-scatter,
all-reduce(sum) <-> all-reduce(sum). A `None` group means one rank: every op is identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _a2a(x: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group) -> torch.Tensor:
    x = x.contiguous()
    rows = sum(out_splits) if out_splits is not None else x.shape[0]
    out = x.new_empty((rows, *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _a2a(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _a2a(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group) -> torch.Tensor:
    """all_to_all_single along dim 0 with (possibly uneven) splits; differentiable."""
    if group is None:
        return x
    return _AllToAll.apply(x, out_splits, in_splits, group)


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts[i] = rows this rank sends to peer i (dim 0 per peer) -> rows each peer sends here."""
    if group is None:
        return counts
    return _a2a(counts, None, None, group)


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    parts = [p.contiguous() for p in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)  # list form: the same call on torch 2.11 and 2.13
    return out


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's x along dim (in group order); backward reduce-scatters."""
    return x if group is None else _Gather.apply(x, dim, group)


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum x over the group and keep this rank's chunk along dim; backward all-gathers."""
    return x if group is None else _ReduceScatter.apply(x, dim, group)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group. Backward also sums: each rank's loss term depends on every input."""
    return x if group is None else _AllReduce.apply(x, group)


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """Ulysses all-to-all: [B, S/n, Hd, D] sequence-sharded -> [B, S, Hd/n, D] head-sharded."""
    n = _size(group)
    if n == 1:
        return x
    b, s, h, d = x.shape
    # peer i gets head chunk i: lay the chunks out along dim 0 so all_to_all_single splits them evenly
    x = x.reshape(b, s, n, h // n, d).permute(2, 0, 1, 3, 4)
    y = all_to_all(x, None, None, group)  # [n (source = seq chunk), b, s, h/n, d]
    return y.permute(1, 0, 2, 3, 4).reshape(b, n * s, h // n, d)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of seq_to_heads: [B, S, Hd/n, D] -> [B, S/n, Hd, D]."""
    n = _size(group)
    if n == 1:
        return x
    b, s, h, d = x.shape
    x = x.reshape(b, n, s // n, h, d).permute(1, 0, 2, 3, 4)
    y = all_to_all(x, None, None, group)  # [n (source = head chunk), b, s/n, h, d]
    return y.permute(1, 2, 0, 3, 4).reshape(b, s // n, n * h, d)
