"""Outputs of `moeperf compare`: tables, summary, figures and the side-by-side Perfetto file.

Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from perfmodel import atomic
from perfmodel.specs import UncertaintySpec
from perfmodel.uncertainty import NO_BAND, fmt_tokens


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall tau-b of two rankings (1: same order); nan for fewer than two items."""
    n = len(a)
    if n < 2:
        return float("nan")
    conc = disc = ta = tb = 0
    for i in range(n):
        for j in range(i + 1, n):
            x, y = a[i] - a[j], b[i] - b[j]
            if x == 0 and y == 0:
                continue
            if x == 0:
                ta += 1
            elif y == 0:
                tb += 1
            elif (x > 0) == (y > 0):
                conc += 1
            else:
                disc += 1
    den = math.sqrt((conc + disc + ta) * (conc + disc + tb))
    return (conc - disc) / den if den else float("nan")


def _csv(rows: list[dict[str, Any]], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def figures(out: Path, rows: list[dict[str, Any]], op_rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["predicted_s"] * 1e3 for r in rows], 0.4, label="predicted")
    ax.bar([x + 0.2 for x in xs], [r["measured_s"] * 1e3 for r in rows], 0.4, label="measured")
    ax.set_xticks(list(xs), [r["plan"] + ("" if r["held_out"] else "*") for r in rows], rotation=30, ha="right")
    ax.set(ylabel="step time (ms)", title="predicted vs measured step time (* = calibration plan)")
    ax.legend()
    atomic.write_bytes(out / "pred_vs_measured.png", _png(fig))

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for held, color in ((False, "tab:blue"), (True, "tab:orange")):
        pts = [(r["measured_us"], r["predicted_us"]) for r in op_rows if r["held_out"] == held]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=10, alpha=0.6, c=color,
                       label="held-out plans" if held else "calibration plans")
    vals = [v for r in op_rows for v in (r["measured_us"], r["predicted_us"]) if v > 0]
    if vals:
        lo, hi = min(vals), max(vals)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="measured (us per instance)", ylabel="predicted (us)",
           title="per-op predicted vs measured")
    ax.legend(fontsize=8)
    atomic.write_bytes(out / "per_op_scatter.png", _png(fig))


