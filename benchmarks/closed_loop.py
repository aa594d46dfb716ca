"""Closed loop on this host: run every plan of studies/local-cpu-4.yaml for real (4 gloo ranks),
calibrate on the plans marked calibrate: true, predict the held-out ones, and compare.

    python benchmarks/closed_loop.py [--study studies/local-cpu-4.yaml] [--traces DIR] [--reuse] [--repeats 3]

Results go to benchmarks/results/closed_loop/ (summary.json, per_step.csv, per_op.csv, report.md,
profile.yaml, figures, timeline.json). Traces go to a temporary folder unless --traces is given
(--reuse then reads traces already there instead of rerunning). The last line printed is
`median_error_pct <held-out median step-time error>`; bars: median <= 10 %, max <= 20 %, tau >= 0.8.
Each plan runs --repeats times in rounds (one launch on shared cores differs from the next by up
to ~10 %, enough to reorder plans 5 % apart); the measured step time is the median of the runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from perfmodel.compare import compare  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=str(ROOT / "studies" / "local-cpu-4.yaml"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "closed_loop")
    ap.add_argument("--traces", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="read traces already under --traces")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--profile-steps", default="5:6")
    ap.add_argument("--repeats", type=int, default=3, help="runs per plan, in rounds (median step time)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moeperf-traces-") as tmp:
        traces = a.traces or Path(tmp)
        s = compare(a.study, a.out, traces, a.steps, a.profile_steps, rerun=not a.reuse, repeats=a.repeats)
    print(f"study {s['study']}: {len(s['held_out'])} held-out plans, calibrated on {', '.join(s['calibrated_on'])}"
          f"{'; FAILED: ' + ', '.join(s['failed']) if s['failed'] else ''}")
    print(f"max_error_pct {s['max_error_pct']:.2f}   (bar 20)")
    print(f"kendall_tau {s['kendall_tau']:.3f}   (bar 0.8; all plans {s['kendall_tau_all']:.3f})")
    print(f"measured_spread_pct {s['measured_spread_pct_median']:.1f}   (median over plans of the spread of {a.repeats} runs)")
    print(f"wall_s {time.perf_counter() - t0:.0f}   results in {a.out}")
    print(f"median_error_pct {s['median_error_pct']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
