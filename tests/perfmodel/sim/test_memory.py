"""perfmodel.sim.memory against numbers worked out by hand (bytes), plus sanity on real presets."""

from __future__ import annotations

import pytest

from perfmodel.sim.memory import GiB, estimate_memory, estimate_stages, stage_layers
from perfmodel.specs import ModelSpec, PlanSpec, SpecError, load_spec

# 2 MoE layers, h=64, 4 heads x 16 (MHA), vocab 100, seq 32, 4 experts top-2 of width 128.
SMALL = dict(layers=2, hidden=64, heads=4, kv_heads=4, head_dim=16, vocab=100, seq_len=32,
             moe=dict(experts=4, top_k=2, expert_ffn_hidden=128))
# per layer: attn 64*(64+128) + 64*64 + norm 64 = 16448; ffn norm 64; router 256;
# experts 4 * 3*64*128 = 98304
ATTN, NORM, ROUTER, EXPERT = 16448, 64, 256, 3 * 64 * 128
EMB = 100 * 64


def profile(cap_GiB: float = 80.0):
    return load_spec("h100-sxm", "profile").model_copy(update={"memory_GiB": cap_GiB})


def model(**over) -> ModelSpec:
    return ModelSpec(**{**SMALL, **over})


def test_small_model_param_count_by_hand():
    assert model().params_total == 2 * (ATTN + NORM + ROUTER + 4 * EXPERT) + 2 * EMB + NORM == 243008


def test_single_rank_no_recompute():
    e = estimate_memory(model(), PlanSpec(global_batch=1), 1, profile())
    params = 243008
    assert e.weights_GiB * GiB == pytest.approx(2 * params)
    assert e.grads_GiB * GiB == pytest.approx(4 * params)
    assert e.optimizer_GiB * GiB == pytest.approx(12 * params)
    # per layer, n=32 tokens, h=64: attention 2*32*(norm in, norm out, q, k, v, o = 6*64) + fp32
    # softmax stats 4*32*4 = 25088; ffn norm in/out 2*32*128 = 8192; router 4*32*4 = 512;
    # experts on 64 tokens: 2*64*(64 + 2*128 + 128) = 57344; expert outputs 2*32*2*64 = 8192
    per_layer = 25088 + 8192 + 512 + 57344 + 8192
    logits = 6 * 32 * 100
    assert e.activations_GiB * GiB == pytest.approx(2 * per_layer + logits)
    assert e.buffers_GiB == 0
    assert e.total_GiB == pytest.approx((18 * params + 2 * per_layer + logits) / GiB)
    assert e.fits and e.short_GiB == 0 and e.stage == 0


def test_sp_ep_pp_selective_fp8_bf16_grads():
    plan = PlanSpec(sp=2, ep=4, pp=2, global_batch=4, recompute="selective",
                    compression=dict(dispatch="fp8", grad_sync="bf16"))
    stages = estimate_stages(model(), plan, 8, profile())
    # dp = 8/(2*2) = 2, edp = dp*sp/ep = 1, microbatches = 4/2 = 2; one MoE layer per stage
    dense0 = ATTN + NORM + ROUTER + EMB  # + embedding on the first stage
    dense1 = ATTN + NORM + ROUTER + NORM + EMB  # + final norm and output layer on the last
    expert = 1 * EXPERT  # 4 experts / ep 4
    # activations, n = 32/2 = 16 tokens; selective drops norm outputs and the SwiGLU output
    per_layer = (2 * 16 * (64 + 4 * 64) + 4 * 16 * 4) + 2 * 16 * 64 + 4 * 16 * 4 \
        + 2 * 32 * (64 + 256) + 2 * 16 * 2 * 64
    assert per_layer == 37376
    # buffers: SP a2a 2*2*16*192 = 12288 < EP a2a (fp8 1+4/128 + bf16 2) * (32+32 tokens) * 64
    buf = (1 + 4 / 128 + 2) * 64 * 64
    expect = [
        (dense0, 2 * per_layer),  # 1F1B: stage 0 holds min(pp, microbatches) = 2 in flight
        (dense1, per_layer + 6 * 16 * 100),  # last stage: one microbatch + logits
    ]
    for e, (dense, act) in zip(stages, expect, strict=True):
        assert e.weights_GiB * GiB == pytest.approx(2 * (dense + expert))
        assert e.grads_GiB * GiB == pytest.approx(2 * (dense + expert))  # bf16 grad sync
        assert e.optimizer_GiB * GiB == pytest.approx(12 * (dense / 4 + expert / 1))
        assert e.activations_GiB * GiB == pytest.approx(act)
        assert e.buffers_GiB * GiB == pytest.approx(buf)
    assert stages[0].total_GiB * GiB == pytest.approx(642560)
    worst = estimate_memory(model(), plan, 8, profile())
    assert worst == stages[0]


