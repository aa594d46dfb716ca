"""Predicted vs measured: `moeperf compare STUDY [--out DIR]`.

1. Every fixed plan of the study runs as real training on `world_size` local ranks (torchrun
   of runtime.train with `--profile-steps`), unless `traces/<study>/<plan>/` already holds its
   traces (`--rerun` forces new runs). `--repeats N` runs each plan N times, in rounds (every
   plan once per round, so slow drift of the host hits all plans alike), into `<plan>/`,
   `<plan>.r2/`, ...: the measured step time is the median over the repeats and the report gives
   their spread (on shared CPU cores one launch differs from the next by up to ~10 %).
2. The plans marked `calibrate: true` calibrate a profile (perfmodel.calibrate).
3. Every plan is simulated with that profile; the held-out plans are the test.
4. Written to DIR (default: beside the study, `<study>-compare/`): `per_step.csv`, `per_op.csv`
   (predicted, measured, error %), `summary.json` (median/max held-out step-time error,
   Kendall tau of the plan ranking), `report.md`, `profile.yaml` (+ fit PNGs),
   `pred_vs_measured.png`, `per_op_scatter.png` and `timeline.json`: the simulated and the
   measured timeline of one plan side by side (separate pids) for Perfetto.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from perfmodel import atomic
from perfmodel.argparse_util import parser
from perfmodel.calibrate import calibrate, profile_yaml
from perfmodel.calibrate.data import measured_step_s, on_world, stage_ops
from perfmodel.calibrate.trace_reader import RankTrace, read_meta, read_run
from perfmodel.compare.out import kendall_tau, write_outputs
from perfmodel.sim.opgraph import OpGraph
from perfmodel.sim.uncertainty import band_fields, block, describe, from_residuals
from perfmodel.specs import (
    ClusterSpec,
    ModelSpec,
    NamedPlan,
    PlanSpec,
    SpecError,
    StudySpec,
    UncertaintySpec,
    load_spec,
)
from perfmodel.specs.layout import plan_layout

REPO = Path(__file__).resolve().parents[2]


def study_specs(study: StudySpec) -> tuple[ModelSpec, ClusterSpec, int]:
    model = load_spec(study.model, "model")
    cluster = load_spec(study.cluster, "cluster")
    world = study.world_size or cluster.world_size
    return model, on_world(cluster, world, f"{study.name}: world_size"), world


def plan_of(study: StudySpec, p: NamedPlan) -> NamedPlan:
    return p.model_copy(update={"global_batch": study.global_batch}) if study.global_batch else p


def run_plan(model: ModelSpec, plan: NamedPlan, world: int, cluster: str, run_dir: Path, steps: int,
             profile_steps: str, timeout_s: float = 600.0) -> None:
    """Train `plan` on `world` local ranks for `steps` steps, tracing `profile_steps` into run_dir."""
    with tempfile.TemporaryDirectory(prefix="moeperf-compare-") as tmp:
        t = Path(tmp)
        (t / "model.yaml").write_text(yaml.safe_dump(model.model_dump(mode="json")))
        spec = {k: v for k, v in plan.model_dump(mode="json").items() if k != "calibrate"}
        (t / "plan.yaml").write_text(yaml.safe_dump({**spec, "kind": "plan"}))
        port = 29400 + (os.getpid() + hash(plan.name)) % 2000
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={port}", "-m", "runtime.train", "--model", str(t / "model.yaml"),
               "--plan", str(t / "plan.yaml"), "--steps", str(steps), "--out", str(t / "out"),
               "--profile-steps", profile_steps, "--trace-dir", str(run_dir), "--cluster", cluster]
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        run_dir.mkdir(parents=True, exist_ok=True)  # the run's own log travels with its traces
        atomic.write_text(run_dir / "train.log", proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"plan {plan.name}: training failed (exit {proc.returncode}): {' | '.join(tail)}")


def repeat_dirs(root: Path, plan: str, repeats: int) -> list[Path]:
    """A plan's run folders: `<plan>/`, then `<plan>.r2/`, `<plan>.r3/`, ... (siblings: a folder of
    runs given to `moeperf calibrate` expands to every repeat)."""
    return [root / plan] + [root / f"{plan}.r{k}" for k in range(2, repeats + 1)]


_DEFAULTS = {**PlanSpec().model_dump(mode="json"), "name": None}


def _differences(recorded: Any, expected: dict[str, Any]) -> list[str]:
    if not isinstance(recorded, dict):
        return ["(not recorded)"]
    # a field added after the traces were recorded reads as its default (a trace predating
    # `precision` was recorded in bf16, the default)
    return sorted(k for k in set(recorded) | set(expected)
                  if k != "calibrate" and k in recorded and recorded.get(k) != expected.get(k)
                  or k not in recorded and expected.get(k) != _DEFAULTS.get(k, object()))


def _filled(recorded: Any, cls: type[ModelSpec] | type[PlanSpec]) -> Any:
    """A recorded model or plan with the fields added since it was recorded (nested ones too, e.g.
    moe.expert_groups) at their defaults, which is what the run used; as recorded if it does not
    validate (then every differing key is named)."""
    if not isinstance(recorded, dict):
        return recorded
    try:
        return cls.model_validate(recorded).model_dump(mode="json")
    except ValueError:  # pydantic's ValidationError is a ValueError
        return recorded


def check_recorded(run_dir: Path, model: ModelSpec, plan: NamedPlan, world: int) -> None:
    """Refuse traces recorded from another model, plan or world size than the study's (naming what differs)."""
    meta = read_meta(run_dir)
    want_plan = {k: v for k, v in plan.model_dump(mode="json").items() if k != "calibrate"}
    got_plan = meta.get("plan")
    if isinstance(got_plan, dict):
        got_plan = {k: v for k, v in got_plan.items() if k != "calibrate"}
    for what, got, want in (("model", _filled(meta.get("model"), ModelSpec), model.model_dump(mode="json")),
                            ("plan", _filled(got_plan, PlanSpec), want_plan)):
        diff = _differences(got, want)
        if diff:
            raise SpecError(f"{run_dir}/meta.yaml: recorded with a different {what} than the study's "
                            f"{plan.name!r} ({what}.{', '.join(diff[:4])} differ); pass --rerun or remove {run_dir}")
    if meta.get("world_size") != world:
        raise SpecError(f"{run_dir}/meta.yaml: recorded on world_size {meta.get('world_size')!r}, the study "
                        f"runs {world} ranks; pass --rerun or remove {run_dir}")


