"""`moeperf simulate`: one plan, or every fixed plan of a study.

  moeperf simulate --model M --cluster C --plan P [--profile F] [--trace out.json] [--json]
  moeperf simulate STUDY [--json]

Model, cluster and profile refs are preset names or paths (in a study: relative to the
study file's folder, else to the working directory). A study's global_batch overrides its
plans'. Bad input raises SpecError (exit 2 through perfmodel.cli).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from perfmodel.argparse_util import parser
from perfmodel.specs import SpecError, Strict, load_spec


def resolve(ref: Any, kind: str, base: Path | None = None) -> Any:
    """A spec object, preset name, or path (tried relative to `base` first)."""
    if isinstance(ref, Strict):
        return ref
    if base is not None and (base / str(ref)).is_file():
        return load_spec(str(base / str(ref)), kind)
    return load_spec(str(ref), kind)


def _study_jobs(path: str) -> list[tuple[Any, Any, Any, Any]]:
    study = load_spec(path, "study")
    base = Path(path).parent
    model = resolve(study.model, "model", base)
    cluster = resolve(study.cluster, "cluster", base)
    if study.world_size:  # a runtime study (moeperf compare) runs on world_size ranks of the cluster
        from perfmodel.calibrate.data import on_world

        cluster = on_world(cluster, study.world_size, f"{path}: world_size")
    profile = resolve(study.profile, "profile", base) if study.profile is not None else None
    jobs = []
    for p in study.plans:
        plan = p.model_copy(update={"global_batch": study.global_batch}) if study.global_batch else p
        jobs.append((model, cluster, plan, profile))
    if not jobs:
        raise SpecError(f"{path}: the study has no fixed plans (plans:) to simulate")
    return jobs


def _table(results: list[Any], bands: list[Any]) -> None:
    from perfmodel.sim.uncertainty import describe, fmt_tokens

    cols = ["plan", "step s", "tokens/s", "MFU", "compute s", "exp. comm s", "bubble s", "grad sync s",
            "optim s", "mem GiB", "fits"]
    rows = []
    for r, unc in zip(results, bands, strict=True):
        b = r.breakdown
        mem = r.memory_GiB.get("total")
        rows.append([r.name, f"{r.step_time_s:.3f}", fmt_tokens(r.tokens_per_s, unc), f"{r.mfu:.1%}",
                     f"{b['compute_s']:.3f}", f"{b['exposed_comm_s']:.3f}", f"{b['bubble_s']:.3f}",
                     f"{b['grad_sync_s']:.3f}", f"{b['optimizer_s']:.3f}",
                     "-" if mem is None else f"{mem:.1f}/{r.memory_GiB.get('capacity', 0):.1f}",
                     "yes" if r.fits else "NO"])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print("  ".join(cols))
        for row in rows:
            print("  ".join(row))
    else:
        t = Table(title="moeperf simulate: one training iteration")
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i == 0 else "right")
        for row in rows:
            t.add_row(*row)
        Console(width=160).print(t)
    for note in dict.fromkeys(describe(unc) for unc in bands):  # one line per distinct profile band
        print(f"tokens/s: {note}")


def main(argv: list[str]) -> int:
    ap = parser("simulate", "simulate one training iteration of a plan, or every fixed plan of a study")
    ap.add_argument("study", nargs="?", help="a study YAML: simulate each of its fixed plans")
    ap.add_argument("--model", help="model preset name or YAML path")
    ap.add_argument("--cluster", help="cluster preset name or YAML path")
    ap.add_argument("--plan", help="plan YAML path")
    ap.add_argument("--profile", help="hardware profile (preset name or YAML; default: the cluster's GPU)")
    ap.add_argument("--trace", help="write the simulated timeline as Chrome trace JSON (Perfetto)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    a = ap.parse_args(argv)
    if a.trace and os.path.isdir(a.trace):
        raise SpecError(f"--trace {a.trace}: is a folder; name the JSON file to write")
    from perfmodel.sim import simulate

    if a.study:
        if a.model or a.cluster or a.plan or a.profile or a.trace:
            raise SpecError("moeperf simulate: give either STUDY or --model/--cluster/--plan, not both "
                            "(--trace needs a single plan)")
        jobs = _study_jobs(a.study)
    else:
        missing = [f"--{k}" for k in ("model", "cluster", "plan") if not getattr(a, k)]
        if missing:
            raise SpecError(f"moeperf simulate: missing {', '.join(missing)} (or give a STUDY file)")
        profile = load_spec(a.profile, "profile") if a.profile else None
        jobs = [(load_spec(a.model, "model"), load_spec(a.cluster, "cluster"), load_spec(a.plan, "plan"), profile)]
    results = []
    for model, cluster, plan, profile in jobs:
        try:
            results.append(simulate(model, cluster, plan, profile, trace=bool(a.trace)))
        except SpecError as exc:
            raise SpecError(f"plan {plan.name!r}: {exc}" if a.study else str(exc)) from None
    if a.trace:
        from perfmodel.sim.chrometrace import write_chrome_trace

        r = results[0]
        write_chrome_trace(a.trace, r.timeline, {"plan": r.name, "step_time_s": r.step_time_s})
    if a.json:
        out: Any = [r.to_json() for r in results] if a.study else results[0].to_json()
        sys.stdout.write(json.dumps(out, indent=1, sort_keys=True) + "\n")
    else:
        _table(results, [(profile or cluster.profile()).uncertainty for _m, cluster, _p, profile in jobs])
        if a.trace:
            print(f"trace: {a.trace}")
    return 0
