"""The text of the search report: one list of blocks rendered as Markdown and as HTML.

Sections: setup, search outcome, paper reference vs predicted (when the study has
`reference:`), fixed plans, top plans, what made the winner win (breakdown deltas against
the baseline), variants (what-ifs), figures.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from perfmodel.search import BREAKDOWN_KEYS, Row, SearchResult
from perfmodel.specs import UncertaintySpec
from perfmodel.uncertainty import NO_BAND, describe, fmt_conf, fmt_pct, fmt_tokens, tie_set

LABELS = {"compute_s": "compute", "exposed_comm_s": "exposed comm", "bubble_s": "pipeline bubble",
          "grad_sync_s": "grad sync (exposed)", "optimizer_s": "optimizer", "other_s": "other"}
TOLERANCE = 0.10  # the reproduction target: within +-10 % of the paper
MAX_TIES_LISTED = 25  # candidates listed by name in the report (all of them are counted)


class Doc:
    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple[str, Any]] = []

    def h2(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", (headers, [[str(c) for c in r] for r in rows])))

    def img(self, file: str, caption: str) -> None:
        self.blocks.append(("img", (file, caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, b in self.blocks:
            if kind == "h2":
                out += [f"## {b}", ""]
            elif kind == "p":
                out += [b, ""]
            elif kind == "ul":
                out += [f"- {x}" for x in b] + [""]
            elif kind == "table":
                headers, rows = b
                out.append("| " + " | ".join(headers) + " |")
                out.append("|" + "|".join(" --- " for _ in headers) + "|")
                out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                out += [f"![{b[1]}]({b[0]})", "", f"*{b[1]}*", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self, folder: Path) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for kind, b in self.blocks:
            if kind == "h2":
                body.append(f"<h2>{e(b)}</h2>")
            elif kind == "p":
                body.append(f"<p>{_inline(b)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b) + "</ul>")
            elif kind == "table":
                headers, rows = b
                head = "".join(f"<th>{e(h)}</th>" for h in headers)
                trs = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "img":
                data = base64.b64encode((folder / b[0]).read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{e(b[1])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{e(b[1])}</figcaption></figure>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;"
                 "padding:3px 8px;text-align:right}th{background:#f0f0f0}td:nth-child(2){text-align:left}"
                 "img{max-width:100%}figcaption{color:#555;font-style:italic}code{background:#f4f4f4}")
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{e(self.title)}</title><style>{style}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Escape, then turn `code` and **bold** spans into HTML."""
    parts = html.escape(text).split("`")
    out = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    bold = out.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(bold))


# ------------------------------------------------------------------------- helpers
def breakdown_of(metrics: dict[str, Any]) -> dict[str, float]:
    """The step's breakdown under the report's keys (simulator keys with or without `_s`);
    anything else the simulator reports lands in other_s."""
    bd = dict(metrics.get("breakdown", {}))
    out = {}
    for k in BREAKDOWN_KEYS:
        if k == "other_s":
            continue
        out[k] = float(bd.pop(k, bd.pop(k.removesuffix("_s"), 0.0)))
    out["other_s"] = float(sum(v for v in bd.values() if isinstance(v, (int, float))))
    return out


def fixed_details(result: SearchResult, fn: Any) -> dict[int, dict[str, Any]]:
    """Simulator details (per-op seconds of a layer, ...) of each simulated fixed plan."""
    parts = {v.name: v for v in result.variants}
    out = {}
    for r in result.fixed():
        if r.metrics:
            v = parts[r.variant]
            out[r.index] = dict(fn(v.model, v.cluster, r.plan, v.profile).details or {})
    return out


def unc_of(result: SearchResult, variant: str | None = None) -> UncertaintySpec | None:
    """The error band of a variant's profile (the first variant's by default)."""
    v = next((v for v in result.variants if v.name == variant), result.variants[0])
    return v.profile.uncertainty


def fmt_gib(x: float | None) -> str:
    return "-" if x is None else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def _row_cells(r: Row, unc: UncertaintySpec | None) -> list[Any]:
    m, bd = r.metrics, breakdown_of(r.metrics)
    if not m:
        return [r.plan.name, r.status, "-", "-", "-", *["-"] * 5, "-"]
    return [r.plan.name, r.status, fmt_tokens(m["tokens_per_s"], unc), f"{100 * m['mfu']:.1f}", f"{m['step_time_s']:.3f}",
            *(f"{bd[k]:.3f}" for k in BREAKDOWN_KEYS if k != "other_s"),
            fmt_gib(r.memory_GiB)]


ROW_HEADERS = ["plan", "status", "tokens/s", "MFU %", "step s", "compute s", "exp. comm s", "bubble s",
               "grad sync s", "optim s", "mem GiB"]


