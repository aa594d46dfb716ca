"""Host-bound GPU steps: the host fit on synthetic cases, and the one-H100 closed loop on the
traces committed under traces/h100-1gpu (recorded by scripts/gpu_checks.sh)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from perfmodel.calibrate.host import HostCase, fit_host

REPO = Path(__file__).resolve().parents[3]
TRACES = REPO / "traces" / "h100-1gpu"


def test_fit_recovers_host_time_and_step_overhead():
    rng = np.random.default_rng(0)
    cases = []
    for mb in (1, 2, 4, 8):  # fewer, larger ops as the micro-batch grows
        n_ops = 40
        dev = rng.uniform(20e-6, 300e-6, n_ops) * mb
        case = HostCase(f"mb{mb}", np.full(n_ops, 32.0 / mb), dev, 0.003, 0.0)
        cases.append(HostCase(case.run, case.instances, dev, case.comm_s, case.predict(400e-6, 0.05)))
    host, step, err = fit_host(cases)
    assert host == pytest.approx(400e-6, rel=0.03)
    assert step == pytest.approx(0.05, rel=0.05)
    assert err < 0.01


def test_device_bound_runs_fit_no_host_floor():
    dev = np.array([1e-3, 2e-3])
    cases = [HostCase("a", np.array([4.0, 4.0]), dev, 0.0, 0.012), HostCase("b", np.array([8.0, 8.0]), dev, 0.0, 0.024)]
    host, step, _ = fit_host(cases)
    assert host <= 1e-3 and step == pytest.approx(0.0, abs=1e-4)


@pytest.mark.skipif(not (TRACES / "mb1" / "meta.yaml").is_file(), reason="H100 traces not in this checkout")
def test_h100_closed_loop_on_committed_traces(tmp_path):
    from perfmodel.compare import compare

    summary = compare(str(REPO / "studies" / "h100-1gpu.yaml"), tmp_path / "out", REPO / "traces", log=lambda *a: None)
    prof = (tmp_path / "out" / "profile.yaml").read_text()
    assert "host_us_per_op" in prof and "bf16: 989" in prof  # fitted host floor; datasheet peak kept
    assert summary["median_error_pct"] <= 15 and summary["max_error_pct"] <= 20 and summary["kendall_tau"] >= 0.8
