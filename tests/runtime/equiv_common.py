"""Shared by the equivalence test and its torchrun worker: the model and plans compared."""

from perfmodel.specs import ModelSpec, MoESpec

# tiny-moe's structure (GQA 4:2, 8 experts top-2, one shared expert) at a length that keeps
# 6 plans x 4 ranks on 2 cores fast
MODEL = dict(name="equiv-moe", layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, vocab=256, seq_len=32,
             moe=dict(experts=8, top_k=2, expert_ffn_hidden=64, shared_experts=1))

PLANS = {
    "dp4": dict(),
    "ep4": dict(ep=4),
    "sp2_ep2": dict(sp=2, ep=2),
    "dp2_ep2": dict(ep=2),
    "tp2_dp2": dict(tp=2),
    "pp2_dp2": dict(pp=2),
    # beyond the list: interleaved pipeline, kv heads replicated over tp=4, full recompute
    "pp2_vpp2": dict(pp=2, vpp=2, schedule="interleaved"),
    "tp4_ep2": dict(tp=4, ep=2),
    "sp2_ep2_recompute": dict(sp=2, ep=2, recompute="full"),
    # overlap (runtime/overlap.py) must not change the gradients: async a2a + halves + deferred wgrad,
    # token chunks, both together under sequence parallelism and full recomputation
    "ep4_inter_op": dict(ep=4, overlap=dict(inter_op=True)),
    "ep4_chunk3": dict(ep=4, overlap=dict(intra_op="chunk", chunks=3)),
    "sp2_ep2_inter_chunk_recompute": dict(sp=2, ep=2, recompute="full",
                                          overlap=dict(inter_op=True, intra_op="chunk", chunks=2)),
}
GLOBAL_BATCH, MICRO_BATCH = 8, 1


def tiny_model() -> ModelSpec:
    return ModelSpec(**{**MODEL, "moe": MoESpec(**MODEL["moe"])})


def plan_fields(name: str) -> dict:
    return {"name": name, "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH, **PLANS[name]}
