"""Published runs vs the simulator with the current presets (before any refit).

Loads every run of studies/published (perfmodel.published), turns its published figure into
training tokens/s of the whole cluster, simulates the run's plan on its cluster with the presets
as they are (perfmodel.sim.simulate), and prints one row per run: name, source group, measured
tokens/s, predicted tokens/s and the error (predicted / measured - 1). Last line: the median and
max absolute error over all runs.

usage: python benchmarks/published_runs.py [DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from perfmodel.atomic import write_text
from perfmodel.published import load_published, measured_tokens_per_s, resolve
from perfmodel.sim import simulate
from perfmodel.specs import SpecError

SHORT = {"tokens_per_s": "tok/s", "step_time_s": "step", "mfu": "mfu", "tflops_per_gpu": "tflops",
         "gpu_hours_per_trillion_tokens": "gpu-h/T"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default="studies/published")
    ap.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    try:
        runs = load_published(args.folder)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = []
    print(f"{'run':<46} {'group':<15} {'figure':<10} {'measured tok/s':>15} {'predicted tok/s':>16} {'error %':>8}")
    for i, run in enumerate(runs):
        t0 = time.perf_counter()
        model, cluster, plan = resolve(run, Path(args.folder))
        measured = measured_tokens_per_s(run, Path(args.folder))
        print(f"  [{i + 1}/{len(runs)}] simulating {run.name} ({cluster.world_size} GPUs) ...", file=sys.stderr, flush=True)
        res = simulate(model, cluster, plan)
        err = res.tokens_per_s / measured - 1
        rows.append({"name": run.name, "group": run.source.group, "figure": run.measured.figure,
                     "gpus": cluster.world_size, "measured_tokens_per_s": measured,
                     "predicted_tokens_per_s": res.tokens_per_s, "error": err, "fits": res.fits,
                     "sim_s": time.perf_counter() - t0})
        print(f"{run.name:<46} {run.source.group:<15} {SHORT[run.measured.figure]:<10} {measured:>15,.0f} "
              f"{res.tokens_per_s:>16,.0f} {100 * err:>+8.1f}{'' if res.fits else '  (does not fit memory)'}", flush=True)
    errs = [abs(r["error"]) for r in rows]
    groups = sorted({r["group"] for r in rows})
    print(f"runs {len(rows)}  groups {len(groups)}  median_abs_error_pct {100 * statistics.median(errs):.1f}  "
          f"max_abs_error_pct {100 * max(errs):.1f}")
    if args.json:
        write_text(args.json, json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
