"""Grouped GEMM over experts: y_e = x_e @ W_e for rows of x sorted by expert.

x is [M, K] with the rows of expert e at offsets[e]:offsets[e+1] (offsets = exclusive cumsum
of the routing counts, so empty experts are just zero-length ranges); W is [E, K, N].
Backward: dgrad dx_e = dy_e @ W_e^T reuses the forward kernel with W's strides swapped, and
wgrad dW_e = x_e^T @ dy_e has its own kernel that reduces over each expert's rows.

The Triton kernels never sync with the host: the grid is sized from an upper bound on the number
of row tiles (cdiv(M, BLOCK_M) + E), and each program finds its expert from the offsets. The torch
path (runtime/kernels/grouped_mm.py: grouped_gemm_torch, grouped_mm, grouped_mm_wgrad) runs torch._grouped_mm from device offsets
where it has a kernel for the dtype and device (grouped_mm_usable), and only elsewhere falls back to
a per-expert loop that reads the counts on the host.
"""

from __future__ import annotations

import sys

import torch

from ._backend import interpret_mode, resolve_backend, triton_import_error, use_autotune
from .grouped_mm import (  # noqa: F401 (re-exported: the torch paths live there)
    GroupedMMFunction,
    _aligned,
    counts_to_ends,
    counts_to_offsets,
    gmm,
    gmm_wgrad,
    grouped_gemm_loop,
    grouped_gemm_torch,
    grouped_mm,
    grouped_mm_usable,
    grouped_mm_wgrad,
)

# ---------------------------------------------------------------- triton kernels

