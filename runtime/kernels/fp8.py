"""FP8 e4m3 quantize / dequantize with per-token (row) or per-block (1 x block columns) scales.

scale = amax(group) / 448 (so the largest element maps to e4m3's max normal), q = x / scale
clamped to +-448 and rounded to e4m3; x ~= q * scale.  Per-token scales are [M]; per-block
scales are [M, cdiv(N, block)] (DeepSeek-V3 style 1x128 tiles for activations).  Scales are
fp32: they travel with the payload in FP8 dispatch (4 bytes per token or per block).

For the FP8 GEMMs of precision: fp8 (runtime/fp8_linear.py) two more granularities, torch only
(they run once per operand, not per token, so a kernel of their own buys little):
``quantize_fp8_tensorwise`` (one scale per tensor: Transformer Engine's current scaling) and
``quantize_fp8_blocks`` (one scale per block x block tile of a 2-D tensor: DeepSeek-V3's 128x128
weight blocks), each with its dequantize.
"""

from __future__ import annotations

import torch

from ._backend import interpret_mode, resolve_backend, triton_import_error, use_autotune

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# A group that is all zeros gets a tiny positive amax, so q = 0 and no division by zero.
AMAX_EPS = 1e-12


def _groups(n: int, block: int | None) -> int:
    return 1 if block is None else -(-n // block)


_E4M3_TABLE: list[torch.Tensor] = []


def fp8_to_float(q: torch.Tensor) -> torch.Tensor:
    """q.float(): on CPU torch converts e4m3 element by element (~5 ns each, 5x a cast the other
    way), so there the 256 possible values are looked up in a table: same values, ~3x faster."""
    if q.device.type != "cpu" or q.dtype != FP8_DTYPE:
        return q.float()
    if not _E4M3_TABLE:
        _E4M3_TABLE.append(torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).float())
    return _E4M3_TABLE[0].index_select(0, q.reshape(-1).view(torch.uint8).int()).view(q.shape)


