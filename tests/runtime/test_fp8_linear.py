"""runtime.fp8_linear against a plain torch reference: every operand quantized and dequantized by
loops over its scale groups (written here, independently of the module), then fp32 matmuls.

Forward y = x W^T (linear) / y_e = x_e W_e (experts), dgrad dx = dy W, wgrad dW = dy^T x: the
emulated FP8 GEMMs must multiply exactly the reference's values (fp32 rounding of the sums aside).
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from perfmodel.specs.opnames import split_event_name
from runtime import fp8_linear
from runtime.kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_fp8_blocks,
    dequantize_fp8_tensorwise,
    quantize_fp8_blocks,
    quantize_fp8_tensorwise,
    quantize_fp8_torch,
)
from runtime.moe import SwiGLU, fp8_expert_fn

B = 128
U = 2.0**-4  # e4m3 rounds to nearest with 3 mantissa bits: at most 2^-4 relative (normals)


def fake_quant(t: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """t rounded to e4m3 under scale amax / 448 (amax broadcast to t's shape)."""
    s = amax.clamp_min(1e-12) / FP8_MAX
    return (t / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s


def ref_tensor(t):
    return fake_quant(t, t.abs().max()) if t.numel() else t.clone()


def ref_tiles_rows(t):  # 1 x 128 tiles along the last dim
    out = torch.empty_like(t)
    for j in range(0, t.shape[1], B):
        blk = t[:, j:j + B]
        out[:, j:j + B] = fake_quant(blk, blk.abs().amax(1, keepdim=True))
    return out


def ref_blocks(w):  # 128 x 128 blocks of a matrix
    out = torch.empty_like(w)
    for i in range(0, w.shape[0], B):
        for j in range(0, w.shape[1], B):
            blk = w[i:i + B, j:j + B]
            out[i:i + B, j:j + B] = fake_quant(blk, blk.abs().max())
    return out


def ref_rows(t, recipe, counts=None):  # operand contracted over its last dim
    if recipe == "blockwise":
        return ref_tiles_rows(t)
    return torch.cat([ref_tensor(p) for p in t.split(counts)]) if counts else ref_tensor(t)


def ref_cols(t, recipe, counts=None):  # operand contracted over its rows (wgrad): 128 x 1 tiles per expert
    if recipe == "tensorwise":
        return ref_rows(t, recipe, counts)
    return torch.cat([ref_tiles_rows(p.t()).t() for p in t.split(counts or [t.shape[0]])])


def ref_weight(w, recipe):
    f = ref_blocks if recipe == "blockwise" else ref_tensor
    return torch.stack([f(m) for m in w]) if w.dim() == 3 else f(w)


def _data(m, k, n, experts=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows over 4 decades so per-row tiles and per-tensor scales round differently
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]
    shape = (experts, k, n) if experts else (n, k)
    w = torch.randn(*shape, generator=g) * 0.05
    dy = torch.randn(m, n, generator=g)
    return x, w, dy


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_linear_matches_reference_fwd_dgrad_wgrad(recipe):
    x, w, dy = _data(150, 200, 272)  # K and N not multiples of 128: partial tiles and blocks
    r = fp8_linear.FP8Recipe(recipe)
    xl, wl = x.clone().requires_grad_(), torch.nn.Parameter(w.clone())
    y = fp8_linear.linear(xl.view(3, 50, 200), wl, r, "attn.qkv").view(150, 272)
    y.backward(dy)
    qw = ref_weight(w, recipe)
    torch.testing.assert_close(y, ref_rows(x, recipe) @ qw.t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xl.grad, ref_rows(dy, recipe) @ qw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wl.grad, ref_cols(dy, recipe).t() @ ref_cols(x, recipe), rtol=1e-5, atol=1e-5)
    # and it is FP8: one GEMM's error is about one rounding, not zero
    err = ((y - x @ w.t()).norm() / (x @ w.t()).norm()).item()
    assert U / 16 < err < U


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_grouped_matches_reference_with_empty_experts_and_deferred_wgrad(recipe):
    counts = [70, 0, 131, 3]  # an empty expert; segments straddling 128-row tiles
    x, w, dy = _data(sum(counts), 160, 96, experts=4, seed=1)
    r = fp8_linear.FP8Recipe(recipe)
    xl, wl = x.clone().requires_grad_(), torch.nn.Parameter(w.clone())
    y = fp8_linear.grouped(xl, wl, counts, r, "moe.fc1")
    y.backward(dy)
    qw, qx, qd = ref_weight(w, recipe), ref_rows(x, recipe, counts), ref_rows(dy, recipe, counts)
    parts = list(zip(qx.split(counts), qd.split(counts), strict=True))
    torch.testing.assert_close(y, torch.cat([a @ qw[e] for e, (a, _) in enumerate(parts)]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xl.grad, torch.cat([d @ qw[e].t() for e, (_, d) in enumerate(parts)]),
                               rtol=1e-5, atol=1e-6)
    xc, dc = ref_cols(x, recipe, counts), ref_cols(dy, recipe, counts)
    want = torch.stack([a.t() @ d for a, d in zip(xc.split(counts), dc.split(counts), strict=True)])
    torch.testing.assert_close(wl.grad, want, rtol=1e-5, atol=1e-5)
    assert torch.all(wl.grad[1] == 0)
    # deferred (inter-op overlap): backward returns no weight gradient, the queue accumulates it
    queue: list = []
    x2, w2 = x.clone().requires_grad_(), torch.nn.Parameter(w.clone())
    fp8_linear.grouped(x2, w2, counts, r, "moe.fc1", defer=queue).backward(dy)
    assert w2.grad is None and len(queue) == 1
    queue.pop()()
    torch.testing.assert_close(w2.grad, wl.grad, rtol=0, atol=0)
    torch.testing.assert_close(x2.grad, xl.grad, rtol=0, atol=0)


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_pre_quantized_input_is_used_as_is(recipe):
    """fc1 fed the dispatch's (payload, scales): per token (tensorwise) or 1x128 tiles (blockwise)."""
    counts = [40, 25]
    x, w, dy = _data(65, 256, 64, experts=2, seed=2)
    r = fp8_linear.FP8Recipe(recipe)
    q, s = quantize_fp8_torch(x, r.wire_block)  # what the sender puts on the wire
    wire = q.float() * (s[:, None] if s.dim() == 1 else s.repeat_interleave(B, 1))
    before = dict(fp8_linear.CASTS)
    xq = fp8_linear.from_wire(q, s, r, "moe.fc1", counts)
    xl, wl = wire.clone().requires_grad_(), torch.nn.Parameter(w.clone())
    y = fp8_linear.grouped(xl, wl, counts, r, "moe.fc1", xq)
    y.backward(dy)
    casts = {k: v - before.get(k, 0) for k, v in fp8_linear.CASTS.items()}
    assert casts.get("moe.fc1:x", 0) == 0 and casts["moe.fc1:xT"] == 1  # only wgrad's transposed copy
    qw = ref_weight(w, recipe)
    torch.testing.assert_close(y, torch.cat([a @ qw[e] for e, a in enumerate(wire.split(counts))]),
                               rtol=1e-5, atol=1e-6)
    xc = ref_cols(wire, recipe, counts)
    want = torch.stack([a.t() @ d for a, d in zip(xc.split(counts), ref_cols(dy, recipe, counts).split(counts),
                                                   strict=True)])
    torch.testing.assert_close(wl.grad, want, rtol=1e-5, atol=1e-5)
    if recipe == "tensorwise":  # casting again (per expert, not per token) would have changed the values
        fresh = fp8_linear.grouped(wire, w, counts, r, "moe.fc1")
        assert not torch.equal(fresh, y)


def test_quantizers_match_loops_and_bound():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 200, 300, generator=g) * torch.logspace(-3, 3, 300)
    q, s = quantize_fp8_blocks(w)
    assert s.shape == (3, 2, 3) and q.dtype == FP8_DTYPE
    deq = dequantize_fp8_blocks(q, s)
    assert torch.equal(deq, torch.stack([ref_blocks(m) for m in w]))
    q, s = quantize_fp8_tensorwise(w, batch_dims=1)
    assert s.shape == (3,) and torch.equal(dequantize_fp8_tensorwise(q, s), torch.stack([ref_tensor(m) for m in w]))
    # normals (>= 2^-6 in scaled units) round within 2^-4; each block's max maps to 448 exactly
    q, s = quantize_fp8_blocks(w)
    per_elem = s.repeat_interleave(B, -2)[..., :200, :].repeat_interleave(B, -1)[..., :300]
    normal = w.abs() / per_elem >= 2.0**-6
    assert torch.all((deq - w).abs()[normal] <= U * w.abs()[normal] * (1 + 1e-6))
    assert q[0, :128, :128].float().abs().max() == FP8_MAX


def test_weights_are_cast_once_per_value():
    r = fp8_linear.FP8Recipe("tensorwise")
    w = torch.nn.Parameter(torch.randn(32, 16))
    x = torch.randn(4, 16)
    n0 = fp8_linear.CASTS["w"]
    y0 = fp8_linear.linear(x, w, r, "attn.proj")
    fp8_linear.linear(x, w, r, "attn.proj")  # a second micro-batch: the cached copy
    assert fp8_linear.CASTS["w"] == n0 + 1
    with torch.no_grad():
        w.mul_(2.0)  # the optimizer's in-place update moves the version counter
    torch.testing.assert_close(fp8_linear.linear(x, w, r, "attn.proj"), 2 * y0)
    assert fp8_linear.CASTS["w"] == n0 + 2


def test_casts_are_profiled_under_op_graph_names():
    r = fp8_linear.FP8Recipe("blockwise")
    ffn = SwiGLU("t.ffn", 64, 96, 2, 0, "fp8", "blockwise")
    x = torch.randn(2, 8, 64, requires_grad=True)
    w1, w3, w2 = (torch.nn.Parameter(torch.randn(2, *s) * 0.05) for s in ((64, 32), (64, 32), (32, 64)))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = ffn(x) + fp8_expert_fn(x.view(16, 64), torch.tensor([9, 7]), w1, w3, w2, r).view(2, 8, 64)
        y.sum().backward()
    names = {e.name for e in prof.events() if split_event_name(e.name)}
    assert {"ffn.fc1_quant/fwd", "ffn.fc2_quant/fwd", "ffn.fc1_quant/dgrad", "moe.fc1_quant/fwd",
            "moe.fc2_quant/fwd", "moe.fc1_quant/dgrad", "moe.fc2/wgrad", "optim.fp8_cast/fwd"} <= names


def test_grouped_bf16_path_multiplies_the_fp8_values():
    """The CUDA path of tensorwise experts (fp8_linear._grouped_bf16: e4m3 payloads through
    torch._grouped_mm's bf16 kernel, scales applied after) on the CPU, against the emulation: the
    same products up to the one bf16 rounding of the result (2^-8 relative)."""
    counts = torch.tensor([70, 0, 131, 3])
    x, w, dy = _data(int(counts.sum()), 160, 96, experts=4, seed=3)
    r = fp8_linear.FP8Recipe("tensorwise")
    xq = fp8_linear.cast_input(x, r, "moe.fc1", counts)
    wq = fp8_linear.fp8_weight(w, r)
    dyr = fp8_linear._cast_rows(dy, r, counts)
    for phase, a, b in (("fwd", xq.rows, wq), ("dgrad", dyr, wq), ("wgrad", dyr, xq.cols)):
        got = fp8_linear._grouped_bf16(phase, a, b, counts)
        call = fp8_linear._Call(r, "moe.fc1", counts, None, "torch", None, torch.float32)
        want = fp8_linear._gemm(phase, "emulate", a, b, call)
        assert got is not None and got.shape == want.shape, phase
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-5 * float(want.abs().max()))
    assert torch.all(fp8_linear._grouped_bf16("wgrad", dyr, xq.cols, counts)[1] == 0)
