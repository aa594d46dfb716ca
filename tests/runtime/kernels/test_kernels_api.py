import pytest
import torch
from kernel_helpers import TOL, rel_err

import runtime.kernels as K
from runtime.kernels import _backend


@pytest.mark.parametrize("seed", range(3))
def test_expert_ffn_triton_matches_torch_with_grads(seed):
    gen = torch.Generator().manual_seed(seed)
    e, h, f = 4, 24, 20
    counts = torch.randint(0, 12, (e,), generator=gen)
    counts[seed % e] = 0
    m = int(counts.sum())
    x = torch.randn(m, h, generator=gen).requires_grad_()
    wgu = (torch.randn(e, h, 2 * f, generator=gen) / h**0.5).requires_grad_()
    wd = (torch.randn(e, f, h, generator=gen) / f**0.5).requires_grad_()
    g = torch.randn(m, h, generator=gen)
    outs = {}
    for b in ("triton", "torch"):
        y = K.expert_ffn(x, counts, wgu, wd, b)
        outs[b] = (y.detach(), *torch.autograd.grad(y, (x, wgu, wd), g))
    for a, r in zip(outs["triton"], outs["torch"], strict=True):
        assert rel_err(a, r) <= TOL


def test_moe_layer_pipeline_matches_torch():
    """permute -> expert_ffn -> unpermute, the order the model calls them; grads to router probs too."""
    gen = torch.Generator().manual_seed(11)
    t, h, f, e, k = 10, 16, 12, 5, 2
    tokens = torch.randn(t, h, generator=gen).requires_grad_()
    logits = torch.randn(t, e - 1, generator=gen).requires_grad_()  # expert e-1 never picked
    wgu = torch.randn(e, h, 2 * f, generator=gen).requires_grad_()
    wd = torch.randn(e, f, h, generator=gen).requires_grad_()
    res = {}
    for b in ("triton", "torch"):
        probs, idx = torch.softmax(logits, -1).topk(k, dim=-1)
        xs, counts, rmap = K.permute(tokens, idx, e, b)
        out = K.unpermute(K.expert_ffn(xs, counts, wgu, wd, b), rmap, probs, b)
        res[b] = (out.detach(), *torch.autograd.grad(out.square().sum(), (tokens, logits, wgu, wd)))
    for a, r in zip(res["triton"], res["torch"], strict=True):
        assert rel_err(a, r) <= TOL


def test_auto_backend_uses_triton_under_interpreter():
    assert K.interpret_mode()
    assert K.resolve_backend("auto", torch.device("cpu")) == "triton"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        K.resolve_backend("cuda", torch.device("cpu"))


def test_triton_without_interpreter_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_backend, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.expert_ffn(torch.zeros(0, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, 2, 4),
                     torch.zeros(1, 2, 2), "triton")
    assert K.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_backend, "triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(RuntimeError, match="triton is not importable"):
        K.resolve_backend("triton", torch.device("cpu"))
    assert K.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_expert_ffn_rejects_mismatched_weights():
    with pytest.raises(ValueError, match="expert_ffn"):
        K.expert_ffn(torch.zeros(3, 4), torch.tensor([3]), torch.zeros(1, 4, 6), torch.zeros(1, 4, 4), "torch")
