"""Figures of the search report (matplotlib, Agg backend, deterministic PNGs).

  throughput_memory.png  tokens/s vs memory per GPU of every simulated plan, Pareto front
  breakdown.png          step-time breakdown of the top plans, the fixed plans and the baseline
  layer_gantt.png        one layer's forward and backward on the best plan's streams
  pipeline.png           the best plan's whole iteration per pipeline stage
  variants.png           best tokens/s per what-if variant (studies with variants)
  scaling.png            tokens/s per GPU vs GPU count of each fixed plan, predicted and the paper's
                         (studies whose variants differ in GPU count)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from perfmodel import atomic  # noqa: E402
from perfmodel.report_doc import LABELS, breakdown_of  # noqa: E402
from perfmodel.search import BREAKDOWN_KEYS, Row, SearchResult  # noqa: E402
from perfmodel.uncertainty import NO_BAND, band, fmt_conf, fmt_pct  # noqa: E402

DPI = 110
FIGURES = ("throughput_memory.png", "breakdown.png", "variants.png", "scaling.png", "layer_gantt.png", "pipeline.png")
COLORS = {"compute_s": "#4C72B0", "exposed_comm_s": "#DD8452", "bubble_s": "#BBBBBB", "grad_sync_s": "#C44E52",
          "optimizer_s": "#8172B3", "other_s": "#937860"}
PHASE_COLORS = {"fwd": "#4C72B0", "dgrad": "#DD8452", "wgrad": "#55A868", "recompute": "#8172B3", "other": "#999999"}
VARIANT_COLORS = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]


def _save(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (memory, throughput) not beaten by another with less-or-equal memory and more throughput."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def throughput_memory(result: SearchResult, best: Row | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 6))
    multi = len(result.variants) > 1
    for i, v in enumerate(result.variants):
        ok = [r for r in result.rows if r.variant == v.name and r.status == "ok" and r.memory_GiB is not None]
        ax.scatter([r.memory_GiB for r in ok], [r.tokens_per_s / 1e6 for r in ok], s=12, alpha=0.55,
                   color=VARIANT_COLORS[i % 10], label=f"{v.name}: simulated plans" if multi else "simulated plans")
        unc = v.profile.uncertainty
        if unc is not None and ok:  # the profile's error band on every prediction
            lows, highs = zip(*(band(r.tokens_per_s, unc) for r in ok), strict=True)
            ax.errorbar([r.memory_GiB for r in ok], [r.tokens_per_s / 1e6 for r in ok], fmt="none",
                        yerr=[[(r.tokens_per_s - lo) / 1e6 for r, lo in zip(ok, lows, strict=True)],
                              [(hi - r.tokens_per_s) / 1e6 for r, hi in zip(ok, highs, strict=True)]],
                        ecolor=VARIANT_COLORS[i % 10], elinewidth=0.7, alpha=0.35, capsize=0,
                        label=f"{v.name + ': ' if multi else ''}error band ±{fmt_pct(unc)} at {fmt_conf(unc)}")
        front = pareto([(r.memory_GiB, r.tokens_per_s / 1e6) for r in ok])  # type: ignore[misc]
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=VARIANT_COLORS[i % 10],
                    lw=1.6, label=f"{v.name}: Pareto front" if multi else "Pareto front (no plan is faster with less memory)")
    nofit = [r for r in result.rows if r.status == "no-fit" and r.memory_GiB is not None]
    if nofit:
        ax.scatter([r.memory_GiB for r in nofit], [r.tokens_per_s / 1e6 for r in nofit], s=14, marker="x",
                   color="#999999", label="simulated, does not fit")
    for key, val in sorted(result.study.reference.items()):
        metric, _, plan = key.partition(".")
        if metric == "tokens_per_s" and plan:
            ax.axhline(val / 1e6, color="#555555", ls=":", lw=1.2)
            ax.annotate(f"paper: {plan} {val / 1e6:.2f} M", (0.01, val / 1e6), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", fontsize=8, color="#333333",
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    cap = result.variants[0].profile.memory_GiB
    ax.axvline(cap, color="#C44E52", ls="--", lw=1.2, label=f"GPU memory capacity {cap:g} GiB")
    for r in result.fixed(result.variants[0].name):
        if r.metrics and r.memory_GiB is not None:
            ax.scatter([r.memory_GiB], [r.tokens_per_s / 1e6], marker="D", s=60, color="#E5A800", edgecolor="k",
                       zorder=5)
            ax.annotate(f"fixed: {r.plan.name}", (r.memory_GiB, r.tokens_per_s / 1e6), xytext=(6, -12),
                        textcoords="offset points", fontsize=9,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    if best is not None and best.memory_GiB is not None:
        ax.scatter([best.memory_GiB], [best.tokens_per_s / 1e6], marker="*", s=260, color="#C44E52",
                   edgecolor="k", zorder=6, label=f"best: {best.plan.name}")
    ax.set_xlabel("estimated memory per GPU (GiB)")
    ax.set_ylabel("predicted throughput (million tokens/s)")
    unc0 = result.variants[0].profile.uncertainty
    ax.set_title(f"{result.study.name}: throughput vs memory of every simulated plan"
                 + ("" if unc0 is not None else f"\n({NO_BAND})"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, frameon=False)
    _save(fig, path)


def breakdown_bars(result: SearchResult, top: int, path: Path) -> None:
    ranked = result.ranked()[:min(top, 10)]
    items = [(f"#{i + 1} {r.plan.name}" + (f" [{r.variant}]" if len(result.variants) > 1 else ""), r)
             for i, r in enumerate(ranked)]
    for r in result.fixed(result.variants[0].name):
        if r.metrics and r not in ranked:
            tag = "baseline" if r.plan.name == result.study.baseline else "fixed"
            items.append((f"{tag}: {r.plan.name}", r))
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(items) + 1.8))
    labels = [lbl for lbl, _ in items][::-1]
    rows = [r for _, r in items][::-1]
    left = [0.0] * len(rows)
    for k in BREAKDOWN_KEYS:
        vals = [breakdown_of(r.metrics)[k] for r in rows]
        if not any(vals):
            continue
        ax.barh(range(len(rows)), vals, left=left, color=COLORS[k], label=LABELS[k], edgecolor="white", lw=0.5)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    for i, r in enumerate(rows):
        ax.text(left[i], i, f"  {r.step_time_s:.2f} s, {r.tokens_per_s / 1e6:.2f} M tok/s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel("seconds per training iteration (critical path)")
    ax.set_title("Where the step time goes: top plans and the fixed plans")
    ax.set_xlim(0, max(left + [1e-9]) * 1.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.5 / (0.45 * len(items) + 1.8) - 0.06),
              ncol=6, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def _phase(name: str) -> str:
    ph = name.rpartition("/")[2]
    return ph if ph in PHASE_COLORS else "other"


def _stage_of(track: str) -> str:
    return track.split("/")[0]


def layer_events(timeline: list[Any]) -> list[Any]:
    """The events of one layer (the first layer id of the first stage) for one micro-batch."""
    evs = [e for e in timeline if "layer" in e.args and not e.track.startswith("link")]
    if not evs:
        return []
    stage = _stage_of(min(evs, key=lambda e: (e.start_s, e.track)).track)
    evs = [e for e in evs if _stage_of(e.track) == stage]
    layer = min(e.args["layer"] for e in evs)
    mbs = [e.args.get("microbatch") for e in evs if e.args["layer"] == layer]
    mb = min((m for m in mbs if m is not None), default=None)
    return [e for e in evs if e.args["layer"] == layer and e.args.get("microbatch") == mb]


def layer_gantt(timeline: list[Any], title: str, path: Path) -> bool:
    evs = layer_events(timeline)
    if not evs:
        return False
    fwd = [e for e in evs if _phase(e.name) == "fwd"]
    bwd = [e for e in evs if _phase(e.name) != "fwd"]
    groups = [(g, lbl) for g, lbl in ((fwd, "forward"), (bwd, "backward (recompute, dgrad, wgrad)")) if g]
    ops = sorted({e.name.split("/")[0] for e in evs})
    cmap = plt.get_cmap("tab20")
    color = {op: cmap(i % 20) for i, op in enumerate(ops)}
    fig, axes = plt.subplots(len(groups), 1, figsize=(13, 2.4 * len(groups) + 1.0), squeeze=False)
    for ax, (group, label) in zip(axes[:, 0], groups, strict=True):
        t0 = min(e.start_s for e in group)
        tracks = sorted({e.track for e in group}, key=lambda t: ("compute" not in t, t))
        bars: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
        for e in sorted(group, key=lambda e: (e.track, e.start_s, e.name)):
            key = (e.track, e.name.split("/")[0], {"wgrad": "xx", "recompute": ".."}.get(_phase(e.name), ""))
            bars.setdefault(key, []).append(((e.start_s - t0) * 1e3, e.dur_s * 1e3))
        for (track, op, hatch), xr in sorted(bars.items()):
            ax.broken_barh(xr, (tracks.index(track) - 0.38, 0.76), facecolor=color[op], edgecolor="k", lw=0.3,
                           hatch=hatch or None)
        ax.set_yticks(range(len(tracks)), tracks, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"time since the layer's {label.split()[0]} began (ms)")
        ax.set_title(label, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    handles = [Patch(facecolor=color[op], edgecolor="k", lw=0.3, label=op) for op in ops]
    handles += [Patch(facecolor="white", edgecolor="k", hatch="xx", label="(hatched xx) wgrad"),
                Patch(facecolor="white", edgecolor="k", hatch="..", label="(dotted) recompute")]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="op",
               frameon=False)
    fig.suptitle(title + " (first stage, first micro-batch; pieces = split/tiled parts of an op)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def _is_backward(name: str) -> bool:
    ph = name.rpartition("/")[2] if "/" in name else name.rpartition(".")[2]
    return ph not in ("fwd", "forward")


def pipeline_chart(timeline: list[Any], title: str, path: Path) -> bool:
    """Each stage over the iteration: its forward/backward blocks per micro-batch (the
    simulator's `stageK/pipeline` tracks, else compute ops merged per micro-batch), then its
    gradient sync and optimizer step."""
    pipe = [e for e in timeline if e.track.endswith("/pipeline")]
    evs = pipe or [e for e in timeline if e.track.endswith("/compute") and "microbatch" in e.args]
    if not evs:
        return False
    blocks: dict[tuple, list[Any]] = {}
    for e in evs:
        key = (_stage_of(e.track), e.args.get("microbatch"), e.args.get("chunk", 0), _is_backward(e.name))
        b = blocks.setdefault(key, [e.start_s, e.start_s + e.dur_s])
        b[0], b[1] = min(b[0], e.start_s), max(b[1], e.start_s + e.dur_s)
    tail = [e for e in timeline if e.name.split("/")[0] in ("dp.grad_sync", "dp.param_gather", "optim.step")]
    stages = sorted({k[0] for k in blocks} | {_stage_of(e.track) for e in tail}, key=lambda t: (len(t), t))
    fig, ax = plt.subplots(figsize=(12, 0.55 * len(stages) + 2.2))
    bars: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for (stage, _mb, _c, back), (s, f) in sorted(blocks.items(), key=lambda kv: (kv[0][0], kv[1][0], kv[0][3])):
        bars.setdefault((stage, back), []).append((s, f - s))
    for (stage, back), xr in sorted(bars.items()):  # one collection per stage and direction: fast to draw
        ax.broken_barh(xr, (stages.index(stage) - 0.4, 0.8), facecolor=PHASE_COLORS["dgrad" if back else "fwd"],
                       edgecolor="white", lw=0.3)
    for e in sorted(tail, key=lambda e: (e.track, e.start_s, e.name)):
        color = "#C44E52" if e.name.startswith("dp.") else "#8172B3"
        ax.broken_barh([(e.start_s, e.dur_s)], (stages.index(_stage_of(e.track)) - 0.25, 0.5), facecolor=color,
                       alpha=0.8)
    ax.set_yticks(range(len(stages)), [f"pipeline {s}" for s in stages], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time in the iteration (s)")
    ax.set_title(title, fontsize=11)
    ax.legend(handles=[Patch(color=PHASE_COLORS["fwd"], label="forward of a micro-batch"),
                       Patch(color=PHASE_COLORS["dgrad"], label="backward of a micro-batch"),
                       Patch(color="#C44E52", alpha=0.8, label="gradient sync (DP)"),
                       Patch(color="#8172B3", alpha=0.8, label="optimizer step"),
                       Patch(facecolor="white", edgecolor="k", label="white gaps: bubble / waiting")],
              fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return True


def variants_chart(result: SearchResult, path: Path) -> None:
    names, vals, labels, errs = [], [], [], [[], []]
    for v in result.variants:
        rk = result.ranked(v.name)
        names.append(v.name)
        vals.append(rk[0].tokens_per_s / 1e6 if rk else 0.0)
        labels.append(rk[0].plan.name.split("_")[0] if rk else "no plan fits")
        lo, hi = band(rk[0].tokens_per_s, v.profile.uncertainty) if rk else (None, None)
        errs[0].append(vals[-1] - lo / 1e6 if lo is not None else 0.0)
        errs[1].append(hi / 1e6 - vals[-1] if hi is not None else 0.0)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(names)), 5))
    has_band = any(errs[1])
    ax.bar(range(len(names)), vals, color=[VARIANT_COLORS[i % 10] for i in range(len(names))],
           yerr=errs if has_band else None, capsize=4, error_kw={"elinewidth": 1, "ecolor": "#333333"})
    for i, (v, lbl) in enumerate(zip(vals, labels, strict=True)):
        ax.text(i, v + errs[1][i], f"{v:.2f} M\n{lbl}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=9)
    ax.set_ylabel("best predicted throughput (million tokens/s)")
    ax.set_title(f"{result.study.name}: best plan per what-if variant"
                 + (" (bars: the profile's error band)" if has_band else f"\n({NO_BAND})"))
    ax.set_ylim(0, max([a + b for a, b in zip(vals, errs[1], strict=True)] + [1e-9]) * 1.2)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def scaling_chart(result: SearchResult, path: Path) -> bool:
    """Tokens/s per GPU against the GPU count: each fixed plan predicted (solid) and, where the study's
    reference has `tokens_per_s.<plan>[@<variant>]`, the paper's (dashed). False when the variants do
    not differ in GPU count."""
    variants = sorted(result.variants, key=lambda v: v.world)
    if len({v.world for v in variants}) < 2:
        return False
    ref, first = result.study.reference, result.variants[0].name
    names = list(dict.fromkeys(r.plan.name for r in result.fixed()))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    top = 0.0
    for i, name in enumerate(names):
        color = VARIANT_COLORS[i % 10]
        pred = [(v.world, r.tokens_per_s / v.world) for v in variants for r in result.fixed(v.name)
                if r.plan.name == name and r.metrics]
        paper = [(v.world, ref[k] / v.world) for v in variants
                 if (k := f"tokens_per_s.{name}" + ("" if v.name == first else f"@{v.name}")) in ref]
        if pred:
            ax.plot(*zip(*pred, strict=True), marker="o", color=color, lw=1.8, label=f"{name}: predicted")
            bands = [(x, y, band(y, v.profile.uncertainty)) for v in variants for x, y in pred if x == v.world]
            bands = [(x, y, lo, hi) for x, y, (lo, hi) in bands if lo is not None and hi is not None]
            if bands:  # the profile's error band on each prediction, shaded (bars of the plans would overlap)
                bands.sort()
                ax.fill_between([b[0] for b in bands], [b[2] for b in bands], [b[3] for b in bands], color=color,
                                alpha=0.12, lw=0)
                top = max([top] + [b[3] for b in bands])
        if paper:
            ax.plot(*zip(*paper, strict=True), marker="s", mfc="none", ls="--", color=color, lw=1.4,
                    label=f"{name}: paper")
        published = dict(paper)
        for x, y in pred:
            if x in published:
                err = 100 * (y / published[x] - 1)
                ax.annotate(f"{err:+.1f} %" if abs(err) >= 0.05 else "0.0 %", (x, y), xytext=(4, 6),
                            textcoords="offset points", fontsize=8, color=color)
        top = max([top] + [y for _, y in pred + paper])
    ax.set_xticks([v.world for v in variants], [f"{v.world:,}" for v in variants])
    ax.set_xlabel("GPUs")
    ax.set_ylabel("tokens/s per GPU")
    shaded = any(v.profile.uncertainty is not None for v in variants)
    ax.set_title(f"{result.study.name}: tokens/s per GPU (labels: predicted vs paper"
                 + ("; shaded: the profile's error band)" if shaded else ")"))
    ax.set_ylim(0, 1.12 * top or 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="lower left")
    _save(fig, path)
    return True


def draw_all(result: SearchResult, out: Path, *, traced: Any, best: Row | None, top: int) -> list[tuple[str, str]]:
    """Draw every figure that has data; returns (file, caption) in report order."""
    made: list[tuple[str, str]] = []
    if result.ranked():
        throughput_memory(result, best, out / "throughput_memory.png")
        made.append(("throughput_memory.png", "Predicted tokens/s vs memory per GPU; the Pareto front, the "
                     "fixed plans and the best plan are marked; "
                     + ("vertical bars: the profile's error band." if result.variants[0].profile.uncertainty
                        else f"{NO_BAND}.")))
    if any(r.metrics for r in result.rows):
        breakdown_bars(result, top, out / "breakdown.png")
        made.append(("breakdown.png", "Step-time breakdown of the top plans and the fixed plans (seconds)."))
    if len(result.variants) > 1:
        variants_chart(result, out / "variants.png")
        made.append(("variants.png", "Best predicted tokens/s per what-if variant (label: its parallel layout)."))
        if scaling_chart(result, out / "scaling.png"):
            made.append(("scaling.png", "Tokens/s per GPU against GPU count for each fixed plan: predicted "
                         "(solid) and the paper's (dashed, where the study's reference gives it)."))
    if traced is not None and best is not None:
        if layer_gantt(traced.timeline, f"One layer of the best plan ({best.plan.name}) on its streams",
                       out / "layer_gantt.png"):
            made.append(("layer_gantt.png", "One layer's forward and backward on the best plan's compute and "
                         "communication streams (first stage, first micro-batch)."))
        if pipeline_chart(traced.timeline, f"Pipeline timeline of the best plan ({best.plan.name})",
                          out / "pipeline.png"):
            made.append(("pipeline.png", "The best plan's whole iteration: forward and backward blocks per "
                         "pipeline stage; gaps are bubbles or waits."))
    return made
