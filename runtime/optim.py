"""Gradient synchronisation and AdamW with fp32 master weights, optionally sharded.

Parameters are bucketed by where their gradients must be summed (see runtime.params):
first all-reduced over the `reduce` kinds (e.g. sp: same weights, different tokens), then over
the data-parallel kind (`dp`, or `edp` for experts). Each bucket is one flat fp32 buffer.
- plan.distributed_optimizer: reduce-scatter over the data-parallel group, AdamW on this
  rank's shard of the master weights, all-gather the updated weights (ZeRO-1 style).
- otherwise: all-reduce, every rank steps the whole master copy.
plan.compression.grad_sync == "bf16" sends the gradient in bf16 (halves the bytes) through
runtime.comm's reduce-scatter/all-reduce, which sum the bf16 chunks in fp32 (fp32 master weights).
Bytes sent land in runtime.comm.STATS under "dp.grad_sync" (both wires).
The global gradient norm for clipping counts each distinct
gradient element once: a shard's squared norm is divided by the number of ranks holding it.

No host round-trip (a GPU step must never wait for the device inside it): the norm, the clip factor
and AdamW's update stay on the device as foreach ops; step() returns the norm as a 0-dim device
tensor, which the training loop reads after the step together with the other metrics (one read per
step). AdamW is written out here, the same arithmetic as torch.optim.AdamW's single-tensor path,
because torch's non-capturable AdamW reads its step counter with .item() for the bias corrections
(and its capturable form refuses CPU tensors): the step count is a host integer here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from runtime import comm
from runtime.groups import Parallel
from runtime.params import Placement, placement
from runtime.spans import span


@dataclass
class Bucket:
    params: list[nn.Parameter]
    place: Placement
    shard_pg: object
    shard_n: int
    shard_i: int
    dup: int  # ranks holding an identical copy of this rank's post-sync gradient slice
    master: nn.Parameter = field(init=False)
    numel: int = field(init=False)

    def __post_init__(self) -> None:
        self.numel = sum(p.numel() for p in self.params)
        self.offsets = [0]
        for p in self.params:
            self.offsets.append(self.offsets[-1] + p.numel())
        padded = -(-self.numel // self.shard_n) * self.shard_n  # equal shards for reduce-scatter
        flat = torch.zeros(padded, dtype=torch.float32, device=self.params[0].device)
        flat[: self.numel] = torch.cat([p.detach().float().reshape(-1) for p in self.params])
        n = padded // self.shard_n
        self.master = nn.Parameter(flat[self.shard_i * n:(self.shard_i + 1) * n].clone())

    def flat_grad(self) -> torch.Tensor:
        g = [p.grad.float().reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
             for p in self.params]
        flat = torch.cat(g)
        pad = self.master.numel() * self.shard_n - self.numel
        return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat

    def scatter(self, flat: torch.Tensor) -> None:
        """Copy a full flat value into the model parameters (one foreach copy)."""
        o = self.offsets
        with torch.no_grad():
            torch._foreach_copy_(self.params, [flat[o[i]:o[i + 1]].view_as(p) for i, p in enumerate(self.params)])


def _sum(t: torch.Tensor, pg, bf16: bool) -> torch.Tensor:
    """All-reduce (sum) of a flat fp32 gradient; bf16: runtime.comm's bf16 wire summed in fp32."""
    if pg is None:
        return t
    if bf16:
        return comm.all_reduce(t, pg, torch.bfloat16, name="dp.grad_sync")[0]
    w = dist.get_world_size(pg)
    comm.STATS.add("dp.grad_sync", 2 * (w - 1) * -(-t.numel() // w) * t.element_size())
    dist.all_reduce(t, group=pg)
    return t


def _reduce_scatter_flat(out: torch.Tensor, inp: torch.Tensor, pg) -> None:
    # torch 2.13 renamed reduce_scatter_tensor (deprecated there); 2.11 only has the old name
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    comm.STATS.add("dp.grad_sync", (dist.get_world_size(pg) - 1) * out.numel() * out.element_size())
    fn(out, inp, group=pg)


class ShardedAdamW:
    def __init__(self, modules: list[nn.Module], par: Parallel, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, distributed: bool = True, grad_bf16: bool = False):
        self.par, self.distributed, self.grad_bf16 = par, distributed, grad_bf16
        # bucket key leaves out the shard index, which differs between ranks, so that every rank
        # walks its buckets (and so issues its collectives) in the same order
        groups: dict[tuple, list[nn.Parameter]] = {}
        for m in modules:
            for p in m.parameters():
                pl = placement(p)
                groups.setdefault((pl.reduce, pl.shard_group, pl.decay, pl.shard is None), []).append(p)
        self.buckets: list[Bucket] = []
        for key in sorted(groups):
            place = placement(groups[key][0])
            kind = place.shard_group
            n = par.size(kind) if distributed else 1
            dup = math.prod(par.size(k) for k in place.reduce) * (1 if distributed else par.size(kind))
            self.buckets.append(Bucket(groups[key], place, par.pg(kind), n, par.index(kind) if distributed else 0,
                                       dup))
        self.lr, self.betas, self.eps = lr, betas, eps
        self.groups = [([b.master for b in self.buckets if b.place.decay], weight_decay),
                       ([b.master for b in self.buckets if not b.place.decay], 0.0)]
        self.steps = 0  # AdamW steps taken: a host integer, so the bias corrections read nothing back
        self.adam: dict[nn.Parameter, dict[str, torch.Tensor]] = {}

    def sync_grads(self) -> None:
        """Sum every gradient over the ranks that share its parameter; leaves master.grad set."""
        with span("dp.grad_sync/fwd"):
            for b in self.buckets:
                flat = b.flat_grad()
                for kind in b.place.reduce:
                    flat = _sum(flat, self.par.pg(kind), self.grad_bf16)
                if b.shard_n > 1 and self.grad_bf16:  # bf16 wire, fp32 sum (runtime.comm)
                    b.master.grad = comm.reduce_scatter(flat, b.shard_pg, torch.bfloat16, name="dp.grad_sync")[0]
                elif b.shard_n > 1:
                    out = flat.new_empty(b.master.numel())
                    _reduce_scatter_flat(out, flat, b.shard_pg)
                    b.master.grad = out
                else:
                    flat = _sum(flat, b.shard_pg, self.grad_bf16)  # all-reduce (None: one rank)
                    b.master.grad = flat.clone()

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm as a 0-dim fp64 tensor on the device (nothing read on the host)."""
        norms = torch._foreach_norm([b.master.grad for b in self.buckets], 2, dtype=torch.float64)
        sq = torch.stack([n.square() / b.dup for n, b in zip(norms, self.buckets, strict=True)]).sum()
        if self.par.world > 1:
            dist.all_reduce(sq)
        return sq.sqrt()

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Synced gradient of every local parameter (gathered from the shards); for tests."""
        out = {}
        for b in self.buckets:
            g = b.master.grad
            if b.shard_n > 1:
                parts = [torch.empty_like(g) for _ in range(b.shard_n)]
                dist.all_gather(parts, g.contiguous(), group=b.shard_pg)
                g = torch.cat(parts)
            off = 0
            for p in b.params:
                out[p.full_name] = g[off:off + p.numel()].view(p.shape).clone()
                off += p.numel()
        return out

    def step(self, lr: float, clip: float) -> torch.Tensor:
        """Clip, step the masters, copy back to the model (gathering shards); returns the grad norm
        (a 0-dim device tensor: read it after the step)."""
        norm = self.grad_norm()
        with span("optim.step/fwd"):
            if clip > 0:  # min(1, clip / norm) on the device; x 1.0 is exact, so no branch on its value
                coef = (clip / (norm + 1e-6)).clamp(max=1.0).float()
                torch._foreach_mul_([b.master.grad for b in self.buckets], coef)
            self._adamw(lr)
        with span("dp.param_gather/fwd"):
            for b in self.buckets:
                b.scatter(self._full(b))
                b.master.grad = None
        return norm

    def _state(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        st = self.adam.get(p)
        if st is None:
            st = self.adam[p] = {"exp_avg": torch.zeros_like(p.data), "exp_avg_sq": torch.zeros_like(p.data),
                                 "step": torch.zeros((), dtype=torch.float32)}
        return st

    def _adamw(self, lr: float) -> None:
        """One AdamW step of every master (torch.optim.AdamW's arithmetic, as foreach ops)."""
        self.steps += 1
        beta1, beta2 = self.betas
        bias1, bias2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        with torch.no_grad():
            for params, wd in self.groups:
                if not params:
                    continue
                sts = [self._state(p) for p in params]
                grads = [p.grad for p in params]
                m, v = [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts]
                torch._foreach_add_([st["step"] for st in sts], 1)  # host tensors: what checkpoints save
                if wd:
                    torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_lerp_(m, grads, 1 - beta1)
                torch._foreach_mul_(v, beta2)
                torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
                denom = torch._foreach_sqrt(v)
                torch._foreach_div_(denom, bias2 ** 0.5)
                torch._foreach_add_(denom, self.eps)
                torch._foreach_addcdiv_(params, m, denom, -lr / bias1)

    def zero_grad(self, modules: list[nn.Module]) -> None:
        for m in modules:
            for p in m.parameters():
                p.grad = None

    def state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, b in enumerate(self.buckets):
            out[f"b{i}.master"] = b.master.data
            st = self._state(b.master)  # created before a checkpoint load so it loads in place
            for k in ("exp_avg", "exp_avg_sq", "step"):
                out[f"b{i}.{k}"] = st[k]
        return out

    def after_load(self) -> None:
        for b in self.buckets:
            b.scatter(self._full(b))
        # the step count as loaded (a host tensor, read once here, outside any training step)
        self.steps = int(self._state(self.buckets[0].master)["step"]) if self.buckets else 0

    def _full(self, b: Bucket) -> torch.Tensor:
        full = b.master.detach()
        if b.shard_n > 1:
            parts = [torch.empty_like(full) for _ in range(b.shard_n)]
            dist.all_gather(parts, full.contiguous(), group=b.shard_pg)
            full = torch.cat(parts)
        return full


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup for `warmup` steps, then cosine decay to min_ratio*base at `total` (1-based step)."""
    if warmup and step <= warmup:
        return base * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
