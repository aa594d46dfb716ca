"""Time a cold and a warm `simulate` of the 352B MegaScale-MoE plan on 1,440 / 11,520 / 92,160 GPUs.

The plan is benchmarks/simulate_speed.py's (SP=8, EP=8, PP=6, overlap, FP8 dispatch, BF16 gradient
sync, selective recompute) on the megascale-1440 cluster with `nodes` scaled (180 / 1,440 / 11,520
nodes of 8 H800); the global batch scales with the world (one sequence per GPU: 48 micro-batches per
data-parallel replica at every size). Cold: the first call in a fresh interpreter (fabric, rank
groups, op graph and collective costs all unbuilt; imports excluded), one process per run. Warm: the
median of further calls in that process. Bar (issue 18): cold <= 2 s at 92,160 GPUs.
Last line: `cold_ms_at_92160 <median>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIZES = (1440, 11520, 92160)


def _child(world: int, warm_runs: int) -> None:
    from simulate_speed import PLAN  # this script's folder is on sys.path

    from perfmodel.sim import simulate
    from perfmodel.specs import load_spec, with_overrides

    model = load_spec("megascale-moe-352b", "model")
    base = load_spec("megascale-1440", "cluster")
    cluster = with_overrides(base, {"nodes": world // base.gpus_per_node}, "benchmark")
    plan = PLAN.model_copy(update={"global_batch": world})
    profile = cluster.profile()
    t0 = time.perf_counter()
    res = simulate(model, cluster, plan, profile)
    cold_ms = (time.perf_counter() - t0) * 1e3
    warm = []
    for _ in range(warm_runs):
        t = time.perf_counter()
        simulate(model, cluster, plan, profile)
        warm.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"cold_ms": cold_ms, "warm_ms": statistics.median(warm), "step_time_s": res.step_time_s,
                      "tokens_per_s": res.tokens_per_s}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per size (>= 3 for a median)")
    ap.add_argument("--warm", type=int, default=10, help="warm calls per process")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(a.child, a.warm)
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    last = None
    for world in a.sizes:
        rows = []
        for _ in range(a.runs):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(world),
                                  "--warm", str(a.warm)], cwd=root, env=env, check=True, capture_output=True,
                                 text=True, timeout=900)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        cold = [r["cold_ms"] for r in rows]
        warm = [r["warm_ms"] for r in rows]
        last = statistics.median(cold)
        print(f"{world:>6} GPUs: step {rows[0]['step_time_s']:.4f} s, {rows[0]['tokens_per_s'] / 1e6:.3f} M tokens/s; "
              f"cold {last:.0f} ms (min {min(cold):.0f}, max {max(cold):.0f}, {len(cold)} runs); "
              f"warm {statistics.median(warm):.1f} ms (min {min(warm):.1f}, max {max(warm):.1f})", flush=True)
    print(f"cold_ms_at_{a.sizes[-1]} {last:.0f}")


if __name__ == "__main__":
    main()
