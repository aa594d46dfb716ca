"""Prediction fidelity against published training runs: the leave-one-out (LOO) error of every run.

For each run of the published-runs dataset (studies/published), the production constants are
fitted on all the OTHER runs (moeperf calibrate --published: per GPU family, least squares on
the log error) and the held-out run is simulated with them: its error is a prediction the run
did not inform. Prints one row per run, then the median and max absolute LOO error and Kendall's
tau between published and predicted tokens/s per GPU. Last line: loo_median_error_pct X.

usage: python benchmarks/fidelity.py [DIR] [--jobs N] [--fit-launch]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from perfmodel.calibrate.published_cli import calibrate_published


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default="studies/published")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--fit-launch", action="store_true", help="also fit the per-op launch overhead")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = calibrate_published(a.folder, Path(tmp), fit_launch=a.fit_launch, jobs=a.jobs)
    print(f"{'run':<50} {'source':<15} {'GPUs':>6} {'published tok/s':>16} {'LOO pred.':>12} {'LOO err':>8}")
    for r in res["runs"]:
        print(f"{r['name']:<50} {r['group']:<15} {r['gpus']:>6} {r['measured_tokens_per_s']:>16,.0f} "
              f"{r['loo_tokens_per_s']:>12,.0f} {r['loo_error_pct']:>+7.1f}%")
    for fam, c in res["constants"].items():
        print(f"constants {fam}: compute x{c['compute']:.4f}, fp8 x{c['compute_fp8']:.4f}, network x{c['fabric']:.4f}, "
              f"nvlink x{c['nvlink']:.4f}, launch {c['launch_us']:.2f} us per op")
    s = res["summary"]
    print(f"runs {s['runs']}, sources {s['groups']}")
    print(f"loo_max_error_pct {s['loo_max_error_pct']:.1f}")
    print(f"kendall_tau {s['kendall_tau']:.3f}")
    print(f"loo_median_error_pct {s['loo_median_error_pct']:.1f}")


if __name__ == "__main__":
    main()
