"""The search report, written into one folder, every file atomically:

  plans.csv          every candidate and fixed plan: fields, status, reason, predictions
  report.md          top plans, fixed plans, paper reference vs predicted, why the winner wins
  report.html        the same, self-contained (figures embedded as base64 PNG)
  *.png              figures (see report/figures.py)
  best_plan.yaml     the winner as a `kind: plan` file (moeperf run / simulate --plan)
  best_timeline.json the winner's simulated iteration as Chrome trace JSON (Perfetto)

Nothing in these files depends on timing or --jobs: the same search gives the same bytes.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from perfmodel import atomic
from perfmodel.report.doc import Doc, breakdown_of, fill_sections, fixed_details, fmt_gib, tie_words, unc_of
from perfmodel.search import BREAKDOWN_KEYS, Row, SearchResult, default_simulate
from perfmodel.sim.chrometrace import write_chrome_trace
from perfmodel.sim.uncertainty import band_fields, block, fmt_tokens, tie_set
from perfmodel.specs import SpecError
from perfmodel.specs.layout import plan_layout

PLAN_COLUMNS = ("tp", "sp", "ep", "etp", "pp", "vpp", "dp", "micro_batch", "global_batch", "schedule",
                "recompute", "inter_op", "intra_op", "chunks", "overlap_grad_sync", "dispatch", "combine",
                "grad_sync", "distributed_optimizer", "rank_order")
CSV_COLUMNS = ("index", "variant", "name", "fixed", "status", "reason", "rank", *PLAN_COLUMNS,
               "tokens_per_s", "tokens_per_s_low", "tokens_per_s_high", "mfu", "step_time_s", *BREAKDOWN_KEYS, "memory_GiB", "bound_s")


def g(x: float | None, digits: int = 6) -> str:
    return "" if x is None else f"{x:.{digits}g}"


def plan_fields(row: Row, model: Any, world: int) -> dict[str, Any]:
    p = row.plan
    dp: Any = ""
    if row.status != "invalid":
        try:
            dp = plan_layout(p, model, world).dp
        except SpecError:
            dp = ""
    return {"tp": p.tp, "sp": p.sp, "ep": p.ep, "etp": p.etp, "pp": p.pp, "vpp": p.vpp, "dp": dp,
            "micro_batch": p.micro_batch, "global_batch": p.global_batch, "schedule": p.schedule,
            "recompute": p.recompute, "inter_op": p.overlap.inter_op, "intra_op": p.overlap.intra_op,
            "chunks": p.overlap.chunks, "overlap_grad_sync": p.overlap.grad_sync,
            "dispatch": p.compression.dispatch, "combine": p.compression.combine,
            "grad_sync": p.compression.grad_sync, "distributed_optimizer": p.distributed_optimizer,
            "rank_order": "-".join(p.rank_order)}


def fmt_row(row: Row, result: SearchResult) -> dict[str, str]:
    m = row.metrics
    return {"name": row.plan.name, "variant": row.variant, "status": row.status,
            "tokens_per_s": fmt_tokens(m["tokens_per_s"], unc_of(result, row.variant)) if m else "-",
            "mfu": f"{100 * m['mfu']:.1f} %" if m else "-",
            "step_time_s": f"{m['step_time_s']:.3f}" if m else "-",
            "memory_GiB": fmt_gib(row.memory_GiB)}


def plans_csv(result: SearchResult) -> str:
    parts = {v.name: v for v in result.variants}
    rank = {r.index: i + 1 for v in result.variants for i, r in enumerate(result.ranked(v.name))}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for row in result.rows:
        m = row.metrics
        bd = breakdown_of(m)
        fields = plan_fields(row, parts[row.variant].model, parts[row.variant].world)
        bands = band_fields(m.get("tokens_per_s"), parts[row.variant].profile.uncertainty)
        w.writerow([row.index, row.variant, row.plan.name, row.fixed, row.status, row.reason,
                    rank.get(row.index, ""), *(fields[c] for c in PLAN_COLUMNS),
                    g(m.get("tokens_per_s")), g(bands["tokens_per_s_low"]), g(bands["tokens_per_s_high"]),
                    g(m.get("mfu")), g(m.get("step_time_s")),
                    *(g(bd.get(k)) if m else "" for k in BREAKDOWN_KEYS), g(row.memory_GiB), g(row.bound_s)])
    return buf.getvalue()


def plan_yaml(row: Row, note: str) -> str:
    import yaml

    data = row.plan.model_dump(mode="json", exclude_none=True)
    data = {"kind": "plan", **{k: v for k, v in data.items() if k not in ("kind", "calibrate")}}
    return f"# {note}\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def summary_json(result: SearchResult, out: Path, top: int) -> dict[str, Any]:
    def one(r: Row) -> dict[str, Any]:
        return {"variant": r.variant, "name": r.plan.name, "status": r.status, "reason": r.reason,
                "plan": r.plan.model_dump(mode="json", exclude_none=True), **r.metrics,
                **band_fields(r.metrics.get("tokens_per_s"), unc_of(result, r.variant)),
                "memory_total_GiB": r.memory_GiB}

    ranked = result.ranked()
    best = ranked[0] if ranked else None
    unc = unc_of(result, best.variant if best else None)
    ties = tie_set(result.ranked(best.variant), unc) if best else []
    return {"study": result.study.name, "out": str(out), "evaluated": result.evaluated,
            "counts": result.counts(), "merged_duplicates": result.merged,
            # the winner's variant's band (null: profile not calibrated) and the plans within it of the winner
            "uncertainty": block(unc), "within_error_of_winner": [r.plan.name for r in ties] if unc else None,
            "top": [one(r) for r in ranked[:top]], "fixed": [one(r) for r in result.fixed()]}


def write_report(result: SearchResult, out: str | Path, *, top: int = 10, simulate_fn: Any = None) -> Path:
    """Write every report file into `out`; returns the folder."""
    from perfmodel.report import figures as figs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fn = simulate_fn or default_simulate()
    atomic.write_text(out / "plans.csv", plans_csv(result))
    ranked = result.ranked()
    best = ranked[0] if ranked else None
    traced = None
    if best is not None:
        vb = next(v for v in result.variants if v.name == best.variant)
        traced = fn(vb.model, vb.cluster, best.plan, vb.profile, trace=True)
        n_tied = len(tie_words(result, best)[0])
        what = "best plan" if n_tied == 1 else f"highest prediction of {n_tied} plans within the model's error"
        note = (f"{what} of study {result.study.name} (variant {best.variant}): predicted "
                f"{fmt_tokens(best.tokens_per_s, unc_of(result, best.variant))} tokens/s, step "
                f"{best.step_time_s:.3f} s, {best.metrics['mfu'] * 100:.1f} % MFU")
        atomic.write_text(out / "best_plan.yaml", plan_yaml(best, note))
        write_chrome_trace(out / "best_timeline.json", traced.timeline,
                           {"study": result.study.name, "variant": best.variant, "plan": best.plan.name,
                            "step_time_s": best.step_time_s, "tokens_per_s": best.tokens_per_s})
    details = fixed_details(result, fn)
    images = figs.draw_all(result, out, traced=traced, best=best, top=top)
    doc = Doc(f"moeperf search: {result.study.name}")
    fill_sections(doc, result, best, details, images, top, result.variants[0])
    atomic.write_text(out / "report.md", doc.markdown())
    atomic.write_text(out / "report.html", doc.html(out))
    # a previous run's files that this run did not produce would be stale: remove them
    made = {f for f, _ in images} | ({"best_plan.yaml", "best_timeline.json"} if best is not None else set())
    for name in ("best_plan.yaml", "best_timeline.json", *figs.FIGURES):
        if name not in made:
            (out / name).unlink(missing_ok=True)
    return out
