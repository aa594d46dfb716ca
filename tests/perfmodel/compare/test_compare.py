"""moeperf compare end to end on a reduced study (2 CPU ranks, a few steps): real runs -> traces ->
calibration on this machine -> predictions of this machine's held-out run -> tables and figures.
No timed assertions: only that the loop closes and every output is there and well-formed."""

from __future__ import annotations

import json
import math

import pytest

from perfmodel.cli import main as cli
from perfmodel.compare.out import kendall_tau, perfetto
from perfmodel.sim.result import TraceEvent

pytest.importorskip("torch")

STUDY = """
kind: study
name: ci-cpu-2
model: {name: micro-moe, layers: 2, hidden: 64, heads: 4, kv_heads: 2, head_dim: 16, vocab: 256, seq_len: 64,
        moe: {experts: 4, top_k: 2, expert_ffn_hidden: 128, shared_experts: 1}}
cluster: cpu-local-4
world_size: 2
global_batch: 4
plans:
  - {name: dp2, calibrate: true}
  - {name: ep2, ep: 2, calibrate: true}
  - {name: sp2-ep2, sp: 2, ep: 2}
"""


def test_kendall_tau():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    assert math.isnan(kendall_tau([1], [1]))


def test_perfetto_side_by_side_has_separate_pids():
    doc = perfetto({"plan": "p", "sim": [TraceEvent("moe.fc1/fwd", "stage0/compute", 0.0, 1e-3, {"layer": 0})],
                    "measured": []})
    pids = {e["pid"] for e in doc["traceEvents"]}
    assert pids == {1} and any(e["name"] == "moe.fc1/fwd" for e in doc["traceEvents"])


def test_compare_closes_the_loop_on_two_ranks(tmp_path, capsys):
    study = tmp_path / "ci-cpu-2.yaml"
    study.write_text(STUDY)
    out = tmp_path / "out"
    rc = cli(["compare", str(study), "--out", str(out), "--traces", str(tmp_path / "traces"),
              "--steps", "4", "--profile-steps", "3:3", "--repeats", "2", "--json"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["failed"] == {}, summary["failed"]
    assert summary["calibrated_on"] == ["dp2", "ep2"] and summary["held_out"] == ["sp2-ep2"]
    assert math.isfinite(summary["median_error_pct"]) and summary["max_error_pct"] >= 0
    assert summary["repeats"] == 2 and summary["measured_spread_pct_median"] >= 0
    for name in ("per_step.csv", "per_op.csv", "summary.json", "report.md", "profile.yaml",
                 "pred_vs_measured.png", "per_op_scatter.png", "timeline.json"):
        assert (out / name).is_file(), name
    rows = (out / "per_step.csv").read_text().splitlines()
    assert rows[0] == ("plan,held_out,predicted_s,measured_s,error_pct,repeats,measured_spread_pct,"
                       "predicted_tokens_per_s,tokens_per_s_low,tokens_per_s_high,measured_tokens_per_s")
    assert len(rows) == 4
    # one held-out plan: no band, and the summary says why
    assert summary["uncertainty"] is None and "needs >= 2 held-out" in summary["band"]
    assert all(r.split(",")[8:10] == ["", ""] for r in rows[1:])
    assert all(r.split(",")[5] == "2" for r in rows[1:])
    assert len((out / "per_op.csv").read_text().splitlines()) > 10
    prof = (out / "profile.yaml").read_text()
    assert "calibrated_from" in prof and "residuals" in prof and "collectives" in prof
    tl = json.loads((out / "timeline.json").read_text())
    pids = {e["pid"] for e in tl["traceEvents"] if e["ph"] == "X"}
    assert 1 in pids and len(pids) >= 2  # simulated and measured, side by side
    # both repeats of each calibration plan are kept (<plan>/, <plan>.r2/): calibrating again from
    # them gives the same profile
    runs = tmp_path / "traces" / "ci-cpu-2"
    assert sorted(p.name for p in runs.iterdir()) == ["dp2", "dp2.r2", "ep2", "ep2.r2", "sp2-ep2", "sp2-ep2.r2"]
    rc = cli(["calibrate", *(str(runs / n) for n in ("dp2", "dp2.r2", "ep2", "ep2.r2")),
              "--out", str(tmp_path / "again.yaml"), "--no-figures"])
    assert rc == 0
    assert (tmp_path / "again.yaml").read_text().split("calibrated_from")[0] == prof.split("calibrated_from")[0]


def test_report_names_the_ops_that_carry_a_plans_error_per_step():
    from perfmodel.compare.out import report_md

    rows = [{"plan": "a", "held_out": True, "predicted_s": 1.3, "measured_s": 1.0, "error_pct": 30.0},
            {"plan": "b", "held_out": True, "predicted_s": 1.0, "measured_s": 1.0, "error_pct": 1.0}]
    ops = [{"plan": "a", "held_out": True, "event": "attn.sp_a2a_out/dgrad", "predicted_us": 300.0,
            "measured_us": 200.0, "error_pct": 50.0, "per_step": 64.0},
           {"plan": "a", "held_out": True, "event": "dp.grad_sync/fwd", "predicted_us": 5000.0, "measured_us": 4000.0,
            "error_pct": 25.0, "per_step": 1.0},
           {"plan": "b", "held_out": True, "event": "moe.fc1/fwd", "predicted_us": 9.0, "measured_us": 1.0,
            "error_pct": 800.0, "per_step": 4.0}]
    md = report_md(rows, ops, {"study": "s", "calibrated_on": ["c"], "profile": "p", "world_size": 4,
                               "median_error_pct": 15.5, "max_error_pct": 30.0, "kendall_tau": 1.0,
                               "kendall_tau_all": 1.0})
    table = md.split("## Ops carrying the error")[1].splitlines()
    body = [ln for ln in table if ln.startswith("| a") or ln.startswith("| b")]
    assert body[0].startswith("| a | attn.sp_a2a_out/dgrad") and body[0].endswith("+6.4 |")  # 64 x 0.1 ms first
    assert body[1].startswith("| a | dp.grad_sync/fwd") and not any(ln.startswith("| b") for ln in body)
