import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import TOL, random_counts, rel_err

from runtime.kernels import counts_to_offsets, grouped_gemm, grouped_gemm_torch
from runtime.kernels.grouped_gemm import grouped_gemm_fp8_triton


def _check(counts: torch.Tensor, k: int, n: int, seed: int, w_transposed: bool = False) -> None:
    gen = torch.Generator().manual_seed(seed)
    e, m = counts.numel(), int(counts.sum())
    x = torch.randn(m, k, generator=gen).requires_grad_()
    if w_transposed:  # stored [E, N, K] and viewed [E, K, N]: the K-major layout FP8 prefers
        w = torch.randn(e, n, k, generator=gen).transpose(1, 2).requires_grad_()
    else:
        w = torch.randn(e, k, n, generator=gen).requires_grad_()
    dy = torch.randn(m, n, generator=gen)
    y = grouped_gemm(x, w, counts, "triton")
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y_ref = grouped_gemm_torch(x, w, counts)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    assert y.shape == (m, n)
    assert rel_err(y, y_ref) <= TOL
    assert rel_err(dx, dx_ref) <= TOL
    assert rel_err(dw, dw_ref) <= TOL
    # Experts with no rows must get an exactly zero weight gradient, not stale memory.
    assert torch.all(dw[counts == 0] == 0)


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_random_shapes(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    e = int(torch.randint(1, 7, (1,), generator=gen))
    k = int(torch.randint(1, 80, (1,), generator=gen))
    n = int(torch.randint(1, 80, (1,), generator=gen))
    _check(random_counts(gen, e, 40), k, n, seed)


@settings(max_examples=8, deadline=None)
@given(counts=st.lists(st.integers(0, 35), min_size=1, max_size=5),
       k=st.integers(1, 70), n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_matches_reference_hypothesis(counts, k, n, seed):
    _check(torch.tensor(counts), k, n, seed)


def test_transposed_weight_layout():
    _check(torch.tensor([17, 0, 33]), 40, 24, 7, w_transposed=True)


def test_all_experts_empty():
    _check(torch.tensor([0, 0, 0]), 16, 8, 1)


def test_offsets_are_exclusive_prefix_sum():
    assert counts_to_offsets(torch.tensor([3, 0, 2])).tolist() == [0, 3, 3, 5]


def test_scaled_epilogue_matches_reference():
    # The FP8 kernel path = plain product times per-row and per-(expert, column) scales; the
    # interpreter cannot multiply e4m3 so the epilogue is checked with fp32 operands.
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([9, 0, 21, 4])
    m, k, n = int(counts.sum()), 48, 40
    x, w = torch.randn(m, k, generator=gen), torch.randn(4, k, n, generator=gen)
    sx, sw = torch.rand(m, generator=gen) + 0.5, torch.rand(4, n, generator=gen) + 0.5
    y = grouped_gemm_fp8_triton(x, sx, w, sw, counts, out_dtype=torch.float32)
    rows_expert = torch.repeat_interleave(torch.arange(4), counts)
    y_ref = grouped_gemm_torch(x, w, counts) * sx[:, None] * sw[rows_expert]
    assert rel_err(y, y_ref) <= TOL


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="grouped_gemm"):
        grouped_gemm(torch.zeros(4, 3), torch.zeros(2, 5, 6), torch.tensor([2, 2]), "triton")


def test_dtype_mismatch_is_clear():
    with pytest.raises(ValueError, match="float64"):
        grouped_gemm(torch.zeros(2, 3), torch.zeros(1, 3, 4, dtype=torch.float64), torch.tensor([2]), "triton")


@pytest.mark.parametrize("max_rows,k,n,e", [(37, 128, 48, 3), (60, 256, 64, 4), (5, 128, 32, 6), (0, 128, 16, 2)])
def test_tma_forward_and_dgrad_match_reference(max_rows, k, n, e):
    """The Hopper TMA-load kernel (forced on; the interpreter runs it): tiles that read past their
    expert's rows into the next expert's compute rows they never store."""
    from runtime.kernels.grouped_gemm import grouped_gemm_dgrad_triton, grouped_gemm_fwd_triton

    gen = torch.Generator().manual_seed(max_rows + k)
    counts = random_counts(gen, e, max_rows)
    m, off = int(counts.sum()), counts_to_offsets(counts)
    x, w = torch.randn(m, k, generator=gen), torch.randn(e, k, n, generator=gen)
    dy, wt = torch.randn(m, k, generator=gen), torch.randn(e, n, k, generator=gen)  # dgrad: W [E, N, K]
    y = grouped_gemm_fwd_triton(x, w, off, tma=True)
    dx = grouped_gemm_dgrad_triton(dy, wt, off, tma=True)
    assert y.shape == (m, n) and dx.shape == (m, n)
    if m:
        assert rel_err(y, grouped_gemm_torch(x, w, counts)) <= TOL
        assert rel_err(dx, grouped_gemm_torch(dy, wt.transpose(1, 2), counts)) <= TOL


def test_tma_refuses_layouts_it_cannot_read():
    from runtime.kernels.grouped_gemm import grouped_gemm_fwd_triton

    x, w = torch.randn(8, 96), torch.randn(2, 96, 16)  # K = 96: not a multiple of 128
    with pytest.raises(RuntimeError, match="TMA"):
        grouped_gemm_fwd_triton(x, w, counts_to_offsets(torch.tensor([3, 5])), tma=True)