def test_full_recompute_interleaved():
    m = model(layers=4)
    plan = PlanSpec(pp=2, vpp=2, schedule="interleaved", global_batch=4, recompute="full")
    assert stage_layers(m, plan, 0) == (2, 0)  # chunks 0 and 2
    e = estimate_stages(m, plan, 2, profile())[0]
    # layer inputs only: 2*32*64 per layer, 2 layers, in flight min(2,4)*(1+1/(2*2)) = 2.5,
    # plus one layer's full working set while it is recomputed (99328, as above)
    assert e.activations_GiB * GiB == pytest.approx(2 * 4096 * 2.5 + 99328)


def test_without_distributed_optimizer_state_is_replicated():
    plan = PlanSpec(ep=2, global_batch=2, distributed_optimizer=False)
    e = estimate_memory(model(), plan, 2, profile())
    local = 2 * (ATTN + NORM + ROUTER) + 2 * EMB + NORM + 2 * 2 * EXPERT
    assert e.optimizer_GiB * GiB == pytest.approx(12 * local)
    on = estimate_memory(model(), plan.model_copy(update={"distributed_optimizer": True}), 2, profile())
    assert on.optimizer_GiB * GiB == pytest.approx(12 * ((local - 4 * EXPERT) / 2 + 4 * EXPERT / 1))


def test_skew_and_dense_layers_and_gqa():
    m = model(layers=3, kv_heads=2, dense_ffn_hidden=96,
              moe=dict(experts=4, top_k=2, expert_ffn_hidden=128, first_dense_layers=1, routing_skew=2.0))
    assert stage_layers(m, PlanSpec(), 0) == (2, 1)
    skewed = estimate_memory(m, PlanSpec(global_batch=1), 1, profile())
    flat = estimate_memory(m.model_copy(update={"moe": m.moe.model_copy(update={"routing_skew": 1.0})}),
                           PlanSpec(global_batch=1), 1, profile())
    # the skew doubles the routed-expert tensors only: 2 MoE layers x 2*64*(64+384)
    assert (skewed.activations_GiB - flat.activations_GiB) * GiB == pytest.approx(2 * 2 * 64 * 448)


def test_does_not_fit_reports_shortfall():
    e = estimate_memory(model(), PlanSpec(global_batch=1), 1, profile(cap_GiB=1e-4))
    assert not e.fits
    assert e.short_GiB == pytest.approx(e.total_GiB - 1e-4)


def test_presets_plausible():
    m = load_spec("megascale-moe-352b", "model")
    h800 = load_spec("h800", "profile")
    good = PlanSpec(sp=8, ep=8, pp=6, global_batch=1440, recompute="selective")
    e = estimate_memory(m, good, 1440, h800)
    assert e.fits and 30 < e.total_GiB < 74.5
    # the whole 352B model on one 8-GPU node cannot fit: ~350B params * 18 bytes / 8 GPUs
    bad = estimate_memory(m, PlanSpec(ep=8, global_batch=8), 8, h800)
    assert not bad.fits and bad.short_GiB > 500
    mix = load_spec("mixtral-8x7b", "model")
    h100 = load_spec("h100-sxm", "profile")
    # ~36 GiB of activations at seq 4096 without recompute: does not fit; selective does
    assert not estimate_memory(mix, PlanSpec(ep=8, global_batch=64), 64, h100).fits
    assert estimate_memory(mix, PlanSpec(ep=8, global_batch=64, recompute="selective"), 64, h100).fits


def test_recompute_modes_are_ordered():
    m = load_spec("mixtral-8x7b", "model")
    acts = [estimate_memory(m, PlanSpec(ep=8, global_batch=8, recompute=r), 8, profile()).activations_GiB
            for r in ("none", "selective", "full")]
    assert acts[0] > acts[1] > acts[2] > 0


def test_impossible_plan_is_a_spec_error():
    with pytest.raises(SpecError, match="plan.ep: 3 does not divide model.moe.experts=4"):
        estimate_memory(model(), PlanSpec(ep=3, global_batch=3), 3, profile())