def quantize_fp8_torch(x: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = x.shape
    xf = x.float()
    if block is None:
        scale = xf.abs().amax(dim=1).clamp_min(AMAX_EPS) / FP8_MAX
        q = (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return q, scale
    g = _groups(n, block)
    pad = g * block - n
    xp = torch.nn.functional.pad(xf, (0, pad)).view(m, g, block)
    scale = xp.abs().amax(dim=2).clamp_min(AMAX_EPS) / FP8_MAX
    q = (xp / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(m, g * block)[:, :n].contiguous(), scale


def dequantize_fp8_torch(q: torch.Tensor, scale: torch.Tensor, block: int | None = None,
                         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    qf = fp8_to_float(q)
    if block is None:
        return (qf * scale[:, None]).to(out_dtype)
    m, n = q.shape
    if n == scale.shape[1] * block:  # whole groups: broadcast, no expanded copy of the scales
        return (qf.view(m, -1, block) * scale[:, :, None]).view(m, n).to(out_dtype)
    expanded = scale.repeat_interleave(block, dim=1)[:, :n]
    return (qf * expanded).to(out_dtype)


def quantize_fp8_tensorwise(x: torch.Tensor, batch_dims: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (q e4m3, fp32 scale): one scale per tensor (0-dim), or per matrix of a batch (shape
    x.shape[:batch_dims]); its amax maps to 448."""
    xf = x.float()
    dims = tuple(range(batch_dims, x.dim()))
    scale = xf.abs().amax(dim=dims).clamp_min(AMAX_EPS) / FP8_MAX
    full = scale.reshape(scale.shape + (1,) * len(dims))
    return (xf / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_fp8_tensorwise(q: torch.Tensor, scale: torch.Tensor,
                              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (fp8_to_float(q) * scale.reshape(scale.shape + (1,) * (q.dim() - scale.dim()))).to(out_dtype)


def quantize_fp8_blocks(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., M, N] -> (q e4m3 [..., M, N], scale fp32 [..., cdiv(M, block), cdiv(N, block)]): one
    scale per square tile of each matrix (edge tiles are partial: zero padding never raises an amax)."""
    if x.dim() < 2 or block <= 0:
        raise ValueError(f"quantize_fp8_blocks: x must be [..., M, N] and block positive, got {tuple(x.shape)}, {block}")
    *lead, m, n = x.shape
    gm, gn = _groups(m, block), _groups(n, block)
    xp = torch.nn.functional.pad(x.float(), (0, gn * block - n, 0, gm * block - m))
    tiles = xp.view(*lead, gm, block, gn, block)
    scale = tiles.abs().amax(dim=(-3, -1)).clamp_min(AMAX_EPS) / FP8_MAX
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(*lead, gm * block, gn * block)[..., :m, :n].contiguous(), scale


def dequantize_fp8_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = 128,
                          out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    *lead, m, n = q.shape
    gm, gn = scale.shape[-2:]
    if (m, n) == (gm * block, gn * block):  # whole tiles: broadcast, no expanded copy of the scales
        tiles = fp8_to_float(q).view(*lead, gm, block, gn, block) * scale[..., :, None, :, None]
        return tiles.view(q.shape).to(out_dtype)
    full = scale.repeat_interleave(block, dim=-2)[..., :m, :].repeat_interleave(block, dim=-1)[..., :n]
    return (fp8_to_float(q) * full).to(out_dtype)


if triton_import_error() is None:
    import triton
    import triton.language as tl

    @triton.jit
    def _quant_kernel(x_ptr, q_ptr, s_ptr, N, GROUP, stride_x, stride_q, stride_sm, EPS, QMAX,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        grp = tl.program_id(1)
        start = grp * GROUP
        end = tl.minimum(start + GROUP, N)
        offs = tl.arange(0, BLOCK)
        # Two passes over the group (amax, then scale) so any group size works with one BLOCK.
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(start, end, BLOCK):
            cols = c0 + offs
            v = tl.load(x_ptr + row * stride_x + cols, mask=cols < end, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.max(amax, axis=0), EPS) / QMAX
        for c0 in range(start, end, BLOCK):
            cols = c0 + offs
            ok = cols < end
            v = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
            v = tl.minimum(tl.maximum(v / scale, -QMAX), QMAX)
            tl.store(q_ptr + row * stride_q + cols, v.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(s_ptr + row * stride_sm + grp, scale)

    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, y_ptr, N, GROUP, stride_q, stride_sm, stride_y, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N
        s = tl.load(s_ptr + row * stride_sm + cols // GROUP, mask=ok, other=0.0)
        v = tl.load(q_ptr + row * stride_q + cols, mask=ok, other=0.0).to(tl.float32) * s
        tl.store(y_ptr + row * stride_y + cols, v.to(y_ptr.dtype.element_ty), mask=ok)


def _block(device: torch.device) -> int:
    return 1024 if use_autotune(device) else 32


def quantize_fp8_triton(x: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    m, n = x.shape
    g = _groups(n, block)
    # The interpreter's fp32 -> e4m3 conversion drops the carry when the mantissa rounds up
    # (e.g. 127.9 -> 64, not 128), so there the kernel writes the scaled, clamped fp32 values and
    # torch does the (correctly rounded) cast; compiled kernels store e4m3 directly.
    q_dtype = torch.float32 if interpret_mode() else FP8_DTYPE
    q = torch.empty(m, n, dtype=q_dtype, device=x.device)
    scale = torch.empty(m, g, dtype=torch.float32, device=x.device)
    if m and n:
        group = n if block is None else block
        blk = min(_block(x.device), triton.next_power_of_2(group))
        _quant_kernel[(m, g)](x, q, scale, n, group, x.stride(0), q.stride(0), scale.stride(0),
                              AMAX_EPS, FP8_MAX, BLOCK=blk)
    return q.to(FP8_DTYPE), (scale[:, 0] if block is None else scale)


def dequantize_fp8_triton(q: torch.Tensor, scale: torch.Tensor, block: int | None = None,
                          out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = q.contiguous()
    m, n = q.shape
    s2 = (scale[:, None] if block is None else scale).float().contiguous()
    y = torch.empty(m, n, dtype=out_dtype, device=q.device)
    if m and n:
        blk = _block(q.device)
        group = n if block is None else block
        _dequant_kernel[(m, triton.cdiv(n, blk))](q, s2, y, n, group, q.stride(0), s2.stride(0), y.stride(0),
                                                  BLOCK=blk)
    return y


class FP8RoundTrip(torch.autograd.Function):
    """x -> dequantize(quantize(x)) with a straight-through gradient (what FP8 dispatch does to
    activations in forward; the gradient is passed unchanged because the rounding has zero
    derivative almost everywhere and the backward all-to-all carries its own precision)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, block: int | None, backend: str) -> torch.Tensor:
        q, s = quantize_fp8(x, block, backend)
        return dequantize_fp8(q, s, block, x.dtype, backend)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return dy, None, None


def quantize_fp8(x: torch.Tensor, block: int | None = None, backend: str = "auto"):
    """x [M, N] -> (q e4m3 [M, N], scale fp32 [M] if block is None else [M, cdiv(N, block)])."""
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8: x must be 2-D, got {tuple(x.shape)}")
    if block is not None and block <= 0:
        raise ValueError(f"quantize_fp8: block must be positive, got {block}")
    if resolve_backend(backend, x.device) == "torch":
        return quantize_fp8_torch(x, block)
    return quantize_fp8_triton(x, block)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: int | None = None,
                   out_dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """Inverse of quantize_fp8 (up to e4m3 rounding)."""
    if resolve_backend(backend, q.device) == "torch":
        return dequantize_fp8_torch(q, scale, block, out_dtype)
    return dequantize_fp8_triton(q, scale, block, out_dtype)