if triton_import_error() is None:
    import triton
    import triton.language as tl

    def _configs_fwd() -> list:
        # H100: 128x256x64 with 3-4 stages is the usual bf16 sweet spot; 64-row tiles help when
        # experts get few tokens (DeepSeek-style many small experts); fp8 wants BLOCK_K=128
        # (a 128-byte K slice per row, as wgmma reads it).  Shared memory per stage stays
        # <= 48 KB, so 4 stages fit Hopper's 228 KB.
        cfgs = []
        for bm, bn, bk, w, s in [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4),
                                 (128, 128, 64, 8, 4), (64, 256, 64, 4, 4), (64, 128, 64, 4, 4),
                                 (256, 128, 64, 8, 3), (128, 128, 64, 4, 5),
                                 (128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (128, 128, 128, 8, 3),
                                 (64, 128, 128, 4, 4)]:
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                      num_warps=w, num_stages=s))
        return cfgs

    def _prune_fwd(configs: list, nargs: dict, **_kw) -> list:
        """16-bit operands take the BLOCK_K=64 configs, fp8 the BLOCK_K=128 ones: autotuning then
        compiles half the list per shape (compiles dominate a first call's time)."""
        want = 128 if nargs["a_ptr"].element_size() == 1 else 64
        return [c for c in configs if c.kwargs["BLOCK_K"] == want] or configs

    def _configs_wgrad() -> list:
        cfgs = []
        # H100 run 1 (benchmarks/results/kernels_gpu_*.csv): these reached 0.51-0.77 of cuBLAS; the
        # wider tiles (256 rows or columns, 8 warps) are candidates for the large-expert shapes
        for bk, bn, bm, w, s in [(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                 (64, 128, 64, 4, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3),
                                 (128, 256, 64, 8, 4), (128, 128, 64, 8, 4)]:
            cfgs.append(triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_M": bm},
                                      num_warps=w, num_stages=s))
        return cfgs

    @triton.jit
    def _expert_tile(offs_ptr, M, N, K, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUP_M: tl.constexpr, E_POW2: tl.constexpr):
        """This program's output tile: (first row, end of its expert's rows, expert, column-tile
        index, K to loop over). Shared by both forward kernels."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M) + E  # upper bound on row tiles: each expert wastes < 1 tile
        num_n = tl.cdiv(N, BLOCK_N)
        # L2 swizzle over the virtual row-tile space: GROUP_M row tiles share each W column block.
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        tile_m = first_m + (pid % width) % group_m
        pid_n = (pid % width) // group_m
        # Find this tile's expert without a serial loop over experts: expert e owns virtual tiles
        # [cum[e] - tiles[e], cum[e]), so the owner is the number of experts whose cum <= tile_m.
        eidx = tl.arange(0, E_POW2)
        e_ok = eidx < E
        lo = tl.load(offs_ptr + eidx, mask=e_ok, other=0)
        hi = tl.load(offs_ptr + eidx + 1, mask=e_ok, other=0)
        n_tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
        cum = tl.cumsum(n_tiles, axis=0)
        valid = tile_m < tl.sum(n_tiles, axis=0)
        expert = tl.sum((cum <= tile_m).to(tl.int32), axis=0)
        sel = (eidx == expert) & valid
        row_start = tl.sum(tl.where(sel, lo + (tile_m - (cum - n_tiles)) * BLOCK_M, 0), axis=0)
        row_end = tl.sum(tl.where(sel, hi, 0), axis=0)  # 0 for padding tiles: every row masked off
        # Padding tiles run zero K iterations and store nothing (no early return: portable).
        k_end = tl.where(valid, K, 0)
        expert = tl.where(valid, expert, 0)
        return row_start, row_end, expert, pid_n, k_end

    @triton.jit
    def _gg_fwd_kernel(a_ptr, b_ptr, c_ptr, offs_ptr, sa_ptr, sb_ptr, M, N, K, E,
                       stride_am, stride_ak, stride_be, stride_bk, stride_bn,
                       stride_cm, stride_cn, stride_sbe,
                       HAS_SCALES: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, E_POW2: tl.constexpr, EVEN_K: tl.constexpr):
        row_start, row_end, expert, pid_n, k_end = _expert_tile(offs_ptr, M, N, K, E, BLOCK_M, BLOCK_N,
                                                                GROUP_M, E_POW2)
        rows = row_start + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak
        b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            if EVEN_K:  # K a multiple of BLOCK_K (every model shape): no K mask in the hot loop
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + ks) < K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if HAS_SCALES:  # FP8: per-row scale of x times per-column scale of W_e
            sa = tl.load(sa_ptr + rows, mask=row_ok, other=0.0)
            sb = tl.load(sb_ptr + expert * stride_sbe + cols, mask=col_ok, other=0.0)
            acc = acc * sa[:, None] * sb[None, :]
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _gg_wgrad_kernel(a_ptr, g_ptr, c_ptr, offs_ptr, K, N,
                         stride_am, stride_ak, stride_gm, stride_gn, stride_ce, stride_ck, stride_cn,
                         PRECISION: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        pid = tl.program_id(0)
        e = tl.program_id(1)
        num_n = tl.cdiv(N, BLOCK_N)
        pid_k = pid // num_n
        pid_n = pid % num_n
        lo = tl.load(offs_ptr + e)
        hi = tl.load(offs_ptr + e + 1)
        kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = tl.arange(0, BLOCK_M)
        k_ok = kk < K
        col_ok = cols < N
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        # An empty expert loops zero times and stores zeros: dW_e = 0 is the right gradient.
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + ms
            r_ok = rows < hi
            # x_e^T loaded directly as a [BLOCK_K, BLOCK_M] tile (transposed addressing).
            at = tl.load(a_ptr + rows[None, :].to(tl.int64) * stride_am + kk[:, None] * stride_ak,
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            g = tl.load(g_ptr + rows[:, None].to(tl.int64) * stride_gm + cols[None, :] * stride_gn,
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(at, g, acc, input_precision=PRECISION)
        c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + kk[:, None] * stride_ck + cols[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _gg_fwd_tma_kernel(a_ptr, b_ptr, c_ptr, offs_ptr, sa_ptr, sb_ptr, M, N, K, E, stride_cm, stride_sbe,
                           B_TRANS: tl.constexpr, HAS_SCALES: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, E_POW2: tl.constexpr):
        """The forward kernel with Hopper TMA loads (bulk tensor copies into shared memory).

        A is [M, K] row-major; B is expert-stacked and read as 2-D: [E*K, N] (B_TRANS False: W
        [E, K, N]) or [E*N, K] (B_TRANS True: W stored [E, N, K], i.e. dgrad's W^T and fp8's
        K-major weights). A tile may run past its expert's rows into the next expert's: those
        rows are computed and never stored; past M, TMA fills zeros. Needs K % BLOCK_K == 0 (a
        B tile must not cross into the next expert's K rows).
        """
        row_start, row_end, expert, pid_n, k_end = _expert_tile(offs_ptr, M, N, K, E, BLOCK_M, BLOCK_N,
                                                                GROUP_M, E_POW2)
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        if B_TRANS:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * N, K], strides=[K, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * K, N], strides=[N, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            a = a_desc.load([row_start, k0])
            if B_TRANS:
                b = tl.trans(b_desc.load([expert * N + n0, k0]))
            else:
                b = b_desc.load([expert * K + k0, n0])
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        rows = row_start + tl.arange(0, BLOCK_M)
        cols = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        col_ok = cols < N
        if HAS_SCALES:
            sa = tl.load(sa_ptr + rows, mask=row_ok, other=0.0)
            sb = tl.load(sb_ptr + expert * stride_sbe + cols, mask=col_ok, other=0.0)
            acc = acc * sa[:, None] * sb[None, :]
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    def _prune_tma(configs: list, nargs: dict, **kw) -> list:
        ok = [c for c in _prune_fwd(configs, nargs) if nargs["K"] % c.kwargs["BLOCK_K"] == 0]
        return ok or configs

    _gg_fwd_tuned = triton.autotune(configs=_configs_fwd(), key=["N", "K", "HAS_SCALES", "E_POW2"],
                                    prune_configs_by={"early_config_prune": _prune_fwd})(
        triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_gg_fwd_kernel))
    _gg_fwd_tma_tuned = triton.autotune(configs=_configs_fwd(), key=["N", "K", "HAS_SCALES", "E_POW2", "B_TRANS"],
                                        prune_configs_by={"early_config_prune": _prune_tma})(_gg_fwd_tma_kernel)
    _gg_wgrad_tuned = triton.autotune(configs=_configs_wgrad(), key=["K", "N"])(_gg_wgrad_kernel)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs honour torch's TF32 switch so "fp32" means the same on both backends; for
    # bf16/fp8 the setting is ignored by the compiler, so pass Triton's default.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


_TMA_FAILED: list[str] = []  # why the TMA kernel could not run here (then the pointer kernel runs)


def _tma_alloc(size: int, alignment: int, stream):  # scratch for device-side TMA descriptors
    return torch.empty(size, dtype=torch.int8, device="cuda")


def tma_available(device: torch.device) -> bool:
    """Hopper (sm_90+) with a Triton that builds TMA descriptors in-kernel, and no failure seen."""
    if _TMA_FAILED or triton_import_error() is not None or not hasattr(tl, "make_tensor_descriptor"):
        return False
    if device.type != "cuda" or interpret_mode():
        return interpret_mode()  # the interpreter runs it too (CPU tests of the kernel)
    return torch.cuda.get_device_capability(device)[0] >= 9


def _tma_layout(a: torch.Tensor, b_strides: tuple[int, int, int], n: int, k: int) -> bool | None:
    """B_TRANS for a TMA launch (B [E, K, N] as stored [E, K, N] -> False, [E, N, K] -> True), or
    None where TMA cannot read these operands (strided A, other B layouts, K not a multiple of 128)."""
    if k % 128 or a.stride(1) != 1 or a.stride(0) != k or (k * a.element_size()) % 16:
        return None
    if b_strides == (k * n, n, 1) and (n * a.element_size()) % 16 == 0:
        return False
    if b_strides == (n * k, 1, k):
        return True
    return None


def _launch_fwd(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor,
                b_strides: tuple[int, int, int], n: int, k: int,
                sa: torch.Tensor | None = None, sb: torch.Tensor | None = None,
                tma: bool | None = None) -> torch.Tensor:
    """`tma`: None = TMA loads where available (Hopper) and the operands allow, else pointer loads."""
    m, e = a.shape[0], offsets.numel() - 1
    if m == 0 or n == 0:
        return out
    has_scales = sa is not None
    sa_ = sa if has_scales else offsets  # dummy pointers, never read when HAS_SCALES is False
    sb_ = sb if has_scales else offsets
    stride_sbe = sb.stride(0) if has_scales else 0
    prec = _precision(a.dtype)
    e_pow2 = max(16, triton.next_power_of_2(e))  # >= 16: tiny aranges trip some backends

    def grid(meta):  # row tiles (each expert wastes < 1) x column tiles, for either kernel
        return ((triton.cdiv(m, meta["BLOCK_M"]) + e) * triton.cdiv(n, meta["BLOCK_N"]),)

    forced = tma is True
    if tma is None:  # measured on an H100 (benchmarks/results/kernels_gpu_*.csv): TMA loads win for
        # 16-bit operands (dgrad +15 %), pointer loads for fp8 (TMA 3 % slower on average)
        tma = a.element_size() >= 2
    b_trans = _tma_layout(a, b_strides, n, k) if tma and tma_available(a.device) else None
    if forced and b_trans is None:
        raise RuntimeError(f"grouped GEMM: TMA asked for but not usable here (device {a.device}, K={k}, "
                           f"B strides {b_strides}{'; ' + _TMA_FAILED[0] if _TMA_FAILED else ''})")
    if b_trans is not None:
        targs = (a, b, out, offsets, sa_, sb_, m, n, k, e, out.stride(0), stride_sbe)
        try:
            if use_autotune(a.device):
                triton.set_allocator(_tma_alloc)
                _gg_fwd_tma_tuned[grid](*targs, B_TRANS=b_trans, HAS_SCALES=has_scales, PRECISION=prec,
                                        E_POW2=e_pow2)
            else:
                _gg_fwd_tma_kernel[grid](*targs, B_TRANS=b_trans, HAS_SCALES=has_scales, PRECISION=prec,
                                         BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=4, E_POW2=e_pow2)
            return out
        except Exception as exc:  # a Triton/driver without working TMA: say so once, use pointer loads
            if forced:
                raise
            _TMA_FAILED.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            print(f"moeperf: grouped GEMM TMA kernel failed ({_TMA_FAILED[0]}); using pointer loads",
                  file=sys.stderr)
    args = (a, b, out, offsets, sa_, sb_, m, n, k, e, a.stride(0), a.stride(1), *b_strides,
            out.stride(0), out.stride(1), stride_sbe)
    if use_autotune(a.device):
        _gg_fwd_tuned[grid](*args, HAS_SCALES=has_scales, PRECISION=prec, E_POW2=e_pow2)
    else:  # small tiles keep the interpreter fast and exercise ragged edges
        _gg_fwd_kernel[grid](*args, HAS_SCALES=has_scales, PRECISION=prec,
                             BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, E_POW2=e_pow2, EVEN_K=k % 32 == 0)
    return out


def grouped_gemm_fwd_triton(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                            tma: bool | None = None) -> torch.Tensor:
    """y = x_e @ W_e; W is [E, K, N] (any strides)."""
    out = torch.empty(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)
    return _launch_fwd(x, w, offsets, out, (w.stride(0), w.stride(1), w.stride(2)), w.shape[2], w.shape[1],
                       tma=tma)


def grouped_gemm_dgrad_triton(dy: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                              tma: bool | None = None) -> torch.Tensor:
    """dx = dy_e @ W_e^T: the forward kernel reading W [E, K, N] as [E, N, K] via swapped strides."""
    out = torch.empty(dy.shape[0], w.shape[1], dtype=dy.dtype, device=dy.device)
    return _launch_fwd(dy, w, offsets, out, (w.stride(0), w.stride(2), w.stride(1)), w.shape[1], w.shape[2],
                       tma=tma)


def grouped_gemm_wgrad_triton(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor,
                              out_dtype: torch.dtype) -> torch.Tensor:
    """dW_e = x_e^T @ dy_e -> [E, K, N]."""
    e, k, n = offsets.numel() - 1, x.shape[1], dy.shape[1]
    out = torch.empty(e, k, n, dtype=out_dtype, device=x.device)
    if e == 0 or k == 0 or n == 0:
        return out
    args = (x, dy, out, offsets, k, n, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            out.stride(0), out.stride(1), out.stride(2))
    prec = _precision(x.dtype)
    if use_autotune(x.device):
        def grid(meta):
            return (triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]), e)
        _gg_wgrad_tuned[grid](*args, PRECISION=prec)
    else:
        bk, bn, bm = 32, 32, 16
        _gg_wgrad_kernel[(triton.cdiv(k, bk) * triton.cdiv(n, bn), e)](
            *args, PRECISION=prec, BLOCK_K=bk, BLOCK_N=bn, BLOCK_M=bm)
    return out


def grouped_gemm_fp8_triton(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor,
                            w_scale: torch.Tensor, counts: torch.Tensor,
                            out_dtype: torch.dtype = torch.bfloat16, tma: bool | None = None) -> torch.Tensor:
    """FP8 forward: y = (xq_e @ wq_e) * x_scale[row] * w_scale[e, col] (per-token x per-channel).

    xq [M, K] e4m3, x_scale [M] fp32, wq [E, K, N] e4m3 (stored [E, N, K] and viewed transposed is
    fastest on Hopper: K-major B), w_scale [E, N] fp32.  Inference/benchmark path: no backward.
    """
    offsets = counts_to_offsets(counts.to(xq.device))
    out = torch.empty(xq.shape[0], wq.shape[2], dtype=out_dtype, device=xq.device)
    return _launch_fwd(xq, wq, offsets, out, (wq.stride(0), wq.stride(1), wq.stride(2)),
                       wq.shape[2], wq.shape[1], sa=x_scale.float().contiguous(), sb=w_scale.float(), tma=tma)


# ---------------------------------------------------------------- autograd


class GroupedGemmFunction(torch.autograd.Function):
    """Triton grouped GEMM with dgrad and wgrad kernels in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts_to_offsets(counts.to(x.device))  # routing counts may live on the host
        ctx.save_for_backward(x, w, offsets)
        return grouped_gemm_fwd_triton(x, w, offsets)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = grouped_gemm_dgrad_triton(dy, w, offsets) if ctx.needs_input_grad[0] else None
        dw = grouped_gemm_wgrad_triton(x, dy, offsets, w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y[M, N] = x_e @ w[e] for rows sorted by expert; counts [E] sums to M; w [E, K, N]."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1] or counts.numel() != w.shape[0]:
        raise ValueError(f"grouped_gemm: x {tuple(x.shape)}, w {tuple(w.shape)}, counts {tuple(counts.shape)} "
                         "do not fit x [M, K], w [E, K, N], counts [E]")
    if x.dtype != w.dtype:  # the kernel's dot needs one operand dtype; cast master weights first
        raise ValueError(f"grouped_gemm: x is {x.dtype} but w is {w.dtype}")
    if resolve_backend(backend, x.device) == "torch":
        return grouped_gemm_torch(x, w, counts)
    return GroupedGemmFunction.apply(x, w, counts)
