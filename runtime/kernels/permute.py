"""Permute / unpermute for MoE dispatch, fused with the top-k gather/scatter and router weights.

permute:   tokens [T, H], topk_idx [T, k] -> x_sorted [T*k, H] (rows grouped by expert, stable
           in token order), counts [E], row_map [T, k] (row of x_sorted holding token t's j-th pick).
unpermute: y_sorted [T*k, H], row_map [T, k], probs [T, k] -> out [T, H] = sum_j probs[t,j] * y_sorted[row_map[t,j]].

The index math (a stable argsort of T*k expert ids and a bincount) is tiny and stays in torch
for both backends; the kernels do the data movement: each token row is read once and written
to its k slots, and unpermute reads k rows and writes one, weighting them in fp32.  Both
backwards are gathers (no atomics), so results are deterministic.
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend, triton_import_error, use_autotune


def expert_counts(flat_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N] expert ids -> [E] int64 counts. A scatter-add, not torch.bincount: bincount sizes its
    output from the ids' maximum, which on CUDA is a device-to-host read every call."""
    flat = flat_idx.reshape(-1).to(torch.int64)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def routing_map(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (src_token [T*k], counts [E], row_map [T, k]) for a stable sort of the picks by expert."""
    t, k = topk_idx.shape
    flat = topk_idx.reshape(-1).to(torch.int64)
    order = torch.sort(flat, stable=True).indices  # sorted row r holds pick order[r]
    row_map = torch.empty_like(flat)
    row_map[order] = torch.arange(flat.numel(), device=flat.device)
    counts = expert_counts(flat, num_experts)
    return order // k, counts, row_map.view(t, k)


def permute_torch(tokens: torch.Tensor, topk_idx: torch.Tensor, num_experts: int):
    src, counts, row_map = routing_map(topk_idx, num_experts)
    return tokens[src], counts, row_map


def unpermute_torch(y_sorted: torch.Tensor, row_map: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    gathered = y_sorted[row_map]  # [T, k, H]
    return (gathered * probs.unsqueeze(-1).to(gathered.dtype)).sum(dim=1)


if triton_import_error() is None:
    import triton
    import triton.language as tl

    @triton.jit
    def _scatter_rows_kernel(x_ptr, out_ptr, map_ptr, H, stride_x, stride_o, TOPK: tl.constexpr,
                             BLOCK: tl.constexpr):
        """out[row_map[t, j]] = x[t] for all j: permute forward (and unpermute's dgrad without weights)."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < H
        v = tl.load(x_ptr + t * stride_x + cols, mask=ok)
        for j in tl.static_range(TOPK):
            row = tl.load(map_ptr + t * TOPK + j).to(tl.int64)
            tl.store(out_ptr + row * stride_o + cols, v, mask=ok)

    @triton.jit
    def _gather_sum_kernel(y_ptr, out_ptr, map_ptr, p_ptr, H, stride_y, stride_o, HAS_P: tl.constexpr,
                           TOPK: tl.constexpr, BLOCK: tl.constexpr):
        """out[t] = sum_j p[t, j] * y[row_map[t, j]]: unpermute forward (and permute's backward, p = 1)."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < H
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(TOPK):
            row = tl.load(map_ptr + t * TOPK + j).to(tl.int64)
            v = tl.load(y_ptr + row * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_P:
                v = v * tl.load(p_ptr + t * TOPK + j).to(tl.float32)
            acc += v
        tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _unpermute_bwd_kernel(dout_ptr, y_ptr, map_ptr, p_ptr, dy_ptr, dp_ptr, H, stride_do, stride_y,
                              stride_dy, TOPK: tl.constexpr, BLOCK: tl.constexpr):
        """dy[row_map[t,j]] = p[t,j] * dout[t];  dp[t,j] = <dout[t], y[row_map[t,j]]> (one program per token)."""
        t = tl.program_id(0).to(tl.int64)
        for j in tl.static_range(TOPK):
            row = tl.load(map_ptr + t * TOPK + j).to(tl.int64)
            p = tl.load(p_ptr + t * TOPK + j).to(tl.float32)
            dot = tl.zeros((BLOCK,), dtype=tl.float32)
            for h0 in range(0, H, BLOCK):
                cols = h0 + tl.arange(0, BLOCK)
                ok = cols < H
                g = tl.load(dout_ptr + t * stride_do + cols, mask=ok, other=0.0).to(tl.float32)
                y = tl.load(y_ptr + row * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
                tl.store(dy_ptr + row * stride_dy + cols, (g * p).to(dy_ptr.dtype.element_ty), mask=ok)
                dot += g * y
            tl.store(dp_ptr + t * TOPK + j, tl.sum(dot, axis=0).to(dp_ptr.dtype.element_ty))


def _block(device: torch.device) -> int:
    return 1024 if use_autotune(device) else 32


def _scatter_rows(x: torch.Tensor, row_map: torch.Tensor, n_rows: int) -> torch.Tensor:
    t, h = x.shape
    out = torch.empty(n_rows, h, dtype=x.dtype, device=x.device)
    if t and h:
        blk = _block(x.device)
        _scatter_rows_kernel[(t, triton.cdiv(h, blk))](x, out, row_map, h, x.stride(0), out.stride(0),
                                                      TOPK=row_map.shape[1], BLOCK=blk)
    return out


def _gather_sum(y: torch.Tensor, row_map: torch.Tensor, probs: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    t, h = row_map.shape[0], y.shape[1]
    out = torch.empty(t, h, dtype=out_dtype, device=y.device)
    if t and h:
        blk = _block(y.device)
        p = probs if probs is not None else row_map  # dummy pointer when HAS_P is False
        _gather_sum_kernel[(t, triton.cdiv(h, blk))](y, out, row_map, p, h, y.stride(0), out.stride(0),
                                                    HAS_P=probs is not None, TOPK=row_map.shape[1], BLOCK=blk)
    return out


class PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: torch.Tensor, row_map: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(row_map)
        return _scatter_rows(tokens.contiguous(), row_map, row_map.numel())

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (row_map,) = ctx.saved_tensors
        return _gather_sum(dout.contiguous(), row_map, None, dout.dtype), None


class UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted: torch.Tensor, row_map: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        y_sorted, probs = y_sorted.contiguous(), probs.contiguous()
        ctx.save_for_backward(y_sorted, row_map, probs)
        return _gather_sum(y_sorted, row_map, probs, y_sorted.dtype)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        y, row_map, probs = ctx.saved_tensors
        dout = dout.contiguous()
        t, k = row_map.shape
        h = y.shape[1]
        dy = torch.empty_like(y)
        dp = torch.empty(t, k, dtype=probs.dtype, device=probs.device)
        if t and h:
            blk = _block(y.device)
            _unpermute_bwd_kernel[(t,)](dout, y, row_map, probs, dy, dp, h, dout.stride(0), y.stride(0),
                                        dy.stride(0), TOPK=k, BLOCK=blk)
        elif t:
            dp.zero_()
        return dy, None, dp


def permute(tokens: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, backend: str = "auto"):
    """tokens [T, H], topk_idx [T, k] -> (x_sorted [T*k, H], counts [E] int64, row_map [T, k] int64)."""
    if tokens.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape[0] != tokens.shape[0]:
        raise ValueError(f"permute: tokens {tuple(tokens.shape)} and topk_idx {tuple(topk_idx.shape)} "
                         "must be [T, H] and [T, k]")
    if resolve_backend(backend, tokens.device) == "torch":
        return permute_torch(tokens, topk_idx, num_experts)
    _, counts, row_map = routing_map(topk_idx, num_experts)
    return PermuteFunction.apply(tokens, row_map), counts, row_map


def unpermute(y_sorted: torch.Tensor, row_map: torch.Tensor, probs: torch.Tensor, backend: str = "auto"):
    """y_sorted [T*k, H], row_map [T, k], probs [T, k] -> [T, H] weighted sum (grads flow to y and probs)."""
    if row_map.shape != probs.shape or y_sorted.shape[0] != row_map.numel():
        raise ValueError(f"unpermute: y_sorted {tuple(y_sorted.shape)}, row_map {tuple(row_map.shape)}, "
                         f"probs {tuple(probs.shape)} must be [T*k, H], [T, k], [T, k]")
    if resolve_backend(backend, y_sorted.device) == "torch":
        return unpermute_torch(y_sorted, row_map, probs)
    return UnpermuteFunction.apply(y_sorted, row_map, probs)
