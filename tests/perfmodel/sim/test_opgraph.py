"""The op graph against closed forms: 6*N*tokens FLOPs and hand-derived collective bytes."""

import pytest

from perfmodel.sim.opgraph import OpGraph
from perfmodel.specs import ModelSpec, PlanSpec
from perfmodel.specs.opnames import OP_NAMES

MIXTRAL = ModelSpec(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, vocab=32000, seq_len=4096,
                    moe=dict(experts=8, top_k=2, expert_ffn_hidden=14336))
DENSE = ModelSpec(layers=8, hidden=1024, heads=16, kv_heads=16, head_dim=64, vocab=1000, seq_len=512,
                  dense_ffn_hidden=4096)
MiB = 2**20


def _attn_flops(m: ModelSpec, seqs: int) -> float:
    # causal flash attention: QK^T and PV, half the square; backward 2.5x forward
    return m.layers * seqs * m.heads * 2 * m.seq_len**2 * (m.qk_head_dim + m.v_head_dim) * 0.5 * 3.5


# two-matrix FFNs (gated_ffn: false, e.g. squared ReLU): params and op FLOPs both drop the gate
NON_GATED = [m.model_copy(update={"gated_ffn": False}) for m in (MIXTRAL, DENSE)]


@pytest.mark.parametrize("model", [MIXTRAL, DENSE, *NON_GATED])
@pytest.mark.parametrize("plan", [dict(), dict(sp=8, ep=8), dict(tp=4, ep=2, pp=2), dict(tp=2, sp=2, ep=4, etp=2)])
def test_flops_match_6_n_tokens(model, plan):
    if model.moe is None:
        plan = {k: v for k, v in plan.items() if k not in ("ep", "etp")}
    p = PlanSpec(global_batch=64, **plan)
    g = OpGraph(model, p, 64)
    n_matmul = model.params_active - model.vocab * model.hidden  # input embedding does no FLOPs
    expect = 6 * n_matmul * g.tokens_per_iteration() + _attn_flops(model, p.global_batch)
    assert g.model_flops_per_iteration() == pytest.approx(expect, rel=0.02)


def test_every_op_is_named_and_deps_resolve():
    g = OpGraph(MIXTRAL, PlanSpec(tp=2, sp=2, ep=4, etp=2, global_batch=64, recompute="selective",
                                  compression=dict(dispatch="fp8", combine="fp8")), 64)
    for layer in g.layers.values():
        events = {op.event for op in layer.ops}
        assert len(events) == len(layer.ops)
        for op in layer.ops:
            assert op.name in OP_NAMES
            assert set(op.deps) <= events, op
        assert {op.phase for op in layer.ops} == {"fwd", "dgrad", "wgrad", "recompute"}


def _comm(g, event):
    return next(op for op in g.layers["moe"].ops if op.event == event)


def test_collective_bytes_sp8_ep8():
    # b=1, s=4096, sp=8: 512 tokens per rank; qkv = 32 q heads + 8 kv heads x2 (x128 dims), bf16
    g = OpGraph(MIXTRAL, PlanSpec(sp=8, ep=8, global_batch=64), 64)
    assert _comm(g, "attn.sp_a2a_in/fwd").bytes_per_rank == 512 * (4096 + 2 * 1024) * 2 * 7 / 8
    assert _comm(g, "attn.sp_a2a_out/fwd").bytes_per_rank == 512 * 4096 * 2 * 7 / 8
    # dispatch: 512 tokens x top-2, hidden 4096, bf16; 7/8 leave the rank
    assert _comm(g, "moe.dispatch_a2a/fwd").bytes_per_rank == 512 * 2 * 4096 * 2 * 7 / 8
    assert _comm(g, "moe.dispatch_a2a/fwd").bytes_per_rank / MiB == 7.0


@pytest.mark.parametrize("overlap,chunks", [(dict(), 1), (dict(intra_op="chunk", chunks=4), 4)])
def test_token_counts_exchanged_once_per_micro_batch_forward_only(overlap, chunks):
    g = OpGraph(MIXTRAL, PlanSpec(sp=8, ep=8, global_batch=64, overlap=overlap), 64)
    counts = [op for op in g.layers["moe"].ops if op.name == "moe.dispatch_counts"]
    assert [op.phase for op in counts] == ["fwd"]  # backward reuses the forward's counts
    # [ep, chunks, experts/ep] int64 per rank; 7/8 leave it
    assert counts[0].bytes_per_rank == 8 * chunks * 1 * 8 * 7 / 8
    assert _comm(g, "moe.dispatch_a2a/fwd").deps == ("moe.dispatch_counts/fwd",)
    dense = OpGraph(MIXTRAL, PlanSpec(sp=8, global_batch=64), 64)
    assert not any(op.name == "moe.dispatch_counts" for op in dense.layers["moe"].ops)


def test_collective_bytes_tp4_ep2_fp8():
    # tp=4: attention all-gathers the full sequence (4096 x 4096 bf16 = 32 MiB), sends 3/4 of it
    p = PlanSpec(tp=4, ep=2, pp=2, global_batch=64, compression=dict(dispatch="fp8"))
    g = OpGraph(MIXTRAL, p, 64)
    assert _comm(g, "attn.tp_ag/fwd").bytes_per_rank == 4096 * 4096 * 2 * 3 / 4
    assert _comm(g, "attn.tp_rs/fwd").bytes_per_rank == 4096 * 4096 * 2 * 3 / 4
    # 1024 local tokens x top-2, fp8 payload (1 B) + a 4 B scale per token; half leaves the rank
    assert _comm(g, "moe.dispatch_a2a/fwd").bytes_per_rank == 1024 * 2 * (4096 + 4) / 2
    # backward moves gradients in bf16
    assert _comm(g, "moe.dispatch_a2a/dgrad").bytes_per_rank == 1024 * 2 * 4096 * 2 / 2
    assert g.pp_bytes == 1024 * 4096 * 2


def test_grad_sync_bytes_dp_and_edp():
    # 64 ranks, sp=8 ep=8: attention params replicated over dp*sp=64, experts over edp=8
    p = PlanSpec(sp=8, ep=8, global_batch=64, distributed_optimizer=False, compression=dict(grad_sync="bf16"))
    g = OpGraph(MIXTRAL, p, 64)
    ops = {op.group: op for op in g.grad_sync_ops(0)}
    params = g.stage_params(0)
    assert ops["dp_sp"].group_size == 64 and ops["edp"].group_size == 8
    assert ops["edp"].bytes_per_rank == pytest.approx(params["edp"] * 2 * 2 * 7 / 8)
    assert params["edp"] == MIXTRAL.layers * MIXTRAL.expert_params  # one of 8 experts per rank
