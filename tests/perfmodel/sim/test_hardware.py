import pytest

from perfmodel.sim.hardware import Hardware
from perfmodel.sim.opgraph import Op, gemm, mem
from perfmodel.specs import load_spec


def test_gemm_memory_and_fp8_times():
    p = load_spec("h100-sxm", "profile")
    hw = Hardware.of(p)
    g = gemm("moe.fc1", 4096, 8192, 8192)
    eff = p.gemm_efficiency.at(g.flops)
    assert hw.compute_s(g) == pytest.approx(g.flops / (989e12 * eff) + 4e-6)
    g8 = gemm("moe.fc1", 4096, 8192, 8192, dtype="fp8")
    assert hw.compute_s(g8) < hw.compute_s(g)
    m = mem("moe.act", 1e9)
    assert hw.compute_s(m) == pytest.approx(1e9 / (3350e9 * p.memory_efficiency.at(1e9)) + 4e-6)
    grouped = gemm("moe.fc1", 4096, 8192, 8192, groups=4)
    assert hw.compute_s(grouped) > hw.compute_s(g)  # grouped curve is lower
    tiny = gemm("moe.router", 8, 8, 8)
    assert hw.compute_s(tiny) >= hw.compute_s(tiny, 1.0, launch_s=0) + 4e-6 - 1e-12


def test_efficiency_work_and_attention():
    hw = Hardware.of(load_spec("h100-sxm", "profile"))
    g = gemm("moe.fc1", 4096, 8192, 8192)
    # a quarter slice at the efficiency of the whole GEMM costs a quarter (less launch)
    q = hw.compute_s(g, 0.25, efficiency_work=g.flops, launch_s=0)
    assert q == pytest.approx((hw.compute_s(g) - 4e-6) / 4)
    assert hw.compute_s(g, 0.25, launch_s=0) > q  # a chunk runs at its own (lower) efficiency
    att = Op("attn.core", "fwd", "attention", flops=1e12, bytes=1e6)
    assert hw.compute_s(att) > 1e12 / 989e12


def test_host_time_floors_each_op_not_adds_to_it():
    """host_us_per_op: a GPU runs ahead of its host, so an op lasts max(device, host), not the sum."""
    p = load_spec("h100-sxm", "profile").model_copy(update={"host_us_per_op": 500.0})
    hw, plain = Hardware.of(p), Hardware.of(load_spec("h100-sxm", "profile"))
    tiny, big = mem("moe.act", 1e3), gemm("moe.fc1", 16384, 8192, 8192)
    assert hw.compute_s(tiny) == pytest.approx(500e-6)
    assert hw.compute_s(big) == pytest.approx(plain.compute_s(big))  # device-bound: unchanged
    assert hw.compute_s(tiny, host=False) == pytest.approx(plain.compute_s(tiny))  # a later tile of one kernel
