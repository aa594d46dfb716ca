import pytest
import torch
from kernel_helpers import TOL, rel_err

from runtime.kernels import permute, routing_map, swiglu, unpermute
from runtime.kernels.permute import permute_torch, unpermute_torch
from runtime.kernels.swiglu import swiglu_torch


@pytest.mark.parametrize("m,f", [(1, 1), (7, 33), (19, 64), (0, 5)])
def test_swiglu_matches_reference(m, f):
    gen = torch.Generator().manual_seed(m * 100 + f)
    x = (3 * torch.randn(m, 2 * f, generator=gen)).requires_grad_()
    dy = torch.randn(m, f, generator=gen)
    y = swiglu(x, "triton")
    (dx,) = torch.autograd.grad(y, x, dy) if m else (torch.zeros_like(x),)
    y_ref = swiglu_torch(x)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy) if m else (torch.zeros_like(x),)
    assert y.shape == (m, f)
    assert rel_err(y, y_ref) <= TOL and rel_err(dx, dx_ref) <= TOL




@pytest.mark.parametrize("t,h,e,k", [(1, 8, 2, 1), (11, 40, 5, 2), (16, 33, 8, 3), (9, 17, 4, 4)])
def test_permute_unpermute_match_reference(t, h, e, k):
    gen = torch.Generator().manual_seed(t * h + e * k)
    # top-k picks are distinct per token; expert e-1 is forced empty where k < e allows it
    pool = e - 1 if k < e else e
    idx = torch.stack([torch.randperm(pool, generator=gen)[:k] for _ in range(t)])
    tokens = torch.randn(t, h, generator=gen).requires_grad_()
    probs = torch.rand(t, k, generator=gen).requires_grad_()
    g = torch.randn(t, h, generator=gen)

    def run(backend):
        xs, counts, rmap = permute(tokens, idx, e, backend)
        y = xs * 1.5 + xs.detach() ** 2  # something non-trivial between the two, differentiable in xs
        out = unpermute(y, rmap, probs, backend)
        grads = torch.autograd.grad(out, (tokens, probs), g)
        return xs.detach(), counts, rmap, out.detach(), grads

    xs, counts, rmap, out, (dt, dp) = run("triton")
    xs_r, counts_r, rmap_r, out_r, (dt_r, dp_r) = run("torch")
    assert torch.equal(counts, counts_r) and torch.equal(rmap, rmap_r)
    assert counts.sum() == t * k and (k == e or counts[-1] == 0)
    assert torch.equal(xs, xs_r)
    for a, b in [(out, out_r), (dt, dt_r), (dp, dp_r)]:
        assert rel_err(a, b) <= TOL


def test_routing_map_is_stable_sort_by_expert():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    src, counts, rmap = routing_map(idx, 4)
    assert counts.tolist() == [2, 2, 2, 0]
    assert src.tolist() == [0, 1, 1, 2, 0, 2]  # expert 0: tokens 0,1; expert 1: 1,2; expert 2: 0,2
    flat = idx.reshape(-1)
    assert torch.equal(flat[rmap.reshape(-1)].sort().values, flat.sort().values)
    for t in range(3):
        for j in range(2):
            assert src[rmap[t, j]] == t


def test_unpermute_grad_wrt_probs_and_rows_vs_autograd():
    gen = torch.Generator().manual_seed(5)
    t, h, k, e = 6, 20, 2, 3
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    _, _, rmap = routing_map(idx, e)
    y = torch.randn(t * k, h, generator=gen).requires_grad_()
    probs = torch.rand(t, k, generator=gen).requires_grad_()
    g = torch.randn(t, h, generator=gen)
    dy, dp = torch.autograd.grad(unpermute(y, rmap, probs, "triton"), (y, probs), g)
    dy_r, dp_r = torch.autograd.grad(unpermute_torch(y, rmap, probs), (y, probs), g)
    assert rel_err(dy, dy_r) <= TOL and rel_err(dp, dp_r) <= TOL


def test_permute_reference_is_gather():
    tokens = torch.arange(6.0).view(3, 2)
    xs, counts, _ = permute_torch(tokens, torch.tensor([[1], [0], [1]]), 2)
    assert xs.tolist() == [[2.0, 3.0], [0.0, 1.0], [4.0, 5.0]] and counts.tolist() == [1, 2]
