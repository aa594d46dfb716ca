"""MoE FFN: top-k softmax router, load-balancing loss, SwiGLU experts, optional shared expert,
and the expert-parallel dispatcher.

Dispatcher (per MoE layer, tokens already sequence-sharded on this rank):
  permute by expert -> exchange counts over ep -> all-to-all (uneven splits) -> regroup by local
  expert -> expert compute -> undo regroup -> all-to-all back -> unpermute, weighting by router.
Experts are contiguous blocks: ep rank p owns experts [p*E/ep, (p+1)*E/ep).

Expert compute is a seam: `expert_fn(x, tokens_per_expert, w1, w3, w2) -> y` where x holds the
tokens grouped by local expert ([sum(tokens_per_expert), H]), w1/w3 are [E_local, H, F] and w2
[E_local, F, H]. `get_expert_fn(plan.kernels)` picks it: "torch" (below) or "triton"
(`runtime.kernels.expert_ffn`: grouped GEMM + SwiGLU kernels, fed the gate/up weights fused).
plan.compression.dispatch/combine == "fp8" sends the token all-to-alls as e4m3 with per-token
scales (runtime.comm.all_to_all_autograd; gradients travel back in bf16).

Load-balancing loss: Switch/GShard's E * sum_e f_e * P_e, computed per *sequence* (its token
counts and probabilities are summed over the tp*sp ranks holding its shards), averaged over the
global batch. Per sequence makes it independent of how the batch is split into micro-batches and
ranks, so every plan optimises the same objective as one process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from perfmodel.specs import ModelSpec, SpecError
from runtime import parallel_ops as pops
from runtime.groups import Parallel
from runtime.params import Placement, make_param

ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def torch_expert_fn(x: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                    w2: torch.Tensor) -> torch.Tensor:
    """Reference grouped SwiGLU: one pair of GEMMs per local expert over its contiguous rows."""
    parts = x.split(tokens_per_expert.tolist(), dim=0)
    with record_function("moe.fc1/fwd"):
        h = [(p @ w1[e], p @ w3[e]) for e, p in enumerate(parts)]
    with record_function("moe.act/fwd"):
        a = [F.silu(g) * u for g, u in h]
    with record_function("moe.fc2/fwd"):
        out = [t @ w2[e] for e, t in enumerate(a)]
    return torch.cat(out, 0) if out else x.new_zeros((0, w2.shape[-1]))


def get_expert_fn(kernels: str) -> ExpertFn:
    if kernels == "torch":
        return torch_expert_fn
    try:
        expert_ffn = importlib.import_module("runtime.kernels").expert_ffn
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"plan.kernels: triton expert kernels are not available ({exc}); use kernels: torch") from None

    def triton_expert_fn(x, tokens_per_expert, w1, w3, w2):
        with record_function("moe.fc1/fwd"):  # the kernels fuse fc1, act and fc2 per call
            return expert_ffn(x, tokens_per_expert, torch.cat([w1, w3], dim=-1), w2, backend="triton")

    return triton_expert_fn


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, wire: str) -> torch.Tensor:
    """Token all-to-all, in `wire` precision ("bf16" = the activations' own dtype, or "fp8")."""
    if wire == "fp8" and group is not None:
        from runtime import comm  # compressed collectives (FP8 payload + scales)

        return comm.all_to_all_autograd(x, in_splits, out_splits, group, wire="fp8", grad_wire="bf16")
    return pops.all_to_all(x, out_splits, in_splits, group)


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN (shared expert, dense layers); replicated, it runs on the local tokens."""

    def __init__(self, prefix: str, hidden: int, ffn: int, layers: int, seed: int):
        super().__init__()
        self.w1 = make_param(f"{prefix}.w1", (ffn, hidden), seed, 0.02)
        self.w3 = make_param(f"{prefix}.w3", (ffn, hidden), seed, 0.02)
        self.w2 = make_param(f"{prefix}.w2", (hidden, ffn), seed, 0.02 / (2 * layers) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.w1)) * F.linear(x, self.w3), self.w2)


class _AttachAux(torch.autograd.Function):
    """Identity on x whose backward also seeds d(loss)/d(aux) = 1, so a layer's aux loss joins
    the gradient without being threaded through the model (or the pipeline's stage outputs)."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_like = aux.detach()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones_like(ctx.aux_like)


def in_backward() -> bool:
    """True while autograd runs a backward (e.g. recomputing a checkpointed forward)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


class MoE(nn.Module):
    def __init__(self, spec: ModelSpec, par: Parallel, prefix: str, seed: int, global_batch: int,
                 expert_fn: ExpertFn = torch_expert_fn, wire: tuple[str, str] = ("bf16", "bf16")):
        super().__init__()
        self.wire = wire  # (dispatch, combine) precision
        moe = spec.moe
        assert moe is not None
        self.par, self.expert_fn = par, expert_fn
        self.E, self.k, self.seq_len = moe.experts, moe.top_k, spec.seq_len
        self.coeff, self.global_batch = moe.aux_loss_coeff, global_batch
        ep, ei = par.size("ep"), par.index("ep")
        self.ep, self.El = ep, moe.experts // ep
        h, f = spec.hidden, moe.expert_ffn_hidden
        self.router = make_param(f"{prefix}.router", (moe.experts, h), seed, 0.02)
        ex = Placement(reduce=(), shard_group="edp", shard=(0, ei, ep))
        self.w1 = make_param(f"{prefix}.experts.w1", (moe.experts, h, f), seed, 0.02, ex)
        self.w3 = make_param(f"{prefix}.experts.w3", (moe.experts, h, f), seed, 0.02, ex)
        self.w2 = make_param(f"{prefix}.experts.w2", (moe.experts, f, h), seed, 0.02 / (2 * spec.layers) ** 0.5, ex)
        self.shared = SwiGLU(f"{prefix}.shared", h, spec.shared_ffn_hidden, spec.layers, seed) \
            if spec.shared_ffn_hidden else None
        # step statistics (this rank's share); read and reset by the training loop
        self.register_buffer("tokens_per_expert", torch.zeros(moe.experts), persistent=False)
        self.register_buffer("aux_sum", torch.zeros(()), persistent=False)

    def _aux(self, probs: torch.Tensor, idx: torch.Tensor, b: int) -> torch.Tensor:
        """This rank's share of the per-sequence load-balancing loss (summed over ranks = the loss)."""
        par = self.par
        with torch.no_grad():
            counts = F.one_hot(idx, self.E).sum(1).view(b, -1, self.E).sum(1).float()  # [B, E]
            for kind in ("tp", "sp"):
                counts = pops.all_reduce(counts, par.pg(kind))
        psum = probs.view(b, -1, self.E).sum(1)  # [B, E], differentiable
        for kind in ("tp", "sp"):
            psum = pops.all_reduce(psum, par.pg(kind))
        s = self.seq_len
        aux_b = self.E * (counts / (s * self.k) * psum / s).sum(-1)  # [B]
        shards = par.size("tp") * par.size("sp")  # every shard of a sequence computes the same aux_b
        return self.coeff * aux_b.sum() / (self.global_batch * shards)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        t = x.reshape(-1, h)
        n = t.shape[0]
        with record_function("moe.router/fwd"):
            probs = torch.softmax(F.linear(t.float(), self.router.float()), dim=-1)
            w, idx = torch.topk(probs, self.k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            aux = self._aux(probs, idx, b)
        with record_function("moe.permute/fwd"):
            flat = idx.reshape(-1)
            order = torch.argsort(flat, stable=True)
            # k copies of each token in assignment order, then sorted by expert (a permutation, so
            # its backward is a plain gather, deterministic on every device)
            xs = t.unsqueeze(1).expand(n, self.k, h).reshape(n * self.k, h)[order]
            counts = torch.bincount(flat, minlength=self.E)
        ep_pg = self.par.pg("ep")
        with record_function("moe.dispatch_a2a/fwd"):
            recv = pops.exchange_counts(counts.view(self.ep, self.El), ep_pg)  # [src, local expert]
            send_splits, recv_splits = counts.view(self.ep, self.El).sum(1).tolist(), recv.sum(1).tolist()
            xr = _a2a(xs, recv_splits, send_splits, ep_pg, self.wire[0])
        # received rows are ordered (source rank, expert); experts want them (expert, source)
        expert_of_row = torch.arange(self.El, device=x.device).repeat(self.ep).repeat_interleave(recv.flatten())
        regroup = torch.argsort(expert_of_row, stable=True)
        y = self.expert_fn(xr[regroup], recv.sum(0), self.w1, self.w3, self.w2)
        y = y[torch.argsort(regroup)]
        with record_function("moe.combine_a2a/fwd"):
            ys = _a2a(y, send_splits, recv_splits, ep_pg, self.wire[1])
        with record_function("moe.unpermute/fwd"):
            ya = ys[torch.argsort(order)].view(n, self.k, h)
            out = (ya * w.unsqueeze(-1).to(ya.dtype)).sum(1)
        if self.shared is not None:
            with record_function("moe.shared/fwd"):
                out = out + self.shared(t)
        if not in_backward():  # a recomputed forward must not count twice
            self.tokens_per_expert += counts.detach().float()
            self.aux_sum += aux.detach()
        return _AttachAux.apply(out.view(b, s, h).to(x.dtype), aux)
