"""Communication overlap for the MoE dispatcher (plan.overlap), executed as the simulator prices it.

- ``start_a2a`` / ``A2AHandle.wait``: a differentiable token all-to-all (runtime.comm, any wire)
  whose forward *and* backward are asynchronous.  Forward: ``start`` launches, the caller computes
  something independent (the shared expert, another chunk's experts), ``wait`` returns the rows.
  Backward mirrors it: the wait half's backward launches the gradient all-to-all, then runs the
  deferred work queued on the handle (the expert weight gradients, see ``experts``), and the start
  half's backward waits.  Autograd runs ready nodes latest-created first, so whatever the forward
  computed between start and wait also runs in backward while the gradient is in flight.
- ``experts(x, counts, w1, w3, w2, defer=handle)``: SwiGLU experts as one autograd Function whose
  backward returns dgrad at once and *defers* wgrad (dW1, dW3, dW2 accumulated straight into
  ``.grad``) to the handle's queue, so the weight-gradient GEMMs run while the dispatch gradient
  all-to-all is in flight (MegaScale-MoE's dgrad/wgrad split).  ``backend`` picks the grouped
  GEMMs: torch (a loop over experts) or the Triton kernels of runtime.kernels.

Gradients equal the plain path's: the same products, only the order in which weight-gradient
contributions are summed differs (fp32 rounding).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from runtime import comm
from runtime.spans import span


@dataclass(eq=False)
class _State:
    ins: list[int]
    outs: list[int]
    group: object
    wire: str
    grad_wire: str
    name: str
    block: int | None = None  # fp8 wire: scale granularity (None: per row)
    keep: list | None = None  # fp8 wire: receives the (payload, scales) as they came (runtime.comm)
    pending: comm.Pending | None = None
    grad_pending: comm.Pending | None = None
    deferred: list[Callable[[], None]] = field(default_factory=list)


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, st: _State):
        ctx.st = st
        with span(f"{st.name}/fwd"):
            st.pending = comm.all_to_all_async(x.detach().contiguous(), st.ins, st.outs, st.group, st.wire,
                                               st.block, name=f"{st.name}/fwd", keep=st.keep)
        return x.new_empty(0)  # a token linking the two halves in the graph

    @staticmethod
    def backward(ctx, _tok):
        st = ctx.st
        with span(f"{st.name}/dgrad"):
            dx = st.grad_pending.wait()
        st.grad_pending = None
        return dx, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tok, st: _State):
        ctx.st = st
        with span(f"{st.name}/fwd"):
            y = st.pending.wait()
        st.pending = None
        return y

    @staticmethod
    def backward(ctx, dy):
        st = ctx.st
        with span(f"{st.name}/dgrad"):
            st.grad_pending = comm.all_to_all_async(dy.contiguous(), st.outs, st.ins, st.group, st.grad_wire,
                                                    name=f"{st.name}/bwd")
        run_deferred(st.deferred)
        return dy.new_zeros(0), None


def run_deferred(queue: list[Callable[[], None]]) -> None:
    while queue:
        queue.pop(0)()


@dataclass(eq=False)
class A2AHandle:
    tok: torch.Tensor
    st: _State

    def wait(self) -> torch.Tensor:
        return _Wait.apply(self.tok, self.st)

    @property
    def deferred(self) -> list[Callable[[], None]]:
        return self.st.deferred


def start_a2a(x: torch.Tensor, in_splits: list[int], out_splits: list[int], group, wire: str, grad_wire: str,
              name: str, block: int | None = None, keep: list | None = None) -> A2AHandle:
    """Launch the all-to-all of x's rows (``in_splits[j]`` rows to rank j); ``.wait()`` gives them."""
    st = _State(list(in_splits), list(out_splits), group, wire, grad_wire, name, block, keep)
    return A2AHandle(_Start.apply(x, st), st)


# ------------------------------------------------------------------ experts with deferred wgrad