def perfetto(timelines: dict[str, Any]) -> dict[str, Any]:
    """Chrome trace with pid 1 = simulated (its tracks as threads), pid 2+k = measured rank k (one step)."""
    events: list[dict[str, Any]] = [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0,
                                     "args": {"name": f"simulated: {timelines.get('plan', '')}"}}]
    tids: dict[str, int] = {}
    for ev in timelines.get("sim", []):
        tid = tids.setdefault(ev.track, len(tids) + 1)
        events.append({"ph": "X", "name": ev.name, "cat": "sim", "pid": 1, "tid": tid, "ts": ev.start_s * 1e6,
                       "dur": ev.dur_s * 1e6, "args": {k: v for k, v in ev.args.items() if _jsonable(v)}})
    for track, tid in tids.items():
        events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": track}})
    for k, tr in enumerate(timelines.get("measured", [])):
        pid = 2 + k
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                       "args": {"name": f"measured: {timelines.get('plan', '')} {Path(tr.path).stem}"}})
        if not tr.steps:
            continue
        t0, t1 = tr.steps[0]
        for s in tr.spans:
            if t0 <= s.start_us < t1:
                events.append({"ph": "X", "name": s.event, "cat": "measured", "pid": pid, "tid": 1,
                               "ts": s.start_us - t0, "dur": s.dur_us,
                               "args": {k: v for k, v in s.args.items() if k in (
                                   "layer", "microbatch", "rank", "bytes", "flops", "shapes", "collective")}})
        events.append({"ph": "X", "name": "step", "cat": "measured", "pid": pid, "tid": 0, "ts": 0.0,
                       "dur": t1 - t0})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def report_md(rows: list[dict[str, Any]], op_rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [f"# Predicted vs measured: {summary['study']}", "",
             f"Profile calibrated on {', '.join(summary['calibrated_on'])} -> `{summary['profile']}`; "
             f"{summary['world_size']} ranks.", "",
             f"**Held-out plans**: median step-time error {summary['median_error_pct']:.1f} % (bar 10 %), "
             f"max {summary['max_error_pct']:.1f} % (bar 20 %), Kendall tau {summary['kendall_tau']:.2f} "
             f"(bar 0.8; all plans {summary['kendall_tau_all']:.2f}).", "",
             f"Measured: median step time over {summary.get('repeats', 1)} run(s) per plan (unprofiled steps); "
             f"spread = (slowest - fastest run) / median, median over plans "
             f"{summary.get('measured_spread_pct_median', 0.0):.1f} %.", "",
             f"Band of the calibrated profile (written into it as `uncertainty`): {summary.get('band') or NO_BAND}.",
             "",
             "| plan | held out | predicted (ms) | measured (ms) | spread % | error % | predicted tokens/s | "
             "measured tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    unc = UncertaintySpec.model_validate({k: v for k, v in summary["uncertainty"].items()
                                          if k in UncertaintySpec.model_fields}) if summary.get("uncertainty") else None
    for r in rows:
        pred, meas = r.get("predicted_tokens_per_s"), r.get("measured_tokens_per_s")
        lines.append(f"| {r['plan']} | {'yes' if r['held_out'] else 'no'} | {r['predicted_s'] * 1e3:.1f} | "
                     f"{r['measured_s'] * 1e3:.1f} | {r.get('measured_spread_pct', 0.0):.1f} | {r['error_pct']:+.1f} | "
                     f"{fmt_tokens(pred, unc) if pred else '-'} | {fmt_tokens(meas) if meas else '-'} |")
    if summary.get("failed"):
        lines += ["", "Plans that failed to run: " + "; ".join(f"{k}: {v}" for k, v in summary["failed"].items())]
    # which ops carry the error: per held-out plan off by more than 10 % (else the worst one),
    # the ops whose (predicted - measured) x instances per step is largest
    held = sorted((r for r in rows if r["held_out"]), key=lambda r: -abs(r["error_pct"]))
    worst = [r for r in held if abs(r["error_pct"]) > 10.0] or held[:1]
    if worst:
        lines += ["", "## Ops carrying the error (held-out plans off by > 10 %, else the worst; per step)", ""]
        host_us = summary.get("host_us_per_op") or 0.0
        if host_us > 0:
            lines += [f"GPU traces: measured op times are kernel times, while a predicted op lasts at least the "
                      f"host's {host_us:.0f} us to issue it (`host_us_per_op`), so small ops read as over-predicted "
                      "here; the step-level error is the host's, fitted per step and per op.", ""]
        lines += ["| plan | op | predicted (us) | measured (us) | per step | predicted - measured (ms per step) |",
                  "| --- | --- | --- | --- | --- | --- |"]
    for r in worst:
        mine = [o for o in op_rows if o["plan"] == r["plan"]]
        mine.sort(key=lambda o: -abs((o["predicted_us"] - o["measured_us"]) * o.get("per_step", 1.0)))
        for o in mine[:8]:
            n = o.get("per_step", 1.0)
            lines.append(f"| {r['plan']} | {o['event']} | {o['predicted_us']:.0f} | {o['measured_us']:.0f} | {n:g} | "
                         f"{(o['predicted_us'] - o['measured_us']) * n / 1e3:+.1f} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, rows: list[dict[str, Any]], op_rows: list[dict[str, Any]], summary: dict[str, Any],
                  timelines: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "per_step.csv", _csv(rows, ["plan", "held_out", "predicted_s", "measured_s", "error_pct",
                                                        "repeats", "measured_spread_pct", "predicted_tokens_per_s",
                                                        "tokens_per_s_low", "tokens_per_s_high",
                                                        "measured_tokens_per_s"]))
    atomic.write_text(out / "per_op.csv", _csv(op_rows, ["plan", "held_out", "event", "predicted_us", "measured_us",
                                                         "error_pct", "per_step"]))
    atomic.write_json(out / "summary.json", {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                             for k, v in summary.items()})
    atomic.write_text(out / "report.md", report_md(rows, op_rows, summary))
    if timelines:
        atomic.write_json(out / "timeline.json", perfetto(timelines))
    if rows:
        figures(out, rows, op_rows)
