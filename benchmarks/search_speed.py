"""Plan-search speed on the default study (MegaScale-MoE 352B on 1,440 GPUs).

Runs the embedded default study's search (pruning on, all cores unless --jobs) and prints,
as its last line, `plans_per_s <simulated plans / wall seconds>`: simulated plans only
(pruned and invalid ones are reported apart, not counted). Wall time covers the whole
search: enumeration, layout checks, memory and bound pruning, simulation. The bar
(DESIGN.md section 5): >= 1,000 plans in <= 60 s on 2 cores, i.e. plans_per_s >= 17.

With --executor ray the plans are Ray tasks: Ray is started first (a local instance with
--jobs CPUs, or the cluster at --address), its start time printed apart and not counted, as
for a sweep that reuses one running cluster.

  python benchmarks/search_speed.py [--jobs N] [--executor local|ray [--address ADDR]] [--study FILE]
                                    [--report DIR]
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
    ap.add_argument("--executor", choices=("local", "ray"), default="local")
    ap.add_argument("--address", default=None, help="with --executor ray: a running Ray cluster")
    ap.add_argument("--report", default=None, metavar="DIR", help="also write the report here (not timed)")
    args = ap.parse_args(argv)

    from perfmodel.search import run_search
    from perfmodel.search.cli import load_study, study_variants

    study, path, _ = load_study(args.study)
    variants = study_variants(study, str(path), path.parent)
    if args.executor == "ray":
        import logging

        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        t0 = time.perf_counter()
        if args.address:
            ray.init(address=args.address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(num_cpus=args.jobs, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        print(f"ray start {time.perf_counter() - t0:.1f} s (not counted), {ray.cluster_resources().get('CPU')} CPUs")
    t0 = time.perf_counter()
    result = run_search(study, variants, jobs=args.jobs, executor=args.executor)
    wall = time.perf_counter() - t0
    print(f"study {study.name}: {len(result.rows)} plans, {result.evaluated} simulated in {wall:.1f} s "
          f"on {args.jobs} worker(s), executor {args.executor} (cpu_count {os.cpu_count()})")
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
