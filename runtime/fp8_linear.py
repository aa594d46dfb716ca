"""FP8 GEMMs for ``plan.precision: fp8``: the linear layers of attention (wq, wk, wv, wo), of the
dense and shared SwiGLU FFNs and of the routed experts run y = x W^T (forward), dx = dy W (dgrad)
and dW = dy^T x (wgrad) with every operand, the output gradient included, quantized to e4m3 with
fp32 scales as ``plan.fp8_recipe`` says. Weights, fp32 masters and the optimizer are untouched.

- tensorwise: one scale per tensor from its own amax (Transformer Engine's current scaling). For
  the experts a tensor is one expert's operand (TE's GroupedLinear quantizes each split alone).
- blockwise (DeepSeek-V3): activations and gradients in 1x128 tiles along the contraction dim
  (rows of x and dy for forward and dgrad; 128x1 tiles, i.e. rows of x^T and dy^T, for wgrad, never
  straddling two experts), weights in 128x128 blocks.

Gradients are e4m3, not e5m2 as in TE's HYBRID format. HYBRID dates from delayed scaling, where a
scale from past amaxes can overflow a gradient and e5m2's range is the cushion; with current (or
per-tile) scaling the scale comes from the tensor itself and cannot overflow, so precision is what
is short: e4m3 rounds to 2^-4 relative, e5m2 to 2^-3. The price: elements below amax * 2^-10 / 448
of their tensor (half e4m3's smallest subnormal) flush to zero, too small to move a GEMM's result.
One format also keeps one kernel per GEMM (the Triton ``grouped_gemm_fp8`` is built for e4m3).

Where it runs (``_path``): EMULATED everywhere except below: each operand is quantized, dequantized
to fp32 and the GEMM runs in fp32 -- the values a real FP8 GEMM multiplies, so an FP8 plan's loss and
gradients are meaningful on CPU. On CUDA (section at the end, UNMEASURED: no GPU was at hand):
``torch._scaled_mm`` for tensorwise linears, ``F.scaled_mm`` blockwise scaling for blockwise ones
(torch with cuBLAS >= 12.9, sm_90), the Triton ``grouped_gemm_fp8`` for tensorwise experts under
``kernels: triton`` (forward and dgrad; their wgrad stays emulated); anything else is emulated, said
once on stderr.

Profiling: casts run under the op graph's ``<gemm>_quant`` spans (``/fwd``: the input and its
transposed copy for wgrad; ``/dgrad``: the output gradient, both layouts); the GEMMs keep the
callers' span names plus explicit ``<gemm>/dgrad`` and ``/wgrad``; a weight is cast only when its
value changed (once per step) under ``optim.fp8_cast/fwd``.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from runtime.kernels.fp8 import (
    AMAX_EPS,
    FP8_DTYPE,
    FP8_MAX,
    dequantize_fp8_blocks,
    dequantize_fp8_tensorwise,
    dequantize_fp8_torch,
    fp8_to_float,
    quantize_fp8_blocks,
    quantize_fp8_tensorwise,
    quantize_fp8_torch,
)
from runtime.kernels.grouped_gemm import grouped_mm, grouped_mm_wgrad
from runtime.spans import span

BLOCK = 128
CASTS: Counter[str] = Counter()  # "<op>:<operand>" (x, xT, dy, w) -> casts made; tests read it
_NOTED: set[str] = set()
_FAILED: set[str] = set()  # CUDA paths that raised once: emulated from then on


@dataclass(frozen=True)
class FP8Recipe:
    name: str  # tensorwise | blockwise

    def __post_init__(self) -> None:
        if self.name not in ("tensorwise", "blockwise"):
            raise ValueError(f"fp8_recipe: {self.name!r} is not tensorwise or blockwise")

    @property
    def tile(self) -> int | None:
        """Scale group of activations and gradients along the contraction dim (None: the whole tensor)."""
        return BLOCK if self.name == "blockwise" else None

    @property
    def wire_block(self) -> int | None:
        """Scale group of an FP8 dispatch that fc1 reads as is: its 1x128 tiles (blockwise), or per
        token (tensorwise: no sender knows the amax of an expert's rows before the all-to-all, and a
        row-scaled FP8 GEMM reads per-token scales as they are)."""
        return self.tile


def recipe_of(precision: str, fp8_recipe: str = "tensorwise") -> FP8Recipe | None:
    return FP8Recipe(fp8_recipe) if precision == "fp8" else None


def _note(msg: str) -> None:
    if msg not in _NOTED:
        _NOTED.add(msg)
        print(f"moeperf fp8: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ quantized operands


@dataclass
class FP8Tensor:
    """A GEMM operand in FP8: e4m3 payload q, fp32 scales and how they map onto q (kind): "tensor"
    (one scale per matrix: [] or [E]), "row" ([R]: per token, or an expert's scale repeated over
    its rows), "tile" ([R, cdiv(C, 128)]), "block" ([(E,) cdiv(R, 128), cdiv(C, 128)]).
    transposed: q holds t^T (the wgrad copy). value: the dequantized fp32 values the emulated GEMM
    multiplies, made on first use (given outright, q None, for layouts only the emulation reads)."""
    q: torch.Tensor | None
    scale: torch.Tensor | None
    kind: str
    transposed: bool = False
    value: torch.Tensor | None = None

    def deq(self) -> torch.Tensor:
        if self.value is None:
            q, s = self.q, self.scale
            if self.kind == "tile":
                v = dequantize_fp8_torch(q, s, BLOCK)
            elif self.kind == "block":
                v = dequantize_fp8_blocks(q, s, BLOCK)
            else:  # tensor / row: the scale broadcasts over the trailing dims
                v = dequantize_fp8_tensorwise(q, s)
            self.value = v.t() if self.transposed else v
        return self.value


def _counts(counts, device: torch.device) -> torch.Tensor | None:
    """Per-expert row counts as an int64 tensor on device (a list from tests, a device tensor from the
    MoE layer: kept there, so no cast or GEMM below reads it on the host)."""
    if counts is None:
        return None
    return torch.as_tensor(counts, dtype=torch.int64).to(device)


def _segments(c: torch.Tensor, rows: int) -> torch.Tensor:
    """[M] expert of each row; output_size given, so CUDA needs no host read to size it."""
    return torch.repeat_interleave(torch.arange(c.numel(), device=c.device), c, output_size=rows)


def _cast_rows(t: torch.Tensor, recipe: FP8Recipe, counts: torch.Tensor | None) -> FP8Tensor:
    """t [M, C] as an operand contracted over C (x in forward, dy in dgrad)."""
    if recipe.tile:
        return FP8Tensor(*quantize_fp8_torch(t, recipe.tile), "tile")
    if counts is None:
        return FP8Tensor(*quantize_fp8_tensorwise(t), "tensor")
    # one scale per expert's rows, kept per row (what a row-scaled grouped GEMM reads); a scatter,
    # so experts without rows need no special case
    seg = _segments(counts, t.shape[0])
    amax = t.new_zeros(counts.numel(), dtype=torch.float32).scatter_reduce(0, seg, t.float().abs().amax(1), "amax")
    scale = amax.clamp_min(AMAX_EPS)[seg] / FP8_MAX
    return FP8Tensor((t.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale, "row")


def _cast_cols(t: torch.Tensor, recipe: FP8Recipe, counts: torch.Tensor | None,
               rows: FP8Tensor | None = None) -> FP8Tensor:
    """t [M, C] as an operand contracted over M (x and dy in wgrad): the transposed copy."""
    if not recipe.tile:  # a scale per tensor does not care about the layout: reuse the row cast
        return rows if rows is not None else _cast_rows(t, recipe, counts)
    if counts is None:
        return FP8Tensor(*quantize_fp8_torch(t.t(), recipe.tile), "tile", transposed=True)
    # 128x1 tiles never straddle two experts: tile k of expert e holds its rows [128k, 128k + 128)
    dev, c, m = t.device, counts, t.shape[0]
    seg = _segments(c, m)
    pos = torch.arange(m, device=dev) - (torch.cumsum(c, 0) - c)[seg]
    tiles = (c + recipe.tile - 1) // recipe.tile
    tile = (torch.cumsum(tiles, 0) - tiles)[seg] + pos // recipe.tile  # [M]
    tf = t.float()
    # sum_e ceil(c_e / 128) < M / 128 + E: a buffer of that many tiles needs no host read of the counts
    # (the unused tail stays zero and is never gathered)
    n_tiles = m // recipe.tile + c.numel()
    amax = tf.new_zeros(n_tiles, t.shape[1]).scatter_reduce_(0, tile[:, None].expand_as(tf), tf.abs(), "amax")
    scale = amax.clamp_min(AMAX_EPS)[tile] / FP8_MAX
    value = fp8_to_float((tf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)) * scale
    return FP8Tensor(None, None, "value", value=value)


def _cast_weight(w: torch.Tensor, recipe: FP8Recipe) -> FP8Tensor:
    """w [N, K] (linear) or [E, K, N] (experts): one scale per matrix, or per 128x128 block."""
    if recipe.tile:
        return FP8Tensor(*quantize_fp8_blocks(w, BLOCK), "block")
    return FP8Tensor(*quantize_fp8_tensorwise(w, batch_dims=w.dim() - 2), "tensor")


_WEIGHTS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def fp8_weight(w: torch.Tensor, recipe: FP8Recipe) -> FP8Tensor:
    """w's FP8 copy, cast again only when w changed: its version counter moves with every in-place
    update (the optimizer's copy into the parameter), its data pointer with a move to another
    device. So once per step, shared by the micro-batches, as TE caches FP8 weights."""
    key = (w._version, w.data_ptr(), recipe.name)
    hit = _WEIGHTS.get(w)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad(), span("optim.fp8_cast/fwd"):
        wq = _cast_weight(w.detach(), recipe)
    CASTS["w"] += 1
    _WEIGHTS[w] = (key, wq)
    return wq


@dataclass
class FP8Act:
    """A GEMM input cast once and read by every GEMM that takes it (q, k and v; gate and up):
    rows for the forward GEMM, cols (the transposed copy) for wgrad."""
    rows: FP8Tensor
    cols: FP8Tensor


def cast_input(x: torch.Tensor, recipe: FP8Recipe, op: str, counts=None) -> FP8Act:
    """Cast x [..., K] (rows grouped by expert when counts [E], a list or a tensor, is given) for the
    FP8 GEMM(s) of op."""
    t = x.detach().reshape(-1, x.shape[-1])
    counts = _counts(counts, t.device)
    with torch.no_grad(), span(f"{op}_quant/fwd"):
        rows = _cast_rows(t, recipe, counts)
        cols = _cast_cols(t, recipe, counts, rows)
    CASTS[f"{op}:x"] += 1
    return FP8Act(rows, cols)


def from_wire(q: torch.Tensor, scale: torch.Tensor, recipe: FP8Recipe, op: str, counts) -> FP8Act:
    """An FP8 dispatch's payload and scales (per token, or 1x128 tiles) as op's forward operand,
    used as they came; only wgrad's transposed copy is cast (the op graph's pre-quantized fc1)."""
    rows = FP8Tensor(q, scale, "tile" if scale.dim() == 2 else "row")
    with torch.no_grad(), span(f"{op}_quant/fwd"):
        cols = _cast_cols(rows.deq(), recipe, _counts(counts, q.device))
    CASTS[f"{op}:xT"] += 1
    return FP8Act(rows, cols)


# ------------------------------------------------------------------ the GEMM


@dataclass(eq=False)
class _Call:
    recipe: FP8Recipe
    op: str
    counts: torch.Tensor | None  # None: one linear y = x W^T; else experts y_e = x_e W_e, W [E, K, N] (device)
    xq: FP8Act | None
    kernels: str
    defer: list | None  # wgrad queued here (runtime.overlap) instead of returned
    out_dtype: torch.dtype


def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    p.grad = g if p.grad is None else p.grad + g


class _FP8GEMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, call: _Call):
        xq = call.xq or cast_input(x, call.recipe, call.op, call.counts)
        wq = fp8_weight(w, call.recipe)
        with torch.autocast(x.device.type, enabled=False):
            y = _gemm("fwd", _path(call, x.device), xq.rows, wq, call)
        # keep wgrad's copy of x only: the forward operand goes once every GEMM reading it has run
        ctx.call, ctx.xt, ctx.wq, ctx.w, ctx.x_dtype = replace(call, xq=None), xq.cols, wq, w, x.dtype
        return y.to(call.out_dtype)

    @staticmethod
    def backward(ctx, dy):
        call, w = ctx.call, ctx.w
        path = _path(call, dy.device)
        with span(f"{call.op}_quant/dgrad"):
            dyr = _cast_rows(dy, call.recipe, call.counts)
            dyc = _cast_cols(dy, call.recipe, call.counts, dyr)
        CASTS[f"{call.op}:dy"] += 1
        dx = None
        if ctx.needs_input_grad[0]:
            with span(f"{call.op}/dgrad"):
                dx = _gemm("dgrad", path, dyr, ctx.wq, call).to(ctx.x_dtype)
        xt = ctx.xt

        def wgrad() -> torch.Tensor:
            with span(f"{call.op}/wgrad"):
                return _gemm("wgrad", path, dyc, xt, call).to(w.dtype)

        if call.defer is None:
            return dx, wgrad() if ctx.needs_input_grad[1] else None, None
        call.defer.append(lambda: _accumulate(w, wgrad()))
        return dx, None, None


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def linear(x: torch.Tensor, w: torch.Tensor, recipe: FP8Recipe, op: str, xq: FP8Act | None = None) -> torch.Tensor:
    """y = x W^T as an FP8 GEMM; x [..., K], w [N, K]; xq: x already cast by cast_input (shared)."""
    call = _Call(recipe, op, None, xq, "torch", None, _out_dtype(x))
    return _FP8GEMM.apply(x.reshape(-1, x.shape[-1]), w, call).view(*x.shape[:-1], w.shape[0])


def grouped(x: torch.Tensor, w: torch.Tensor, counts, recipe: FP8Recipe, op: str,
            xq: FP8Act | None = None, kernels: str = "torch", defer: list | None = None) -> torch.Tensor:
    """y_e = x_e @ w[e] as FP8 GEMMs over rows grouped by expert; x [M, K], w [E, K, N], counts [E]
    (a device tensor, or a list) summing to M. defer: queue the weight gradient there (accumulated
    into w.grad when run)."""
    call = _Call(recipe, op, _counts(counts, x.device), xq, kernels, defer, _out_dtype(x))
    return _FP8GEMM.apply(x, w, call)


def _gemm(phase: str, path: str, a: FP8Tensor, b: FP8Tensor, call: _Call) -> torch.Tensor:
    """fwd: a = x rows, b = W; dgrad: a = dy rows, b = W; wgrad: a = dy cols, b = x cols."""
    if path != "emulate":
        y = _cuda_gemm(phase, path, a, b, call)
        if y is not None:
            return y
    av, bv, c = a.deq(), b.deq(), call.counts
    if c is None:  # W [N, K]
        return {"fwd": lambda: av @ bv.t(), "dgrad": lambda: av @ bv, "wgrad": lambda: av.t() @ bv}[phase]()
    # grouped GEMMs from the device counts (torch._grouped_mm: fp32 on the CPU; on CUDA fp32 has no
    # kernel of its own and reads the counts on the host, one reason CUDA prefers the paths below)
    if phase == "wgrad":  # -> [E, K, N] = x_e^T dy_e
        return grouped_mm_wgrad(bv, av, c)
    return grouped_mm(av, bv if phase == "fwd" else bv.transpose(1, 2), c)


# ------------------------------------------------------------------ CUDA (sm_90): UNMEASURED
# Written against torch's documented layouts (row-major A, column-major B; scales as in torch's own
# scaled_mm samples) but never run here. Any failure falls back to the emulation, said once.


def _path(call: _Call, device: torch.device) -> str:
    if device.type != "cuda":
        return "emulate"
    path = "emulate"
    if call.counts is None and call.recipe.name == "tensorwise" and hasattr(torch, "_scaled_mm"):
        path = "scaled_mm"
    elif call.counts is None and call.recipe.name == "blockwise" and hasattr(F, "scaled_mm") \
            and hasattr(F, "ScalingType") and torch.cuda.get_device_capability(device)[0] == 9 \
            and tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2]) >= (12, 9):
        path = "scaled_mm_blockwise"
    elif call.counts is not None and call.recipe.name == "tensorwise":
        path = "triton" if call.kernels == "triton" else "grouped_bf16"
    if path == "emulate" or path in _FAILED:
        _note(f"{call.recipe.name} {'experts' if call.counts is not None else 'linear'} GEMMs are emulated on "
              f"{device} (no working FP8 tensor-core path for them in this torch/plan)")
        return "emulate"
    return path


def _grouped_bf16(phase: str, a: FP8Tensor, b: FP8Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """Tensorwise expert GEMMs on the e4m3 payloads through torch._grouped_mm's bf16 kernel (e4m3 is
    exact in bf16, products accumulate in fp32), the scales applied to the result: the FP8 operand
    values with no host read of the counts, at bf16 tensor-core speed (the output rounds to bf16
    once before scaling). Tensorwise scales factor out of a GEMM: per row of x or dy (fwd, dgrad),
    per expert for every wgrad operand (both are cast per expert). None where it cannot run."""
    from runtime.kernels.grouped_gemm import counts_to_ends, gmm, gmm_wgrad, grouped_mm_usable

    if a.q is None or b.q is None or a.kind != "row" or b.kind not in ("tensor", "row"):
        return None
    qa, qb = a.q.to(torch.bfloat16), b.q.to(torch.bfloat16)
    m = qa.shape[0]
    ends = counts_to_ends(counts)
    if phase == "wgrad":  # a = dy rows [M, N], b = x rows [M, K]: dW_e = s_x,e s_dy,e (qx_e^T qdy_e)
        if not grouped_mm_usable(qb, qa.new_empty(1, 1, qa.shape[1])):
            return None
        first = (ends - counts).clamp(max=max(m - 1, 0))  # an expert's first row (its scale is the expert's)
        s = (a.scale[first] * b.scale[first]) if m else a.scale.new_zeros(counts.numel())
        return gmm_wgrad(qb, qa, ends).float() * s[:, None, None]
    wb = qb if phase == "fwd" else qb.transpose(1, 2)  # W [E, K, N] (dgrad: its transpose, a view)
    if not grouped_mm_usable(qa, wb):
        return None
    seg = _segments(counts, m)
    return gmm(qa, wb, ends).float() * (a.scale * b.scale[seg])[:, None]


def _cuda_gemm(phase: str, path: str, a: FP8Tensor, b: FP8Tensor, call: _Call) -> torch.Tensor | None:
    try:
        if path == "grouped_bf16" or (path == "triton" and phase == "wgrad"):
            return _grouped_bf16(phase, a, b, call.counts)
        if path == "triton":
            if a.kind != "row":
                return None  # tile-scaled inputs: emulated
            from runtime.kernels import grouped_gemm_fp8

            wq = b.q if phase == "fwd" else b.q.transpose(1, 2)  # [E, K, N] viewed as needed
            ws = b.scale[:, None].expand(wq.shape[0], wq.shape[2]).contiguous()
            return grouped_gemm_fp8(a.q, a.scale, wq, ws, call.counts, torch.float32)
        if a.q is None or b.q is None:
            return None
        # (A [M, K] row-major, B [K, N] column-major) per phase; W is stored [N, K]
        if phase == "fwd":
            am, bm, bs = a.q, b.q.t(), b.scale
        elif phase == "dgrad":
            am, bm, bs = a.q, b.q.t().contiguous().t(), (b.scale if path == "scaled_mm" else b.scale.t())
        else:  # dW [N, K] = dy^T x
            am = a.q if a.transposed else a.q.t().contiguous()
            bm, bs = (b.q.t() if b.transposed else b.q.t().contiguous().t()), b.scale
        align = 16 if path == "scaled_mm" else BLOCK
        if any(d % align for d in (*am.shape, bm.shape[1])):
            _note(f"{path}: GEMMs with a dimension not a multiple of {align} are emulated")
            return None
        if path == "scaled_mm":
            return torch._scaled_mm(am, bm, scale_a=a.scale, scale_b=bs, out_dtype=torch.float32)
        st = F.ScalingType
        sa = a.scale.t().contiguous().t()  # [M, K/128], M-major
        if b.kind == "block":  # bs [N/128 (out), K/128 (contraction)] -> [K4, N/128] view of a padded copy
            k4 = -(-bs.shape[1] // 4) * 4
            sb, rb = F.pad(bs, (0, k4 - bs.shape[1])).contiguous().t(), st.BlockWise128x128
        else:
            sb, rb = bs.t().contiguous().t(), st.BlockWise1x128
        return F.scaled_mm(am, bm, sa, st.BlockWise1x128, sb, rb, output_dtype=torch.float32)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        _FAILED.add(path)
        _note(f"{path} failed ({type(exc).__name__}: {str(exc)[:160]}); emulating the FP8 GEMMs instead")
        return None
