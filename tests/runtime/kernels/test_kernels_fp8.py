import pytest
import torch
from kernel_helpers import rel_err

from runtime.kernels import FP8_DTYPE, FP8_MAX, dequantize_fp8, fp8_roundtrip, quantize_fp8

# e4m3: 3 mantissa bits -> round-to-nearest error <= 2^-4 relative for normals; below the
# smallest normal (2^-6 in scaled units) the spacing is 2^-9, so the error is <= 2^-10 absolute.
REL_BOUND = 2.0**-4
SUBNORMAL_ABS = 2.0**-10
MIN_NORMAL = 2.0**-6


def _inputs(seed: int, m: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # rows spanning 12 decades, plus an all-zero row and a row with one huge outlier
    x = torch.randn(m, n, generator=gen) * torch.logspace(-6, 6, m)[:, None]
    x[0] = 0.0
    if m > 2:
        x[1, 0] = 1e4
    return x


def _check_bound(x, deq, scale_per_elem):
    scaled = (x / scale_per_elem).abs()
    err = (deq - x).abs()
    normal = scaled >= MIN_NORMAL
    # 1e-6 slack: the scale itself is an fp32 quotient
    assert torch.all(err[normal] <= (REL_BOUND * (1 + 1e-6)) * x.abs()[normal])
    assert torch.all(err[~normal] <= SUBNORMAL_ABS * scale_per_elem[~normal] * (1 + 1e-6))


@pytest.mark.parametrize("block", [None, 128, 32])
@pytest.mark.parametrize("m,n", [(5, 300), (9, 128), (3, 7)])
def test_quantize_matches_reference_and_bound(block, m, n):
    x = _inputs(m * n, m, n)
    q, s = quantize_fp8(x, block, "triton")
    q_r, s_r = quantize_fp8(x, block, "torch")
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert s.shape == ((m,) if block is None else (m, -(-n // block)))
    assert torch.equal(q.view(torch.uint8), q_r.view(torch.uint8))
    assert rel_err(s, s_r) <= 1e-6
    deq = dequantize_fp8(q, s, block, torch.float32, "triton")
    assert torch.equal(deq, dequantize_fp8(q_r, s_r, block, torch.float32, "torch"))
    per_elem = s[:, None].expand(m, n) if block is None else s.repeat_interleave(block, 1)[:, :n]
    _check_bound(x, deq, per_elem)
    # the group maximum maps onto e4m3's largest normal exactly
    assert q.float().abs().amax() == FP8_MAX
    assert torch.all(deq[0] == 0)


def test_block_scales_track_local_magnitude():
    x = torch.ones(2, 256)
    x[:, 128:] *= 1000.0
    _, s = quantize_fp8(x, 128, "triton")
    assert torch.allclose(s[:, 1] / s[:, 0], torch.full((2,), 1000.0))


def test_roundtrip_straight_through_gradient():
    x = torch.randn(4, 64).requires_grad_()
    y = fp8_roundtrip(x, None, "triton")
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.ones_like(x))
    assert rel_err(y, x) <= REL_BOUND
