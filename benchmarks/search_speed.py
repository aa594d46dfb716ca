"""Plan-search speed on the default study (MegaScale-MoE 352B on 1,440 GPUs).

Runs the embedded default study's search (pruning on, all cores unless --jobs) and prints,
as its last line, `plans_per_s <simulated plans / wall seconds>`: simulated plans only
(pruned and invalid ones are reported apart, not counted). Wall time covers the whole
search: enumeration, layout checks, memory and bound pruning, simulation. The bar
(DESIGN.md section 5): >= 1,000 plans in <= 60 s on 2 cores, i.e. plans_per_s >= 17.

  python benchmarks/search_speed.py [--jobs N] [--study FILE] [--report DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--study", default=None, help="study YAML (default: the embedded default study)")
    ap.add_argument("--report", default=None, metavar="DIR", help="also write the report here (not timed)")
    args = ap.parse_args(argv)

    from perfmodel.search import run_search
    from perfmodel.search.cli import load_study, study_variants

    study, path, _ = load_study(args.study)
    variants = study_variants(study, str(path), path.parent)
    t0 = time.perf_counter()
    result = run_search(study, variants, jobs=args.jobs)
    wall = time.perf_counter() - t0
    print(f"study {study.name}: {len(result.rows)} plans, {result.evaluated} simulated in {wall:.1f} s "
          f"on {args.jobs} worker(s) (cpu_count {os.cpu_count()})")
    print("by status: " + ", ".join(f"{k} {v}" for k, v in result.counts().items()))
    best = result.ranked()[:1]
    if best:
        print(f"best: {best[0].plan.name} {best[0].tokens_per_s / 1e6:.3f} M tokens/s")
    if args.report:
        from perfmodel.report import write_report

        write_report(result, args.report)
        print(f"report: {args.report}")
    print(f"plans_per_s {result.evaluated / wall:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
