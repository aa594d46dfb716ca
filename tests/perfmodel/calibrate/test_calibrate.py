"""Calibration fits on synthetic samples recover the profile that generated them."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import calibration_samples

from perfmodel.calibrate import fit_profile, linfit, plot_fits, profile_yaml
from perfmodel.calibrate.data import Sample
from perfmodel.cli import main as cli
from perfmodel.sim.collectives import latency_steps, straggler_wait_s
from perfmodel.sim.opgraph import Op
from perfmodel.specs import load_spec, parse_spec
from perfmodel.specs.yamlsafe import loads as load_text


def test_linfit_recovers_line_and_clamps():
    w = np.array([1e3, 1e4, 1e5, 1e6])
    a, b = linfit(w, 5e-6 + w * 2e-9)
    assert a == pytest.approx(5e-6, rel=1e-6) and b == pytest.approx(2e-9, rel=1e-6)
    a, b = linfit(w, np.full(4, 1e-3))  # flat: all latency
    assert b <= 1e-20 and a == pytest.approx(1e-3)
    a, b = linfit(np.array([10.0, 10.0]), np.array([2.0, 2.0]))  # one size: all rate
    assert a == 0 and b == pytest.approx(0.2)


def test_fit_profile_recovers_the_generating_profile(tmp_path):
    base = load_spec("cpu", "profile")
    d = base.model_dump()
    d.update(gemm_efficiency={"max": 0.5, "half_work": 2e6}, memory_efficiency={"max": 0.6, "half_work": 0.0},
             launch_overhead_us=30.0)
    truth = parse_spec(d, "profile", "truth")
    prof, fits = fit_profile(calibration_samples(truth, base), base, ["runA"], link_bw_GBps=5.0)
    assert prof.launch_overhead_us == pytest.approx(30.0, rel=1e-3)
    assert prof.memory_efficiency.max == pytest.approx(0.6, rel=1e-3)
    assert prof.gemm_efficiency.max == pytest.approx(0.5, rel=1e-3)
    assert prof.gemm_efficiency.half_work == pytest.approx(2e6, rel=1e-2)
    a2a = prof.collectives["all_to_all.ep"]  # latency per step: 3 peer exchanges in a group of 4
    assert a2a.latency_us * latency_steps("all_to_all", 4) == pytest.approx(40.0, rel=1e-3)
    assert a2a.bw_GBps == pytest.approx(2.0, rel=1e-3)
    assert prof.fabrics["loopback"].efficiency == pytest.approx(0.4, rel=1e-3)
    assert prof.calibrated_from == ["runA"] and prof.residuals["gemm.bf16.rms_rel_err"] < 1e-6
    # the YAML round-trips through the profile schema; one PNG per fit
    again = parse_spec(load_text(profile_yaml(prof), "p.yaml"), "profile", "p.yaml")
    assert again == prof
    pngs = plot_fits(fits, tmp_path, "cal")
    assert len(pngs) == len(fits) and all(p.stat().st_size > 1000 for p in pngs)


def test_straggler_skew_and_latency_growth_are_recovered():
    """Collectives timed as t = 300us x (n-1)^0.5 + bytes / 1 GB/s + a straggler wait (spread 0.5 x
    the work since the previous collective, waiting for the last of n), on groups of 2 and 4 and
    several payloads: the fit finds skew 0.5 and exponent 0.5, and the simulator's cost of a
    4-rank all-reduce then matches its generating time."""
    base = load_spec("cpu", "profile")
    out = []
    for n in (2, 4):
        for i, interval in enumerate((1e-3, 3e-3, 6e-3)):
            nbytes = 2.0 ** (14 + 3 * i)
            wait = straggler_wait_s(0.5, interval, n)
            t = 300e-6 * (n - 1) ** 0.5 + nbytes / 1e9 + wait
            out.append(Sample("r", "p", 0, "moe.dispatch_a2a/fwd", "comm", "bf16", 0.0, nbytes, t, 4.0,
                              "all_to_all", "ep", n, interval_s=interval))
            t2 = 300e-6 * 2 * (n - 1) ** 0.5 + 4096 / 1e9 + wait
            out.append(Sample("r", "p", 0, "moe.aux_ar/fwd", "comm", "fp32", 0.0, 4096.0, t2, 4.0,
                              "all_reduce", "tp_sp", n, interval_s=interval))
    mem = Op("moe.act", "fwd", "memory", bytes=4096.0)
    out.append(Sample("r", "p", 0, mem.event, "memory", "bf16", 0.0, 4096.0, 1e-5, 1.0))
    prof, _ = fit_profile(out, base, ["runA"])
    assert prof.sync_skew == pytest.approx(0.5, abs=0.021)
    assert prof.latency_exponent == pytest.approx(0.5, abs=0.051)
    fit = prof.collectives["all_reduce.tp_sp"]
    assert fit.latency_us * latency_steps("all_reduce", 4, prof.latency_exponent) == pytest.approx(
        600 * 3 ** 0.5, rel=0.1)


def test_calibrate_cli_bad_input_exit_2(tmp_path, capsys):
    assert cli(["calibrate", str(tmp_path), "--out", str(tmp_path / "p.yaml")]) == 2
    assert "no meta.yaml" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()
    assert cli(["calibrate", "--out", str(tmp_path / "p.yaml")]) == 2


def test_one_span_over_several_sync_collectives_is_one_sample_of_their_bytes():
    """runtime.optim wraps the gradient sync of every bucket (dp_sp and edp) in one dp.grad_sync span:
    its per-step time pairs with the sum of both collectives' bytes per rank, not one of them."""
    from perfmodel.calibrate.data import stage_ops
    from perfmodel.sim.opgraph import OpGraph

    model = load_spec("tiny-moe", "model")
    g = OpGraph(model, parse_spec({"kind": "plan", "global_batch": 8}, "plan", "p"), 4)  # dp4: dp_sp = edp = 4
    syncs = [op for op in g.grad_sync_ops(0) if op.name == "dp.grad_sync"]
    assert {op.group for op in syncs} == {"dp_sp", "edp"}
    op, n = stage_ops(g, 0)["dp.grad_sync/fwd"]
    assert n == 1 and op.bytes_per_rank == pytest.approx(sum(o.bytes_per_rank for o in syncs))
    op, n = stage_ops(g, 0)["moe.fc1/fwd"]  # per-layer ops still count their instances
    assert n == model.layers * g.layout.microbatches and op.flops == next(o for o in g.layers["moe"].ops if o.event == "moe.fc1/fwd").flops


