"""`moeperf search [STUDY] [--out DIR] [--jobs N] [--executor local|ray [--address ADDR]] [--json]
[--quiet] [--top K]`.

STUDY is a study YAML path or the name of a packaged study; without it the embedded
default study runs. The default study lives ONCE, as package data, at
`perfmodel/presets/studies/megascale-moe-352b.yaml` (so `moeperf search` works from any
directory after `pip install .`); `studies/megascale-moe-352b.yaml` in the repository is a
symlink to it, so both paths name the same file.

The report goes to --out, by default `<folder of the study>/<study name>/` (for the
embedded default: `./studies/<study name>/` under the working directory).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from perfmodel.argparse_util import parser
from perfmodel.search import VariantParts
from perfmodel.search.executors import EXECUTORS, ExecutorError, require_ray
from perfmodel.specs import PRESET_DIR, SpecError, StudySpec, with_overrides
from perfmodel.specs.validate import check_study, cluster_profile, validate_file

STUDY_DIR = PRESET_DIR / "studies"
DEFAULT_STUDY = "megascale-moe-352b"


def packaged_studies() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def resolve_study(ref: str | None) -> tuple[Path, bool]:
    """(path of the study file, whether it is a packaged study rather than a user's file)."""
    if ref is None:
        return STUDY_DIR / f"{DEFAULT_STUDY}.yaml", True
    p = Path(ref)
    if p.is_file():
        return p, False
    if p.is_dir():
        raise SpecError(f"{ref}: is a directory; pass a study YAML file")
    packaged = STUDY_DIR / f"{ref}.yaml"
    if "/" not in ref and packaged.is_file():
        return packaged, True
    raise SpecError(f"{ref}: no such study file (packaged studies: {', '.join(packaged_studies())})")


def load_study(ref: str | None) -> tuple[StudySpec, Path, bool]:
    path, packaged = resolve_study(ref)
    study = validate_file(str(path), "study")
    assert isinstance(study, StudySpec)
    return study, path, packaged


# --------------------------------------------------------------------------- studies
def study_variants(study: StudySpec, where: str, base: Path | None = None) -> list[VariantParts]:
    """The study's model/cluster/profile (checked), then one VariantParts per what-if variant
    (or the study itself, named "base", when it has none)."""
    parts = check_study(study, where, base)
    if not study.variants:
        return [VariantParts("base", parts.model, parts.cluster, parts.profile, parts.world)]
    out = []
    for i, var in enumerate(study.variants):
        label = f"{where}: study.variants[{i}] ({var.name})"
        model = with_overrides(parts.model, var.model, label)
        cluster = with_overrides(parts.cluster, var.cluster, label)
        profile = parts.profile
        if "gpu" in var.cluster:
            profile = cluster_profile(cluster, label, base)
        elif study.profile is None and cluster.gpu != parts.cluster.gpu:
            profile = cluster_profile(cluster, label, base)
        world = study.world_size or cluster.world_size
        out.append(VariantParts(var.name, model, cluster, profile, world))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise SpecError(f"{where}: study.variants: names must be unique, got {names}")
    return out


def default_out(study: StudySpec, path: Path, packaged: bool) -> Path:
    return (Path.cwd() / "studies" if packaged else path.parent) / study.name


def _progress(quiet: bool):
    """A rich progress bar on stderr (a no-op when quiet or not a terminal)."""
    if quiet or not sys.stderr.isatty():
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("searching"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)
    task = prog.add_task("search", total=None)

    def update(done: int, total: int) -> None:
        prog.update(task, completed=done, total=total)

    return prog, update


def _print_table(result, top: int, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from perfmodel.report import fmt_row

    multi = len(result.variants) > 1
    table = Table(title=f"{result.study.name}: top {top} of {result.evaluated} simulated plans "
                        f"({', '.join(f'{k} {v}' for k, v in result.counts().items())})")
    cols = ["#"] + (["variant"] if multi else []) + ["plan", "tokens/s", "MFU", "step s", "mem GiB"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("plan", "variant") else "right", no_wrap=True)
    shown = result.ranked()[:top]
    fixed = [r for r in result.fixed() if r not in shown]
    for i, row in enumerate(shown + fixed):
        f = fmt_row(row, result)
        label = str(i + 1) if i < len(shown) else ("base" if row.plan.name == result.study.baseline else "fixed")
        table.add_row(label, *([row.variant] if multi else []), f["name"], f["tokens_per_s"], f["mfu"],
                      f["step_time_s"], f["memory_GiB"])
    console = Console(width=max(150, Console().width))
    console.print(table)
    print(f"searched in {result.wall_s:.1f} s ({result.evaluated / max(result.wall_s, 1e-9):.1f} simulated plans/s)")
    if shown:
        from perfmodel.report.doc import tie_words

        ties, sentence = tie_words(result, shown[0])
        print(sentence.replace("**", "").replace("`", ""))
        if len(ties) > 1:
            print("  candidates: " + ", ".join(r.plan.name for r in ties))
    if not shown:
        print("no plan was simulated successfully and fits in memory: plans.csv gives each plan's status and reason")
        print(f"report: {out / 'report.html'} (and report.md, plans.csv)")
    else:
        print(f"report: {out / 'report.html'} (and report.md, plans.csv, best_plan.yaml, best_timeline.json)")


def main(argv: list[str]) -> int:
    ap = parser("search", "Search a study's plan space and write a ranked report (plans.csv, report.md, "
                "report.html, figures, best_plan.yaml, best_timeline.json).")
    ap.add_argument("study", nargs="?", metavar="STUDY",
                    help=f"study YAML or packaged study name (default: the embedded {DEFAULT_STUDY})")
    ap.add_argument("--out", metavar="DIR", help="report folder (default: <study folder>/<study name>/)")
    ap.add_argument("--jobs", type=int, default=None, metavar="N", help="worker processes (default: all cores)")
    ap.add_argument("--executor", choices=EXECUTORS, default="local",
                    help="local: a process pool of --jobs workers (default); ray: Ray tasks "
                    "(pip install 'moeperf[distributed]')")
    ap.add_argument("--address", metavar="ADDR", default=None,
                    help="with --executor ray: a running Ray cluster (HOST:PORT, ray://HOST:PORT or auto); "
                    "default: start a local one with --jobs CPUs")
    ap.add_argument("--top", type=int, default=10, metavar="K", help="plans shown and kept safe from pruning (10)")
    ap.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.jobs is not None and not 1 <= args.jobs <= 1024:
        raise SpecError(f"moeperf search: --jobs must be between 1 and 1024, got {args.jobs}")
    if args.address is not None and args.executor != "ray":
        raise SpecError("moeperf search: --address needs --executor ray")
    if args.address is not None and args.jobs is not None:
        raise SpecError("moeperf search: --jobs sizes a local run; the Ray cluster at --address has its own CPUs")
    if args.executor == "ray":
        require_ray(args.address)  # not installed or a malformed address: exit 2 before any work
    if not 1 <= args.top <= 10_000:
        raise SpecError(f"moeperf search: --top must be between 1 and 10000, got {args.top}")
    study, path, packaged = load_study(args.study)
    if study.search is None and not study.plans:
        raise SpecError(f"{path}: study has neither plans: nor search:")
    out = Path(args.out) if args.out else default_out(study, path, packaged)
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {out}: exists and is not a directory")

    from perfmodel import outlock
    from perfmodel.report import summary_json, write_report
    from perfmodel.search import run_search

    variants = study_variants(study, str(path), path.parent)
    with outlock.acquire(out, "search"):  # a second search/run on this --out refuses at once (exit 1)
        prog, update = _progress(args.quiet or args.json)
        jobs = args.jobs or ((os.cpu_count() or 1) if args.executor == "local" else None)
        run = dict(jobs=jobs, keep_top=max(10, args.top), executor=args.executor, address=args.address)
        try:
            if prog is not None:
                with prog:
                    result = run_search(study, variants, progress=update, **run)
            else:
                result = run_search(study, variants, **run)
        except ExecutorError as exc:  # the environment failed, not the input: exit 1
            print(f"moeperf search: error: {exc}", file=sys.stderr)
            return 1
        write_report(result, out, top=args.top)
    errors = result.counts().get("error", 0)
    if errors:
        print(f"moeperf search: warning: the simulator failed on {errors} plan(s); plans.csv has their "
              "status 'error' and the message", file=sys.stderr)
    if args.json:
        print(json.dumps(summary_json(result, out, args.top), indent=1, sort_keys=True))
    else:
        _print_table(result, args.top, out)
    return 0
