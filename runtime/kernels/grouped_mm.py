"""The torch paths of the grouped GEMM over experts (y_e = x_e @ W_e, rows sorted by expert): the
per-expert loop reference and torch._grouped_mm from device offsets (no host sync) where it has a
kernel for the dtype and device. runtime.kernels.grouped_gemm (the Triton kernels) re-exports them.
"""

from __future__ import annotations

import torch

from runtime.spans import span

# ---------------------------------------------------------------- torch reference


def counts_to_offsets(counts: torch.Tensor) -> torch.Tensor:
    """[E] counts -> [E+1] int32 exclusive prefix sum (int32 keeps kernel index math cheap)."""
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    offsets[1:] = torch.cumsum(counts.to(torch.int64), 0).to(torch.int32)
    return offsets


def grouped_gemm_loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert (differentiable through plain autograd). Reads the counts on
    the host: a device sync on CUDA, so only where torch._grouped_mm cannot run (see grouped_mm)."""
    parts = torch.split(x, [int(c) for c in counts.tolist()], dim=0)
    ws = w.unbind(0)  # one stacked gradient in backward, not a zero-filled [E, K, N] per expert
    outs = [p @ ws[e] for e, p in enumerate(parts)]
    if not outs:
        return x.new_zeros(0, w.shape[2])
    return torch.cat(outs, dim=0)


# ---------------------------------------------------------------- torch._grouped_mm (device offsets)
# torch._grouped_mm(x [M, K], w [E, K, N], offs=inclusive row ends, int32, on x's device) runs the
# grouped GEMM from device offsets. Without a host sync only where it has a real kernel: CUDA sm90
# (and sm100) with bf16 operands and output (CUTLASS); any other CUDA case falls back to a loop that first
# copies the offsets to the host. On the CPU that fallback loop is the kernel (no device to sync
# with), bit-identical to grouped_gemm_loop. Its dgrad reads W transposed as a view, its wgrad is
# the 2-D x 2-D form with the groups along the contraction (token) dimension: both measured on an
# H100 by benchmarks/kernels_gpu.py (torch_grouped_mm rows), ragged counts, exact.

_GMM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _aligned(t: torch.Tensor) -> bool:
    """torch._grouped_mm's operand rule (CPU and CUDA): 16-byte aligned start and non-unit strides."""
    el = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s * el % 16 == 0 for s in t.stride() if s != 1)


def grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm runs x [M, K] @ w [E, K, N] (dtypes, device, alignment; the same holds for
    the dgrad and wgrad it implies) without a host round-trip."""
    dev, dt = x.device, x.dtype
    if not hasattr(torch, "_grouped_mm") or w.dtype != dt or not (_aligned(x) and _aligned(w)):
        return False
    if (w.shape[2] * x.element_size()) % 16 or (x.shape[1] * x.element_size()) % 16:
        return False  # the output's rows (and the transposed copies backward reads)
    if dev.type == "cuda":  # the CUTLASS path: bf16 on Hopper. (On Blackwell an expert without rows
        # gets a non-zero weight gradient: pytorch/pytorch#172439; Hopper writes the zeros.)
        if dt != torch.bfloat16 or torch.cuda.get_device_capability(dev)[0] != 9:
            return False
    elif dev.type != "cpu" or dt not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    key = (dev.type, dt)
    if key not in _GMM_OK:  # once per device kind and dtype: older torch lacks some of these
        try:
            a = torch.zeros(4, 8, dtype=dt, device=dev)
            torch._grouped_mm(a, torch.zeros(2, 8, 8, dtype=dt, device=dev),
                              offs=torch.tensor([1, 4], dtype=torch.int32, device=dev))
            torch._grouped_mm(a.t(), torch.zeros(4, 8, dtype=dt, device=dev),
                              offs=torch.tensor([1, 4], dtype=torch.int32, device=dev))
            _GMM_OK[key] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _GMM_OK[key] = False
    return _GMM_OK[key]


def counts_to_ends(counts: torch.Tensor) -> torch.Tensor:
    """[E] counts -> [E] inclusive int32 row ends (torch._grouped_mm's offs), on the counts' device."""
    return torch.cumsum(counts, 0, dtype=torch.int32)


def gmm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """y_e = x_e @ w[e] (w [E, K, N], any strides, e.g. a transposed view for dgrad); no autograd."""
    return torch._grouped_mm(x, w, offs=ends)


def gmm_wgrad(x: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """dW_e = x_e^T @ dy_e -> [E, K, N] (zeros for an expert without rows); no autograd."""
    return torch._grouped_mm(x.t(), dy, offs=ends)


class GroupedMMFunction(torch.autograd.Function):
    """torch._grouped_mm with explicit dgrad / wgrad (contiguous output gradient, same dtype). op: the
    op-graph name whose `/dgrad` and `/wgrad` spans the two backward GEMMs run under (the trace reader
    cannot tell them apart inside one custom backward node by itself)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, op: str | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, w, ends)
        ctx.op = op
        return gmm(x, w, ends)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, ends = ctx.saved_tensors
        op = ctx.op
        dy = dy.to(x.dtype).contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            with span(f"{op}/dgrad" if op else None):
                dx = gmm(dy, w.transpose(1, 2), ends)
        if ctx.needs_input_grad[1]:
            with span(f"{op}/wgrad" if op else None):
                dw = gmm_wgrad(x, dy, ends)
        return dx, dw, None, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """y_e = x_e @ w[e], no autograd: from device offsets where grouped_mm_usable, else a loop."""
    if grouped_mm_usable(x, w):
        return gmm(x, w, counts_to_ends(counts.to(x.device)))
    with torch.no_grad():
        return grouped_gemm_loop(x, w, counts)


def grouped_mm_wgrad(x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """dW_e = x_e^T @ dy_e -> [E, K, N], no autograd: from device offsets where grouped_mm_usable."""
    e = counts.numel()
    if grouped_mm_usable(x, dy.new_empty(1, 1, dy.shape[1])) and _aligned(dy):
        return gmm_wgrad(x, dy, counts_to_ends(counts.to(x.device)))
    sizes = [int(c) for c in counts.tolist()]
    out = x.new_zeros(e, x.shape[1], dy.shape[1])
    for i, (xe, de) in enumerate(zip(x.split(sizes), dy.split(sizes), strict=True)):
        out[i] = xe.t() @ de
    return out


def grouped_gemm_torch(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, op: str | None = None) -> torch.Tensor:
    """y_e = x_e @ w[e] with torch ops, differentiable: torch._grouped_mm from device offsets where it
    runs without a host sync (grouped_mm_usable), else one matmul per expert (grouped_gemm_loop).
    op: the op-graph name of this GEMM, for the profiler spans of its backward (GroupedMMFunction)."""
    if grouped_mm_usable(x, w):
        return GroupedMMFunction.apply(x, w, counts_to_ends(counts.to(x.device)), op)
    return grouped_gemm_loop(x, w, counts)
