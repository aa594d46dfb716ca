"""Triton kernels for the MoE layer, each beside its plain torch reference.

Entry points the model calls (``backend`` is ``"triton"``, ``"torch"`` or ``"auto"``; ``"auto"``
runs Triton on CUDA, or on CPU when TRITON_INTERPRET=1, and torch otherwise; ``"triton"`` where
Triton cannot run raises a RuntimeError saying why):

- ``permute(tokens[T, H], topk_idx[T, k], num_experts, backend) -> (x_sorted[T*k, H], counts[E], row_map[T, k])``
  rows grouped by expert (stable in token order); ``row_map[t, j]`` is the row holding token t's
  j-th pick.  Differentiable wrt ``tokens``.
- ``expert_ffn(x_sorted[M, H], counts[E], w_gate_up[E, H, 2F], w_down[E, F, H], backend) -> [M, H]``
  grouped GEMM -> SwiGLU (gate = first F columns, up = last F) -> grouped GEMM.  Differentiable
  wrt ``x_sorted`` and both weights.  ``counts`` may hold zeros and must sum to M.
- ``unpermute(y_sorted[T*k, H], row_map[T, k], probs[T, k], backend) -> [T, H]``
  ``out[t] = sum_j probs[t, j] * y_sorted[row_map[t, j]]``; differentiable wrt ``y_sorted`` and ``probs``.

Building blocks: ``grouped_gemm(x, w[E, K, N], counts)``, ``swiglu(x[M, 2F])``,
``quantize_fp8(x, block=None|128) -> (q, scale)``, ``dequantize_fp8(q, scale, block, out_dtype)``,
``fp8_roundtrip(x, block)`` and ``grouped_gemm_fp8`` (FP8 forward, per-token x per-channel scales).
"""

from __future__ import annotations

import torch

from ._backend import interpret_mode, resolve_backend, triton_import_error, triton_usable_on
from .fp8 import FP8_DTYPE, FP8_MAX, FP8RoundTrip, dequantize_fp8, quantize_fp8
from .grouped_gemm import counts_to_offsets, grouped_gemm, grouped_gemm_torch
from .permute import permute, routing_map, unpermute
from .swiglu import swiglu

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "counts_to_offsets", "dequantize_fp8", "expert_ffn", "expert_ffn_torch",
    "fp8_roundtrip", "grouped_gemm", "grouped_gemm_fp8", "interpret_mode", "permute", "quantize_fp8",
    "resolve_backend", "routing_map", "swiglu", "triton_import_error", "triton_usable_on", "unpermute",
]


def expert_ffn_torch(x_sorted: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor,
                     w_down: torch.Tensor) -> torch.Tensor:
    """Reference: a plain loop over experts, SwiGLU in eager torch."""
    h = swiglu(grouped_gemm_torch(x_sorted, w_gate_up, counts), backend="torch")
    return grouped_gemm_torch(h, w_down, counts)


def expert_ffn(x_sorted: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor,
               w_down: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """SwiGLU experts over rows sorted by expert: [M, H] -> [M, H]."""
    e, h, f2 = w_gate_up.shape
    if w_down.shape != (e, f2 // 2, h) or f2 % 2:
        raise ValueError(f"expert_ffn: w_gate_up {tuple(w_gate_up.shape)} and w_down {tuple(w_down.shape)} "
                         "must be [E, H, 2F] and [E, F, H]")
    if resolve_backend(backend, x_sorted.device) == "torch":
        return expert_ffn_torch(x_sorted, counts, w_gate_up, w_down)
    hidden = swiglu(grouped_gemm(x_sorted, w_gate_up, counts, "triton"), "triton")
    return grouped_gemm(hidden, w_down, counts, "triton")


def fp8_roundtrip(x: torch.Tensor, block: int | None = None, backend: str = "auto") -> torch.Tensor:
    """dequantize(quantize(x)) with a straight-through gradient."""
    return FP8RoundTrip.apply(x, block, backend)


def grouped_gemm_fp8(xq, x_scale, wq, w_scale, counts, out_dtype=torch.bfloat16):
    """FP8 grouped GEMM forward (Triton only); see grouped_gemm.grouped_gemm_fp8_triton."""
    resolve_backend("triton", xq.device)
    from .grouped_gemm import grouped_gemm_fp8_triton

    return grouped_gemm_fp8_triton(xq, x_scale, wq, w_scale, counts, out_dtype)
