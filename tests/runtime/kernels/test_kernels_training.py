"""plan.kernels: triton (permute/unpermute, grouped GEMM + SwiGLU, and the deferred-wgrad expert
GEMMs of inter-op overlap) trains like kernels: torch: fp32, TRITON_INTERPRET=1, one process."""

import pytest
import torch

from perfmodel.specs import ModelSpec, MoESpec, PlanSpec
from runtime.groups import Parallel
from runtime.train import TrainConfig, train

MODEL = dict(name="kern-moe", layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16, vocab=256, seq_len=16,
             moe=dict(experts=4, top_k=2, expert_ffn_hidden=32, shared_experts=1))


def _losses(kernels: str, overlap: dict, steps: int = 2, **fields) -> list[float]:
    model = ModelSpec(**{**MODEL, "moe": MoESpec(**MODEL["moe"])})
    plan = PlanSpec(global_batch=2, micro_batch=2, kernels=kernels, overlap=overlap, **fields)
    recs = train(TrainConfig(model=model, plan=plan, steps=steps, warmup=1, quiet=True), Parallel.single(),
                 torch.device("cpu"))
    return [r["loss"] for r in recs]


@pytest.mark.parametrize("overlap", [{}, {"inter_op": True, "intra_op": "chunk", "chunks": 2}])
def test_triton_kernels_train_like_torch(overlap):
    ref, got = _losses("torch", overlap), _losses("triton", overlap)
    assert got == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_fp8_precision_applies_under_triton_kernels(recipe):
    """precision fp8: the triton expert path runs the same FP8 expert GEMMs (runtime.fp8_linear) as torch."""
    ref, got = (_losses(k, {}, precision="fp8", fp8_recipe=recipe) for k in ("torch", "triton"))
    assert got == pytest.approx(ref, rel=1e-6)
    assert got != pytest.approx(_losses("triton", {}), rel=1e-6)  # and it is FP8, not the 16-bit path
