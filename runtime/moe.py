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
plan.precision == "fp8": experts, shared expert and dense FFNs run FP8 GEMMs (runtime.fp8_linear,
`fp8_expert_fn` for the experts under both kernels settings). With an FP8 dispatch as well, the
tokens are sent already quantized as fc1 reads them (per token, or 1x128 tiles under blockwise) and
fc1 takes the received payload and scales as they are (DeepSeek-V3): no dequantize + re-quantize.
plan.overlap: token chunks pipelined (intra_op chunk; tile runs as chunk), async all-to-alls with
the shared expert under the combine and expert wgrad deferred under the dispatch gradient
(inter_op); see runtime/overlap.py. permute/unpermute use runtime.kernels when kernels: triton.

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

from perfmodel.specs import ModelSpec, SpecError
from runtime import comm, fp8_linear, overlap
from runtime import parallel_ops as pops
from runtime.groups import Parallel
from runtime.kernels.grouped_gemm import grouped_gemm_torch
from runtime.kernels.permute import expert_counts
from runtime.params import Placement, make_param
from runtime.spans import span

ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype (bf16 on GPU) where autocast is on, else x's: a grouped GEMM (torch's or
    the Triton kernels) is not an autocast op, so the experts cast their operands themselves."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def torch_expert_fn(x: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                    w2: torch.Tensor) -> torch.Tensor:
    """Grouped SwiGLU with torch ops: torch._grouped_mm from the device counts (no host round-trip;
    runtime.kernels.grouped_gemm.grouped_gemm_torch), one GEMM per expert where it cannot run."""
    dt = _compute_dtype(x)
    x, w1, w3, w2 = (t.to(dt) for t in (x, w1, w3, w2))
    with span("moe.fc1/fwd"):
        g, u = (grouped_gemm_torch(x, w, tokens_per_expert, "moe.fc1") for w in (w1, w3))
    with span("moe.act/fwd"):
        a = F.silu(g) * u
    with span("moe.fc2/fwd"):
        return grouped_gemm_torch(a, w2, tokens_per_expert, "moe.fc2")


def fp8_expert_fn(x: torch.Tensor, tokens_per_expert: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                  w2: torch.Tensor, recipe: fp8_linear.FP8Recipe, kernels: str = "torch",
                  xq: fp8_linear.FP8Act | None = None, defer: list | None = None) -> torch.Tensor:
    """The SwiGLU experts with FP8 grouped GEMMs: x cast once (or xq: cast by the dispatch) for
    gate and up; defer: queue the weight gradients (inter-op overlap, runtime.overlap). The counts
    stay on the device."""
    c = tokens_per_expert
    with span("moe.fc1/fwd"):
        xq = xq or fp8_linear.cast_input(x, recipe, "moe.fc1", c)
        g, u = (fp8_linear.grouped(x, w, c, recipe, "moe.fc1", xq, kernels, defer) for w in (w1, w3))
    with span("moe.act/fwd"):
        a = F.silu(g) * u
    with span("moe.fc2/fwd"):
        return fp8_linear.grouped(a, w2, c, recipe, "moe.fc2", None, kernels, defer)