def _profile_steps(arg: str, steps: int) -> None:
    try:
        a, b = (int(x) for x in str(arg).split(":"))
    except ValueError:
        raise SpecError(f"--profile-steps: expected A:B (e.g. 5:6), got {arg!r}") from None
    if not 1 <= a <= b <= steps:
        raise SpecError(f"--profile-steps: need 1 <= A <= B <= --steps ({steps}), got {arg!r}")


def measured_ops(model: ModelSpec, plan: NamedPlan, world: int, traces: list[RankTrace],
                 us_per_event: float = 0.0) -> dict[str, float]:
    """Seconds per instance of each op event of a layer (mean over the ranks of stage 0), less the
    profiler's cost per event (the calibration's `profiler_us_per_event`)."""
    graph = OpGraph(model, plan, world)
    ops = stage_ops(graph, 0)
    per: dict[str, list[float]] = {}
    stage0 = traces if plan.pp == 1 else traces[: max(1, len(traces) // plan.pp)]
    for tr in stage0:
        for ev, sec in tr.op_seconds_per_step(us_per_event).items():
            if ev in ops and ops[ev][1] > 0:
                per.setdefault(ev, []).append(sec / ops[ev][1])
    return {ev: statistics.fmean(v) for ev, v in per.items()}


def _mean_ops(per_repeat: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in per_repeat for k in d}
    return {k: statistics.fmean(d[k] for d in per_repeat if k in d) for k in keys}


def compare(study_path: str, out: Path | None = None, traces_root: Path | None = None, steps: int = 8,
            profile_steps: str = "5:6", rerun: bool = False, timeline_plan: str | None = None,
            log=print, repeats: int = 1, run_only: bool = False) -> dict[str, Any]:
    from perfmodel.sim import simulate
    from perfmodel.sim.layer import as_executed

    study = load_spec(study_path, "study")
    model, cluster, world = study_specs(study)
    cluster_ref = study.cluster if isinstance(study.cluster, str) else cluster.name
    traces_root = traces_root or REPO / "traces"
    out = out or Path(study_path).with_name(f"{Path(study_path).stem}-compare")
    plans = [plan_of(study, p) for p in study.plans]
    if not run_only and not any(p.calibrate for p in plans):
        raise SpecError(f"{study_path}: plans: no plan has calibrate: true (nothing to calibrate on)")
    if timeline_plan is not None and timeline_plan not in {p.name for p in plans}:
        raise SpecError(f"--timeline-plan: {timeline_plan!r} is not a plan of {study_path}")
    for p in plans:  # every plan must lay out on the world before anything runs
        try:
            plan_layout(p, model, world)
        except SpecError as exc:
            raise SpecError(f"{study_path}: plan {p.name!r}: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails now (exit 1), not after the runs
    dirs = {p.name: repeat_dirs(traces_root / study.name, p.name, repeats) for p in plans}
    for p in plans:  # recorded traces must be of this model, plan and world size
        for d in dirs[p.name]:
            if not rerun and (d / "meta.yaml").is_file():
                check_recorded(d, model, p, world)
    failed: dict[str, str] = {}
    for k in range(repeats):  # in rounds: every plan once per round
        for p in plans:
            d = dirs[p.name][k]
            if p.name in failed or not (rerun or not (d / "meta.yaml").is_file()):
                continue
            log(f"running {p.name} on {world} ranks{f' (repeat {k + 1} of {repeats})' if repeats > 1 else ''} ...")
            try:
                run_plan(model, p, world, cluster_ref, d, steps, profile_steps)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                failed[p.name] = str(exc)
                log(f"  {exc}")
    runs = {p.name: dirs[p.name] for p in plans if p.name not in failed}
    if run_only:  # record here (a GPU host), compare anywhere later: the traces are the result
        return {"study": study.name, "traces": str(traces_root / study.name), "recorded": sorted(runs),
                "failed": failed}
    cal = [d for p in plans if p.calibrate and p.name in runs for d in runs[p.name]]
    if not cal:
        raise RuntimeError("every calibration plan failed to run: " + "; ".join(failed.values()))
    profile, _ = calibrate(cal, out / "profile.yaml")
    rows, op_rows, timelines = [], [], {}
    pick = timeline_plan or next((p.name for p in plans if not p.calibrate and p.name in runs), None)
    for p in plans:
        if p.name not in runs:
            continue
        reads = [read_run(d) for d in runs[p.name]]
        per_repeat = [measured_step_s(meta, traces) for meta, traces in reads]
        measured = statistics.median(per_repeat)
        spread = 100.0 * (max(per_repeat) - min(per_repeat)) / measured if measured > 0 else 0.0
        # priced as the runtime ran it (tile as chunk, gradient sync after backward: perfmodel.sim.layer.as_executed)
        executed = p.model_copy(update={"overlap": as_executed(p.overlap)})
        sim = simulate(model, cluster, executed, profile, trace=p.name == pick)
        err = 100.0 * (sim.step_time_s - measured) / measured if measured > 0 else float("nan")
        rows.append({"plan": p.name, "held_out": not p.calibrate, "predicted_s": sim.step_time_s,
                     "measured_s": measured, "error_pct": err, "repeats": len(reads), "measured_spread_pct": spread,
                     "predicted_tokens_per_s": sim.tokens_per_s,
                     "measured_tokens_per_s": sim.tokens_per_s * sim.step_time_s / measured if measured > 0 else 0.0})
        pred_ops = sim.details.get("layer_ops", {}) or {}
        cost = profile.residuals.get("profiler_us_per_event", 0.0)
        ops = _mean_ops([measured_ops(model, p, world, traces, cost) for _meta, traces in reads])
        per_step = {ev: n for ev, (_op, n) in stage_ops(OpGraph(model, p, world), 0).items()}
        for ev, m in sorted(ops.items()):
            if ev in pred_ops and m > 0:
                op_rows.append({"plan": p.name, "held_out": not p.calibrate, "event": ev,
                                 "predicted_us": pred_ops[ev] * 1e6, "measured_us": m * 1e6,
                                 "error_pct": 100.0 * (pred_ops[ev] - m) / m, "per_step": per_step.get(ev, 0.0)})
        if p.name == pick:
            timelines = {"plan": p.name, "sim": sim.timeline, "measured": reads[0][1]}
        log(f"  {p.name:<18} predicted {sim.step_time_s * 1e3:8.1f} ms  measured {measured * 1e3:8.1f} ms  "
            f"error {err:+6.1f} %{'' if p.calibrate else '  (held out)'}"
            f"{f'  (spread of {len(reads)} runs {spread:.1f} %)' if len(reads) > 1 else ''}")
    # the calibrated profile's own error band, from its out-of-sample (held-out) residuals
    unc, band_note = held_out_band(rows, study.name)
    if unc is not None:
        profile = profile.model_copy(update={"uncertainty": unc})
        atomic.write_text(out / "profile.yaml", profile_yaml(profile))
    for r in rows:
        r.update(band_fields(r["predicted_tokens_per_s"], unc))
    log(f"  {band_note}")
    held = [r for r in rows if r["held_out"]]
    errs = [abs(r["error_pct"]) for r in held]
    summary = {
        "study": study.name, "world_size": world, "profile": str(out / "profile.yaml"),
        "host_us_per_op": profile.host_us_per_op,
        "calibrated_on": [p.name for p in plans if p.calibrate and p.name in runs],
        "held_out": [r["plan"] for r in held], "failed": failed, "repeats": repeats,
        "measured_spread_pct_median": statistics.median(r["measured_spread_pct"] for r in rows) if rows else 0.0,
        "median_error_pct": statistics.median(errs) if errs else float("nan"),
        "max_error_pct": max(errs) if errs else float("nan"),
        "kendall_tau": kendall_tau([r["predicted_s"] for r in held], [r["measured_s"] for r in held]),
        "kendall_tau_all": kendall_tau([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows]),
        "bars": {"median_error_pct": 10.0, "max_error_pct": 20.0, "kendall_tau": 0.8},
        "uncertainty": block(unc), "band": band_note,
    }
    write_outputs(out, rows, op_rows, summary, timelines)
    return summary


def held_out_band(rows: list[dict[str, Any]], study_name: str) -> tuple[UncertaintySpec | None, str]:
    """The band of a profile calibrated by `compare`, from its held-out plans' log residuals
    ln(predicted / measured tokens/s) = ln(measured / predicted step time), and one line on it
    (why there is none: fewer than 2 held-out plans measured)."""
    res = [math.log(r["measured_s"] / r["predicted_s"]) for r in rows
           if r["held_out"] and r["measured_s"] > 0 and r["predicted_s"] > 0]
    unc = from_residuals(res, f"held-out plans of moeperf compare {study_name}")
    if unc is None:
        return None, (f"no error band: {len(res)} held-out plan(s) measured, a band needs >= 2 held-out "
                      "residuals (mark fewer plans calibrate: true)")
    return unc, describe(unc)


def main(argv: list[str]) -> int:
    ap = parser("compare", "run (or read traces of) a study's plans, calibrate on some, predict the rest")
    ap.add_argument("study", metavar="STUDY")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default <study>-compare beside it)")
    ap.add_argument("--traces", type=Path, default=None, help="traces root (default ./traces of the repo)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile-steps", default="5:6")
    ap.add_argument("--rerun", action="store_true", help="run every plan even if its traces exist")
    ap.add_argument("--repeats", type=int, default=1, help="runs per plan (median step time; spread reported)")
    ap.add_argument("--timeline-plan", default=None, help="plan whose timelines go to timeline.json")
    ap.add_argument("--run-only", action="store_true",
                    help="only run the plans and record their traces (compare later, on any host)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not 1 <= a.steps <= 10**6:
        raise SpecError(f"--steps: {a.steps} must be between 1 and 1000000")
    if not 1 <= a.repeats <= 20:
        raise SpecError(f"--repeats: {a.repeats} must be between 1 and 20")
    _profile_steps(a.profile_steps, a.steps)
    for flag, path in (("--out", a.out), ("--traces", a.traces)):
        if path is not None and path.exists() and not path.is_dir():
            raise SpecError(f"{flag}: {path} exists and is not a folder")
    quiet = (lambda *_a, **_k: None) if a.json else print
    summary = compare(a.study, a.out, a.traces, a.steps, a.profile_steps, a.rerun, a.timeline_plan, log=quiet,
                      repeats=a.repeats, run_only=a.run_only)
    if a.json or a.run_only:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(f"held-out step-time error: median {summary['median_error_pct']:.1f} %, max "
              f"{summary['max_error_pct']:.1f} %; Kendall tau {summary['kendall_tau']:.2f}")
        print(f"profile tokens/s: {summary['band']}")
    return 0
