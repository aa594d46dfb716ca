"""Throughput of tiny-moe on 4 CPU ranks (gloo) for each parallel-equivalence plan.

    python benchmarks/runtime_plans.py [--steps N] [--seq-len S] [--plans dp4,ep4,...]

Each plan runs as a real `moeperf run` (torchrun, 4 ranks, OMP_NUM_THREADS=1, synthetic data);
tokens/s is the launcher's summary (steps after the first). Prints one line per plan, then
`plans_run <n>`. Absolute numbers depend on the machine; compare plans within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLANS = {
    "dp4": "",
    "ep4": "ep: 4\n",
    "sp2_ep2": "sp: 2\nep: 2\n",
    "dp2_ep2": "ep: 2\n",
    "tp2_dp2": "tp: 2\n",
    "pp2_dp2": "pp: 2\n",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--plans", default=",".join(PLANS))
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.plans.split(","):
            plan = Path(tmp) / f"{name}.yaml"
            plan.write_text(f"kind: plan\nname: {name}\nglobal_batch: {a.global_batch}\nmicro_batch: 1\n{PLANS[name]}")
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "perfmodel.cli", "run", "--model", "tiny-moe", "--plan", str(plan),
                   "--nproc", "4", "--steps", str(a.steps), "--seq-len", str(a.seq_len), "--out", str(out)]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                print(f"{name:10s} FAILED: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
                continue
            s = json.loads((out / "summary.json").read_text())
            print(f"{name:10s} tokens_per_s {s['tokens_per_s']:9.0f}  step_time_s {s['step_time_s']:.3f}  "
                  f"loss {s['final_loss']:.4f}", flush=True)
            n += 1
    print(f"plans_run {n}")
    return 0 if n == len(a.plans.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