def _ops(backend: str):
    """(gemm(x, w, counts), dgrad(dy, w, counts), wgrad(x, dy, counts) -> [E, K, N]) for a backend."""
    if backend == "triton":
        gg = importlib.import_module("runtime.kernels.grouped_gemm")  # the package re-exports a function of that name

        off = gg.counts_to_offsets
        return (lambda x, w, c: gg.grouped_gemm_fwd_triton(x.contiguous(), w, off(c)),
                lambda dy, w, c: gg.grouped_gemm_dgrad_triton(dy.contiguous(), w, off(c)),
                lambda x, dy, c: gg.grouped_gemm_wgrad_triton(x.contiguous(), dy.contiguous(), off(c), x.dtype))

    # torch: grouped GEMMs from the device counts (torch._grouped_mm where it has a kernel, see
    # runtime.kernels.grouped_gemm.grouped_mm_usable; a per-expert loop elsewhere)
    gg = importlib.import_module("runtime.kernels.grouped_gemm")
    return (gg.grouped_mm, lambda dy, w, c: gg.grouped_mm(dy, w.transpose(1, 2), c),
            lambda x, dy, c: gg.grouped_mm_wgrad(x, dy, c))


def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    g = g.to(p.dtype)
    p.grad = g if p.grad is None else p.grad + g


class _Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, w1, w3, w2, backend: str, defer: list | None):
        gemm, _, _ = _ops(backend)
        # under autocast (bf16 on GPU) the experts compute in the autocast dtype, forward and
        # backward alike: the backward runs outside autocast and follows the saved x's dtype
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x = x.to(dt)
        w1c, w3c, w2c = (w.to(dt) for w in (w1, w3, w2))
        with span("moe.fc1/fwd"):
            g, u = gemm(x, w1c, counts), gemm(x, w3c, counts)
        with span("moe.act/fwd"):
            a = F.silu(g) * u
        with span("moe.fc2/fwd"):
            y = gemm(a, w2c, counts)
        ctx.save_for_backward(x, counts, g, u)
        # the parameters themselves, not saved tensors: under activation checkpointing a saved
        # tensor comes back as a detached copy, and .grad must land on the parameter
        ctx.weights, ctx.backend, ctx.defer = (w1, w3, w2), backend, defer
        return y

    @staticmethod
    def backward(ctx, dy):
        x, counts, g, u = ctx.saved_tensors
        w1, w3, w2 = ctx.weights
        _, dgrad, wgrad = _ops(ctx.backend)
        dt = x.dtype
        dy = dy.to(dt).contiguous()
        with span("moe.fc2/dgrad"):
            da = dgrad(dy, w2.to(dt), counts)
        with span("moe.act/dgrad"):
            sg = torch.sigmoid(g)
            silu = g * sg
            dg = da * u * sg * (1 + g * (1 - sg))
            du = da * silu
        with span("moe.fc1/dgrad"):
            dx = dgrad(dg, w1.to(dt), counts) + dgrad(du, w3.to(dt), counts)

        def weight_grads() -> None:
            with span("moe.fc2/wgrad"):
                _accumulate(w2, wgrad(silu * u, dy, counts))
            with span("moe.fc1/wgrad"):
                _accumulate(w1, wgrad(x, dg, counts))
                _accumulate(w3, wgrad(x, du, counts))

        if ctx.defer is None:
            weight_grads()
        else:
            ctx.defer.append(weight_grads)
        return dx, None, None, None, None, None, None


def experts(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
            backend: str = "torch", defer: A2AHandle | None = None) -> torch.Tensor:
    """SwiGLU experts over rows grouped by local expert; weight gradients go straight to ``.grad``
    (at once, or queued on ``defer`` to run while its gradient all-to-all is in flight)."""
    return _Experts.apply(x, counts, w1, w3, w2, backend, None if defer is None else defer.deferred)