def test_comm_compute_slowdown_is_recovered_from_overlapped_step_times():
    """Overlapped runs whose step times were simulated with slowdown 0.8 (and a run that overlaps
    nothing, priced exactly): the step-time fit finds 0.8 again."""
    from perfmodel.calibrate.overlap import fit_slowdown
    from perfmodel.compare import study_specs
    from perfmodel.sim import simulate
    from perfmodel.specs import PlanSpec, StudySpec

    study = StudySpec(name="s", model="tiny-moe", cluster="cpu-local-4", world_size=4, plans=[{"name": "dp4"}])
    model, cluster, _ = study_specs(study)
    prof = load_spec("cpu", "profile").model_copy(update={"sync_skew": 0.5})
    truth = prof.model_copy(update={"comm_compute_slowdown": 0.8})
    over = []
    for plan in (PlanSpec(ep=4, global_batch=8, overlap={"inter_op": True}),
                 PlanSpec(sp=2, ep=2, global_batch=8, overlap={"inter_op": True})):
        over.append((model, cluster, plan, simulate(model, cluster, plan, truth).step_time_s))
    plain_plan = PlanSpec(ep=4, global_batch=8)
    plain = [(model, cluster, plain_plan, simulate(model, cluster, plain_plan, prof).step_time_s)]
    x, err = fit_slowdown(prof, over, plain)
    assert x == pytest.approx(0.8, abs=0.051) and err < 0.01
    assert fit_slowdown(prof, [], plain) is None


def test_framework_overhead_splits_into_per_op_and_per_step():
    from perfmodel.calibrate import framework_overhead

    over = [(n, 0.016 + n * 85e-6) for n in (257.0, 257.0, 513.0, 1025.0)]
    per_op, per_step = framework_overhead(over)
    assert per_op == pytest.approx(85e-6, rel=1e-6) and per_step == pytest.approx(0.016, rel=1e-6)
    assert framework_overhead([(100.0, 0.01), (100.0, 0.012)]) == (pytest.approx(1.1e-4), 0.0)  # one op count
    assert framework_overhead([]) == (0.0, 0.0)
