"""precision: fp8 in the op graph, the hardware model, the memory model and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from perfmodel.sim import simulate
from perfmodel.sim.hardware import Hardware
from perfmodel.sim.memory import estimate_memory
from perfmodel.sim.opgraph import FP8_GEMMS, OpGraph
from perfmodel.specs import PlanSpec, SpecError, load_spec
from perfmodel.specs.opnames import OP_NAMES

ROOT = Path(__file__).resolve().parents[3]
MODEL = load_spec("mixtral-8x7b", "model")
CLUSTER = load_spec("h100-dgx-64", "cluster")


def _plan(**kw) -> PlanSpec:
    return PlanSpec(**{"ep": 8, "global_batch": 64, "recompute": "selective", **kw})


def test_linear_layers_run_fp8_and_16_bit_ops_stay_16_bit():
    g = OpGraph(MODEL, _plan(precision="fp8"), 64)
    ops = g.layers["moe"].ops
    for op in ops:
        if op.kind == "gemm":
            assert (op.dtype == "fp8") == (op.name in FP8_GEMMS), op.event  # router, head stay 16/32-bit
    assert all(op.dtype != "fp8" for op in g.head_ops)
    events = {op.event for op in ops}
    for name in ("attn.qkv", "attn.proj", "moe.fc1", "moe.fc2"):
        assert {f"{name}/fwd", f"{name}/dgrad", f"{name}/wgrad"} <= events
        assert {f"{name}_quant/fwd", f"{name}_quant/dgrad"} <= events  # input cast; output-gradient cast
        assert f"{name}_quant" in OP_NAMES
    assert g.fp8_weight_cast_ops(0) and OpGraph(MODEL, _plan(), 64).fp8_weight_cast_ops(0) == ()


def test_tensorwise_casts_read_twice_blockwise_once():
    tw = {op.event: op.bytes for op in OpGraph(MODEL, _plan(precision="fp8"), 64).layers["moe"].ops}
    bw = {op.event: op.bytes for op in
          OpGraph(MODEL, _plan(precision="fp8", fp8_recipe="blockwise"), 64).layers["moe"].ops}
    assert tw["attn.qkv_quant/fwd"] > bw["attn.qkv_quant/fwd"]  # the amax pass of current scaling


def test_fp8_dispatch_is_already_quantized_for_the_expert_gemm():
    plain = OpGraph(MODEL, _plan(compression={"dispatch": "fp8"}), 64).layers["moe"].ops
    fp8 = OpGraph(MODEL, _plan(precision="fp8", fp8_recipe="blockwise", compression={"dispatch": "fp8"}),
                  64).layers["moe"].ops
    names = {op.event for op in fp8}
    assert "moe.dispatch_dequant/fwd" in {op.event for op in plain}
    assert "moe.dispatch_dequant/fwd" not in names  # no dequantize, fc1 consumes the FP8 rows
    fc1_cast = next(op for op in fp8 if op.event == "moe.fc1_quant/fwd")
    fc2_cast = next(op for op in fp8 if op.event == "moe.fc2_quant/fwd")
    assert fc1_cast.bytes < fc2_cast.bytes  # only the transposed copy for wgrad is left to make


def test_fp8_gemm_priced_at_the_fp8_peak_through_its_own_curve():
    prof = CLUSTER.profile()
    hw = Hardware.of(prof)
    g16 = next(op for op in OpGraph(MODEL, _plan(ep=2), 64).layers["moe"].ops if op.event == "moe.fc1/fwd")
    g8 = next(op for op in OpGraph(MODEL, _plan(ep=2, precision="fp8"), 64).layers["moe"].ops
              if op.event == "moe.fc1/fwd")  # 4 local experts: a grouped GEMM
    assert hw.gemm_curve(g8) is prof.fp8_grouped_gemm_efficiency
    ratio = hw.compute_s(g16) / hw.compute_s(g8)
    assert 1.3 < ratio < 2.0  # fp8 peak 2x, at a lower fraction of it (H100 measurements)


def test_fp8_plan_is_faster_and_stores_less_activation_more_weight_copies():
    bf = simulate(MODEL, CLUSTER, _plan())
    f8 = simulate(MODEL, CLUSTER, _plan(precision="fp8"))
    assert f8.step_time_s < bf.step_time_s
    assert f8.breakdown["compute_s"] < bf.breakdown["compute_s"]
    prof = CLUSTER.profile()
    m16 = estimate_memory(MODEL, _plan(), 64, prof)
    m8 = estimate_memory(MODEL, _plan(precision="fp8"), 64, prof)
    assert m8.activations_GiB < m16.activations_GiB and m8.weights_GiB > m16.weights_GiB


def test_tiny_fp32_router_gemm_costs_a_latency_not_fifteen():
    """The 16-bit curve's half_work is a fixed per-GEMM cost at the 16-bit rate: a tiny fp32 GEMM
    (the router) must not pay it 15x over (peak fp32 / peak bf16)."""
    hw = Hardware.of(CLUSTER.profile())
    router = next(op for op in OpGraph(MODEL, _plan(), 64).layers["moe"].ops if op.event == "moe.router/fwd")
    fixed = hw.profile.gemm_efficiency.half_work / (hw.peak_bf16_flops() * hw.profile.gemm_efficiency.max)
    assert hw.compute_s(router) < 2 * fixed + hw.launch_s


def test_fp8_on_a_profile_without_fp8_peak_is_refused():
    cpu = load_spec("cpu-local-4", "cluster")
    tiny = load_spec("tiny-moe", "model")
    assert "fp8" not in cpu.profile().peak_tflops
    with pytest.raises(SpecError, match="plan.precision: fp8 needs an fp8 peak"):
        simulate(tiny, cpu, PlanSpec(precision="fp8", global_batch=8))


def test_cli_fp8_without_peak_one_line_exit_2(tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("kind: plan\nprecision: fp8\nglobal_batch: 8\n")
    r = subprocess.run([sys.executable, "-m", "perfmodel.cli", "simulate", "--model", "tiny-moe", "--cluster",
                        "cpu-local-4", "--plan", str(plan)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "plan.precision" in lines[0] and "Traceback" not in r.stderr