def get_expert_fn(kernels: str) -> ExpertFn:
    if kernels == "torch":
        return torch_expert_fn
    try:
        expert_ffn = importlib.import_module("runtime.kernels").expert_ffn
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"plan.kernels: triton expert kernels are not available ({exc}); use kernels: torch") from None

    def triton_expert_fn(x, tokens_per_expert, w1, w3, w2):
        dt = _compute_dtype(x)  # bf16 under autocast: the kernels take one operand dtype
        with span("moe.fc1/fwd"):  # the kernels fuse fc1, act and fc2 per call
            return expert_ffn(x.to(dt), tokens_per_expert, torch.cat([w1, w3], dim=-1).to(dt), w2.to(dt),
                              backend="triton")

    return triton_expert_fn


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN (shared expert, dense layers); replicated, it runs on the local tokens."""

    def __init__(self, prefix: str, hidden: int, ffn: int, layers: int, seed: int, precision: str = "bf16",
                 fp8_recipe: str = "tensorwise", ops: tuple[str, str] = ("ffn.fc1", "ffn.fc2")):
        super().__init__()
        self.w1 = make_param(f"{prefix}.w1", (ffn, hidden), seed, 0.02)
        self.w3 = make_param(f"{prefix}.w3", (ffn, hidden), seed, 0.02)
        self.w2 = make_param(f"{prefix}.w2", (hidden, ffn), seed, 0.02 / (2 * layers) ** 0.5)
        self.fp8 = fp8_linear.recipe_of(precision, fp8_recipe)
        self.ops = ops  # op-graph names of (w1 and w3, w2): their FP8 casts are profiled as <op>_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.fp8
        if r is None:
            return F.linear(F.silu(F.linear(x, self.w1)) * F.linear(x, self.w3), self.w2)
        fc1, fc2 = self.ops
        xq = fp8_linear.cast_input(x, r, fc1)
        h = F.silu(fp8_linear.linear(x, self.w1, r, fc1, xq)) * fp8_linear.linear(x, self.w3, r, fc1, xq)
        return fp8_linear.linear(h, self.w2, r, fc2)


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
                 expert_fn: ExpertFn = torch_expert_fn, wire: tuple[str, str] = ("bf16", "bf16"),
                 kernels: str = "torch", chunks: int = 1, defer_wgrad: bool = False, precision: str = "bf16",
                 fp8_recipe: str = "tensorwise"):
        super().__init__()
        self.wire = wire  # (dispatch, combine) precision
        self.fp8 = fp8_linear.recipe_of(precision, fp8_recipe)
        self.kernels = kernels  # permute/unpermute (and deferred-wgrad GEMMs): torch or triton
        self.chunks, self.defer_wgrad = chunks, defer_wgrad  # overlap (see runtime.overlap)
        moe = spec.moe
        assert moe is not None
        self.par, self.expert_fn = par, expert_fn
        self.E, self.k, self.seq_len = moe.experts, moe.top_k, spec.seq_len
        self.expert_groups, self.groups_per_token = moe.expert_groups, moe.groups_per_token
        self.coeff, self.global_batch = moe.aux_loss_coeff, global_batch
        ep, ei = par.size("ep"), par.index("ep")
        self.ep, self.El = ep, moe.experts // ep
        h, f = spec.hidden, moe.expert_ffn_hidden
        self.router = make_param(f"{prefix}.router", (moe.experts, h), seed, 0.02)
        ex = Placement(reduce=(), shard_group="edp", shard=(0, ei, ep))
        self.w1 = make_param(f"{prefix}.experts.w1", (moe.experts, h, f), seed, 0.02, ex)
        self.w3 = make_param(f"{prefix}.experts.w3", (moe.experts, h, f), seed, 0.02, ex)
        self.w2 = make_param(f"{prefix}.experts.w2", (moe.experts, f, h), seed, 0.02 / (2 * spec.layers) ** 0.5, ex)
        self.shared = SwiGLU(f"{prefix}.shared", h, spec.shared_ffn_hidden, spec.layers, seed, precision, fp8_recipe,
                             ("moe.shared", "moe.shared")) if spec.shared_ffn_hidden else None
        # step statistics (this rank's share); read and reset by the training loop
        self.register_buffer("tokens_per_expert", torch.zeros(moe.experts), persistent=False)
        self.register_buffer("aux_sum", torch.zeros(()), persistent=False)

    def _aux(self, probs: torch.Tensor, idx: torch.Tensor, b: int) -> torch.Tensor:
        """This rank's share of the per-sequence load-balancing loss (summed over ranks = the loss)."""
        par = self.par
        with torch.no_grad():
            # [B, E] picks per sequence; a scatter (F.one_hot reads the ids' range on the host off CUDA)
            picks = idx.reshape(b, -1)
            counts = probs.new_zeros(b, self.E).scatter_add_(1, picks, torch.ones_like(picks, dtype=probs.dtype))
        psum = probs.view(b, -1, self.E).sum(1)  # [B, E], differentiable
        pg = par.pg("tp_sp")
        if pg is not None:  # one all-reduce of both statistics over the shards of these sequences
            with span("moe.aux_ar/fwd"):
                both = pops.all_reduce(torch.cat([counts, psum], dim=1), pg)
            counts, psum = both[:, : self.E].detach(), both[:, self.E:]
        s = self.seq_len
        aux_b = self.E * (counts / (s * self.k) * psum / s).sum(-1)  # [B]
        shards = par.size("tp") * par.size("sp")  # every shard of a sequence computes the same aux_b
        return self.coeff * aux_b.sum() / (self.global_batch * shards)

    def _permute(self, t: torch.Tensor, idx: torch.Tensor):
        """-> (rows sorted by expert, counts [E], what unpermute needs)."""
        if self.kernels == "triton":
            from runtime.kernels import permute

            xs, counts, row_map = permute(t, idx, self.E, backend="triton")
            return xs, counts, row_map
        n, h = t.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        # k copies of each token in assignment order, then sorted by expert (a permutation, so
        # its backward is a plain gather, deterministic on every device)
        xs = t.unsqueeze(1).expand(n, self.k, h).reshape(n * self.k, h)[order]
        return xs, expert_counts(flat, self.E), order

    def _unpermute(self, ys: torch.Tensor, back: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.kernels == "triton":
            from runtime.kernels import unpermute

            return unpermute(ys, back, w, backend="triton")
        ya = ys[torch.argsort(back)].view(w.shape[0], self.k, ys.shape[1])
        return (ya * w.unsqueeze(-1).to(ya.dtype)).sum(1)

    def _wires(self, device: torch.device) -> tuple[tuple[str, str], tuple[str, str]]:
        """(wire, gradient wire) of dispatch and combine: fp8 as planned; "bf16" is the activations'
        own dtype (bf16 under autocast on GPU, fp32 on CPU); gradients go back in bf16 or native."""
        plain = "bf16" if torch.is_autocast_enabled(device.type) else "native"
        return tuple((w, "bf16") if w == "fp8" else (plain, plain) for w in self.wire)  # type: ignore[return-value]

    def _experts(self, xr: torch.Tensor, recv: torch.Tensor, handle, wire_fp8: list | None = None) -> torch.Tensor:
        """Expert compute on the received rows (ordered source rank, expert) -> same order.
        wire_fp8: [(payload, scales)] of a pre-quantized FP8 dispatch, in the order of xr's rows."""
        counts = recv.sum(0)  # [El], on the device: the expert GEMMs take device offsets
        regroup = None
        if self.ep > 1:  # rows arrive ordered (source rank, expert): group them by expert
            expert_of_row = torch.arange(self.El, device=xr.device).repeat(self.ep).repeat_interleave(
                recv.flatten(), output_size=xr.shape[0])  # the size is known: no host round-trip
            regroup = torch.argsort(expert_of_row, stable=True)
            xr = xr[regroup]
        if self.fp8 is not None:
            xq = None
            if wire_fp8:  # regroup payload and scales with the rows (payload as bytes: not every torch gathers fp8)
                q, sc = wire_fp8[0]
                if regroup is not None:
                    q, sc = q.view(torch.uint8)[regroup].view(q.dtype), sc[regroup]
                xq = fp8_linear.from_wire(q, sc, self.fp8, "moe.fc1", counts)
            defer = handle.deferred if self.defer_wgrad and self.ep > 1 else None
            y = fp8_expert_fn(xr, counts, self.w1, self.w3, self.w2, self.fp8, self.kernels, xq, defer)
        elif self.defer_wgrad:  # inter-op overlap: wgrad GEMMs run under the dispatch gradient all-to-all
            y = overlap.experts(xr, counts, self.w1, self.w3, self.w2, self.kernels, handle if self.ep > 1 else None)
        else:
            y = self.expert_fn(xr, counts, self.w1, self.w3, self.w2)
        return y if regroup is None else y[torch.argsort(regroup)]

    def _send(self, x: torch.Tensor, ins: list[int] | None, outs: list[int] | None, which: int, name: str,
              block: int | None = None, keep: list | None = None):
        pg = self.par.pg("ep")
        if pg is None:
            return _Local(x)
        wire, grad_wire = self._wires(x.device)[which]
        if self.chunks == 1 and not self.defer_wgrad:  # no overlap: one blocking all-to-all
            with span(f"{name}/fwd"):  # its backward is attributed to name/dgrad through this span
                return _Local(comm.all_to_all_autograd(x, ins, outs, pg, wire, grad_wire, block, name=name,
                                                       keep=keep))
        return overlap.start_a2a(x, ins, outs, pg, wire, grad_wire, name, block, keep)

    def _pre_quantized(self) -> bool:
        """precision fp8 + FP8 dispatch: send tokens as fc1's FP8 input (see the module docstring)."""
        return self.fp8 is not None and self.wire[0] == "fp8" and self.ep > 1

    def _group_limited(self, probs: torch.Tensor) -> torch.Tensor:
        """Group-limited routing (DeepSeek-V2/V3): keep the experts of each token's best
        `groups_per_token` groups (a group scores its best expert), zero the rest before top-k."""
        if not self.groups_per_token:
            return probs
        t, e = probs.shape
        grouped = probs.view(t, self.expert_groups, e // self.expert_groups)
        best = torch.topk(grouped.amax(-1), self.groups_per_token, dim=-1).indices
        keep = torch.zeros(t, self.expert_groups, 1, dtype=probs.dtype, device=probs.device)
        keep.scatter_(1, best.unsqueeze(-1), 1.0)
        return (grouped * keep).view(t, e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        t = x.reshape(-1, h)
        n = t.shape[0]
        with span("moe.router/fwd"):
            probs = torch.softmax(F.linear(t.float(), self.router.float()), dim=-1)
            w, idx = torch.topk(self._group_limited(probs), self.k, dim=-1)
            w = probs.gather(-1, idx)
            w = w / w.sum(-1, keepdim=True)
            aux = self._aux(probs, idx, b)
        # token chunks (intra-op overlap): chunk c+1's dispatch and chunk c-1's combine are in
        # flight while chunk c's experts compute
        nc = max(1, min(self.chunks, n))
        cut = [n * c // nc for c in range(nc + 1)]
        with span("moe.permute/fwd"):
            parts = [self._permute(t[cut[c]:cut[c + 1]], idx[cut[c]:cut[c + 1]]) for c in range(nc)]
        counts = torch.stack([p[1] for p in parts]).view(nc, self.ep, self.El)
        send_splits: list = [None] * nc  # [c][peer] rows to each peer (ep > 1 only)
        recv_splits: list = [None] * nc
        if self.ep > 1:
            with span("moe.dispatch_counts/fwd"):  # every chunk's counts in one exchange
                recv = pops.exchange_counts(counts.transpose(0, 1).contiguous(), self.par.pg("ep"))  # [src, c, El]
                # the layer's one host round-trip: the all-to-alls need their split sizes on the host;
                # every chunk's send and receive sizes come back in one transfer
                both = torch.cat([counts.sum(2), recv.sum(2).t()]).tolist()
            send_splits, recv_splits = both[:nc], both[nc:]
        else:  # nothing leaves the rank: the counts stay on the device
            recv = counts.transpose(0, 1)  # [1, c, El]
        pre = self._pre_quantized()
        blk = self.fp8.wire_block if pre and self.fp8 else None
        kept: list[list | None] = [[] if pre else None for _ in range(nc)]  # filled by each dispatch's wait()
        dispatch = [self._send(parts[0][0], send_splits[0], recv_splits[0], 0, "moe.dispatch_a2a", blk, kept[0])]
        shared = None
        combine = []
        for c in range(nc):
            if c + 1 < nc:
                dispatch.append(self._send(parts[c + 1][0], send_splits[c + 1], recv_splits[c + 1], 0,
                                           "moe.dispatch_a2a", blk, kept[c + 1]))
            y = self._experts(dispatch[c].wait(), recv[:, c], dispatch[c], kept[c])
            combine.append(self._send(y, recv_splits[c], send_splits[c], 1, "moe.combine_a2a"))
        if self.shared is not None:
            # under the combine all-to-all(s) in flight; in backward (autograd runs the latest-created
            # ready node first) its gradient runs while the combine's gradient all-to-all is in flight
            with span("moe.shared/fwd"):
                shared = self.shared(t)
        with span("moe.unpermute/fwd"):
            out = torch.cat([self._unpermute(combine[c].wait(), parts[c][2], w[cut[c]:cut[c + 1]])
                             for c in range(nc)])
        if shared is not None:
            out = out + shared
        if not in_backward():  # a recomputed forward must not count twice
            self.tokens_per_expert += counts.sum(0).flatten().detach().float()
            self.aux_sum += aux.detach()
        return _AttachAux.apply(out.view(b, s, h).to(x.dtype), aux)


class _Local:
    """A finished (or absent: one ep rank) transfer, with the handle's interface."""

    def __init__(self, y: torch.Tensor):
        self.y = y

    def wait(self) -> torch.Tensor:
        return self.y