def top_ops(details: dict[str, Any], n: int = 5) -> list[tuple[str, float]]:
    ops = details.get("layer_ops") or {}
    flat: dict[str, float] = {}

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}{k}" if not prefix else f"{prefix}:{k}", v)
        elif isinstance(x, (int, float)):
            flat[prefix] = flat.get(prefix, 0.0) + float(x)

    walk("", ops)
    return sorted(flat.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _find_fixed(result: SearchResult, name: str, variant: str) -> Row | None:
    return next((r for r in result.fixed(variant) if r.plan.name == name), None)


def _ref_order(key: str) -> tuple[str, str]:
    """Reference rows grouped by variant (in the study's order of keys within one)."""
    return (key.partition("@")[2], key)


def paper_section(doc: Doc, result: SearchResult, details: dict[int, dict[str, Any]]) -> None:
    ref = result.study.reference
    if not ref:
        return
    v0 = result.variants[0].name
    rows, misses = [], []
    for key in sorted(ref, key=_ref_order):
        # keys: "<metric>.<plan>" for the first variant, "<metric>.<plan>@<variant>" for another
        head, _, variant = key.partition("@")
        metric, _, plan = head.partition(".")
        variant = variant or v0
        base = result.baseline(variant)
        paper = ref[key]
        if metric == "speedup":
            others = [r for r in result.fixed(variant) if base is None or r.plan.name != base.plan.name]
            target = _find_fixed(result, plan, variant) if plan else (others[0] if others else None)
            pred = (target.tokens_per_s / base.tokens_per_s if target and base and target.metrics
                    and base.metrics and base.tokens_per_s > 0 else None)
            what = f"speedup {target.plan.name if target else plan} / {base.plan.name if base else '?'}"
            what += f" @{variant}" if variant != v0 else ""
            fmt = "{:.2f}x"
        else:
            target = _find_fixed(result, plan, variant)
            pred = target.metrics.get(metric) if target and target.metrics else None
            what, fmt = f"{metric} {plan}", ("{:,.0f}" if metric == "tokens_per_s" else "{:.4g}")
            what += f" @{variant}" if variant != v0 else ""
        err = (pred - paper) / paper if pred is not None and paper else None
        ok = err is not None and abs(err) <= TOLERANCE
        unc = unc_of(result, variant) if metric == "tokens_per_s" else None  # a band is on tokens/s only
        rows.append([what, fmt.format(paper), "-" if pred is None else fmt.format(pred) + (
                     f" ± {fmt_pct(unc)}" if unc is not None else ""),
                     "-" if err is None else f"{100 * err:+.1f} %", "yes" if ok else "**no**"])
        if not ok and target is not None:
            misses.append((what, err, target, base, paper if metric == "speedup" else 1.0))
    doc.h2("Predicted vs paper (the study's reference: published figures)")
    prof = result.variants[0].profile
    doc.p(f"Target: every figure within +-{TOLERANCE:.0%} of the paper, from public hardware numbers with "
          "no per-study fudge factor (efficiency constants live in the GPU preset and are shared by all studies). "
          f"Hardware profile `{prof.name}`: {prof.source or 'no source given'}.")
    doc.table(["figure", "paper", "predicted", "error", f"within +-{TOLERANCE:.0%}"], rows)
    for what, err, target, base, paper_speedup in misses:
        bd = breakdown_of(target.metrics)
        op_row = base if what.startswith("speedup") and base is not None and base.metrics else target
        ob = breakdown_of(op_row.metrics)
        total = sum(ob.values()) or 1.0
        parts = ", ".join(f"{LABELS[k]} {v:.3f} s ({100 * v / total:.0f} %)"
                          for k, v in sorted(ob.items(), key=lambda kv: -kv[1]) if v > 0)
        ops = ", ".join(f"`{n}` {1e3 * s:.2f} ms" for n, s in top_ops(details.get(op_row.index, {})))
        side = "unknown" if err is None else ("below" if err < 0 else "above")
        gap = "" if err is None else f" by {abs(100 * err):.1f} %"
        implied = ""
        if what.startswith("tokens_per_s") and err is not None and target.metrics:
            m = target.metrics
            step = m["step_time_s"] * (1 + err)
            implied = (f" The paper's figure implies a step of {step:.2f} s (predicted {m['step_time_s']:.2f} s, "
                       f"{step - m['step_time_s']:+.2f} s) and {100 * m['mfu'] / (1 + err):.1f} % MFU on this "
                       f"model shape (predicted {100 * m['mfu']:.1f} %).")
        if what.startswith("speedup") and base is not None and base.metrics and target.metrics:
            want = paper_speedup * target.step_time_s
            bb = breakdown_of(base.metrics)
            deltas = ", ".join(f"{LABELS[k]} {bb[k] - bd[k]:+.3f} s" for k in BREAKDOWN_KEYS if bb[k] or bd[k])
            implied = (f" For {paper_speedup:.2f}x over the predicted `{target.plan.name}` step "
                       f"({target.step_time_s:.2f} s) the baseline `{base.plan.name}` would need "
                       f"{want:.2f} s; it is predicted at {base.step_time_s:.2f} s "
                       f"({base.step_time_s - want:+.2f} s). Predicted baseline minus "
                       f"`{target.plan.name}` per part: {deltas}.")
        big = max(ob.items(), key=lambda kv: kv[1])[0] if ob else None
        doc.p(f"**{what}** is {side} the paper{gap}.{implied} The predicted step of `{op_row.plan.name}` is made "
              f"of: {parts or 'n/a'}; the largest component, {LABELS.get(big or '', 'n/a')}, dominates the error "
              f"budget. Heaviest ops of one layer of `{op_row.plan.name}` (per micro-batch): "
              f"{ops or 'n/a (simulator gave no per-op times)'}.")


def _diff(a: Row, b: Row) -> list[str]:
    da, db = a.plan.model_dump(mode="json"), b.plan.model_dump(mode="json")
    out = []
    for k in da:
        if k in ("name", "kind"):
            continue
        if isinstance(da[k], dict):
            out += [f"{k}.{kk}: {da[k][kk]} -> {db[k][kk]}" for kk in da[k] if da[k][kk] != db[k][kk]]
        elif da[k] != db[k]:
            out.append(f"{k}: {da[k]} -> {db[k]}")
    return out


def tie_words(result: SearchResult, best: Row) -> tuple[list[Row], str]:
    """The plans within the model's error of the winner (its variant's band) and one sentence on them."""
    unc = unc_of(result, best.variant)
    ties = tie_set(result.ranked(best.variant), unc)
    if unc is None:
        return ties, f"`{best.plan.name}` is predicted fastest; {NO_BAND}, so how close the runners-up are is unknown."
    if len(ties) == 1:
        return ties, (f"`{best.plan.name}` ({fmt_tokens(best.tokens_per_s, unc)}) is the winner: every other plan is "
                      f"predicted slower by more than the model's error (±{fmt_pct(unc)} at {fmt_conf(unc)}).")
    return ties, (f"**{len(ties)} plans within the model's error of the winner (±{fmt_pct(unc)} at "
                  f"{fmt_conf(unc)}): equally good candidates.** The model cannot order them; `{best.plan.name}` "
                  "is only the highest prediction among them: measure the candidates (`moeperf compare`) to choose.")


def ties_section(doc: Doc, result: SearchResult, best: Row) -> None:
    ties, sentence = tie_words(result, best)
    unc = unc_of(result, best.variant)
    doc.p(sentence + (f" The {describe(unc)}." if unc is not None else ""))
    if len(ties) > 1:
        doc.bullets([f"`{r.plan.name}`{f' [{r.variant}]' if len(result.variants) > 1 else ''}: "
                     f"{fmt_tokens(r.tokens_per_s, unc)} tokens/s, {100 * r.metrics['mfu']:.1f} % MFU, "
                     f"step {r.step_time_s:.3f} s" for r in ties[:MAX_TIES_LISTED]]
                    + ([f"... and {len(ties) - MAX_TIES_LISTED} more (`plans.csv` ranks them)"]
                       if len(ties) > MAX_TIES_LISTED else []))


def winner_section(doc: Doc, result: SearchResult, best: Row) -> None:
    base = result.baseline(best.variant)
    if base is None or not base.metrics:
        return
    tied = len(tie_set(result.ranked(best.variant), unc_of(result, best.variant))) > 1
    doc.h2(f"What made the {'top-ranked plan (one of the tied candidates) faster' if tied else 'winner win'} "
           f"(vs the baseline `{base.plan.name}`)")
    bw, bb = breakdown_of(best.metrics), breakdown_of(base.metrics)
    gain = base.step_time_s - best.step_time_s
    rows = []
    for k in BREAKDOWN_KEYS:
        d = bw[k] - bb[k]
        if bb[k] == 0 and bw[k] == 0:
            continue
        share = f"{100 * -d / gain:.0f} %" if gain > 0 else "-"
        rows.append([LABELS[k], f"{bb[k]:.3f}", f"{bw[k]:.3f}", f"{d:+.3f}", share])
    rows.append(["**step**", f"{base.step_time_s:.3f}", f"{best.step_time_s:.3f}", f"{-gain:+.3f}", "100 %"])
    doc.table(["part of the step (s)", base.plan.name, best.plan.name, "delta s", "share of the gain"], rows)
    ranked = sorted(((bw[k] - bb[k], k) for k in BREAKDOWN_KEYS), key=lambda t: (t[0], t[1]))
    biggest = [f"{LABELS[k]} {d:+.3f} s" for d, k in ranked if d < 0][:3]
    speed = best.tokens_per_s / base.tokens_per_s if base.tokens_per_s else float("nan")
    doc.p(f"`{best.plan.name}` runs {speed:.2f}x the baseline's tokens/s. The step shrinks mostly through: "
          f"{', '.join(biggest) or 'nothing (the baseline is as fast)'}.")
    changes = _diff(base, best)
    if changes:
        doc.p("Plan changes from the baseline to the winner:")
        doc.bullets([f"`{c}`" for c in changes])


def fill_sections(doc: Doc, result: SearchResult, best: Row | None, details: dict[int, dict[str, Any]],
                  images: list[tuple[str, str]], top: int, v0: Any) -> None:
    st = result.study
    multi = len(result.variants) > 1
    if st.description:
        doc.p(" ".join(st.description.split()))
    m, c = v0.model, v0.cluster
    gb = st.global_batch or (st.plans[0].global_batch if st.plans else 0)
    gpu = c.gpu if isinstance(c.gpu, str) else c.gpu.name
    doc.h2("Setup")
    doc.bullets([f"model `{m.name}`: {m.params_total / 1e9:.1f}B parameters, {m.params_active / 1e9:.1f}B active, "
                 f"{m.layers} layers, seq_len {m.seq_len}",
                 f"cluster `{c.name}`: {v0.world} GPUs ({c.nodes} x {c.gpus_per_node} {gpu}), "
                 f"{c.network.nics_per_node} x {c.network.nic_Gbps:g} Gb/s NICs per node",
                 f"global batch {gb} sequences = {gb * m.seq_len / 1e6:.2f} M tokens per iteration",
                 *([f"variants: {', '.join(f'`{v.name}`' for v in result.variants)}"] if multi else [])])
    doc.h2("Search")
    counts = ", ".join(f"{k}: {v}" for k, v in result.counts().items())
    doc.p(f"{len(result.rows)} plans ({len(result.fixed())} fixed, the rest from the search space"
          f"{f'; {result.merged} equivalent combinations merged' if result.merged else ''}). "
          f"Simulated: {result.evaluated}. By status: {counts}. Pruned and invalid plans are listed with "
          "their reason in `plans.csv`; bound-pruned plans provably cannot reach the top "
          f"{max(10, top)} (their compute alone is slower).")
    paper_section(doc, result, details)
    doc.h2("Fixed plans" + (" (per variant)" if multi else ""))
    doc.table((["variant"] if multi else []) + ROW_HEADERS,
              [([r.variant] if multi else []) + _row_cells(r, unc_of(result, r.variant)) for r in result.fixed()])
    doc.h2(f"Top {top} plans")
    ranked = result.ranked()
    if not ranked:
        doc.p("No plan was simulated successfully and fits in memory.")
    if best is not None:
        ties_section(doc, result, best)
    doc.table(["#"] + (["variant"] if multi else []) + ROW_HEADERS,
              [[i + 1] + ([r.variant] if multi else []) + _row_cells(r, unc_of(result, r.variant))
               for i, r in enumerate(ranked[:top])])
    if best is not None:
        winner_section(doc, result, best)
    if multi:
        doc.h2("Variants: best plan per what-if")
        first = result.ranked(result.variants[0].name)
        ref_tps = first[0].tokens_per_s if first else 0.0
        rows = []
        for v in result.variants:
            rk = result.ranked(v.name)
            b = rk[0] if rk else None
            unc = v.profile.uncertainty
            rows.append([v.name, b.plan.name if b else "-", fmt_tokens(b.tokens_per_s, unc) if b else "-",
                         f"{100 * b.metrics['mfu']:.1f}" if b else "-",
                         f"{b.tokens_per_s / ref_tps:.2f}x" if b and ref_tps else "-",
                         len(tie_set(rk, unc)) if b and unc is not None else "-"])
        doc.table(["variant", "best plan", "tokens/s", "MFU %", f"vs {result.variants[0].name}",
                   "plans within error of its best"], rows)
    doc.h2("Figures")
    for file, caption in images:
        doc.img(file, caption)
    doc.h2("Files")
    doc.bullets(["`plans.csv`: every plan with its fields, status, reason and predictions"]
                + ([f"`best_plan.yaml`: the {'winner' if len(tie_words(result, best)[0]) == 1 else 'highest prediction'}"
                    " (`moeperf simulate --plan`, `moeperf run --plan`)",
                    "`best_timeline.json`: the winner's simulated iteration (open in https://ui.perfetto.dev)"]
                   if best is not None else []))
