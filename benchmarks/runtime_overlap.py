"""Overlap and compression executed by the runtime: tokens/s of one plan on 4 CPU ranks (gloo).

    python benchmarks/runtime_overlap.py [--steps N] [--hidden H] [--seq-len S] [--rounds R]

Plan: tiny-moe widened (hidden/expert FFN x2 by default) so the token all-to-all matters, ep=4 on
4 ranks (dp=4 for the dense weights), global batch 8, micro-batch 2. Configurations, all in one
torchrun launch (same process group, interleaved over --rounds so machine drift hits all alike):
overlap none / inter_op (halves + shared expert under dispatch + deferred expert wgrad) /
chunk (intra_op, 4 token chunks), each with compression off (fp32 wire on CPU) and on (fp8
dispatch/combine, bf16 grad sync). tokens/s = global tokens / median step time (first step of
each round dropped). Prints one line per configuration, then `overlap_speedup X`:
the best overlap configuration over the no-overlap one with the same compression.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERLAP = {"none": {}, "inter_op": {"inter_op": True}, "chunk": {"intra_op": "chunk", "chunks": 4}}
COMPRESSION = {"off": {}, "fp8+bf16": {"dispatch": "fp8", "combine": "fp8", "grad_sync": "bf16"}}


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="steps per configuration and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def worker(a) -> None:
    import torch.distributed as dist

    from perfmodel.specs import ModelSpec, PlanSpec, load_spec
    from runtime.groups import build_parallel
    from runtime.train import TrainConfig, init_distributed, train

    base = load_spec("tiny-moe", "model").model_dump(mode="python")
    base.update(hidden=a.hidden, head_dim=a.hidden // 4, seq_len=a.seq_len, name="tiny-moe-wide")
    base["moe"]["expert_ffn_hidden"] = 2 * a.hidden
    model = ModelSpec.model_validate(base)
    rank, world, device = init_distributed(300)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.rounds):
        for ov_name, ov in OVERLAP.items():
            for c_name, comp in COMPRESSION.items():
                plan = PlanSpec(name=f"{ov_name}-{c_name}", ep=4, global_batch=8, micro_batch=2, overlap=ov,
                                compression=comp)
                par = build_parallel(plan, world, rank)
                recs = train(TrainConfig(model=model, plan=plan, steps=a.steps + 1, warmup=1, quiet=True),
                             par, device)
                times.setdefault((ov_name, c_name), []).extend(r["step_time_s"] for r in recs[1:])
                dist.barrier()
    if rank == 0:
        tokens = 8 * model.seq_len
        tps = {k: tokens / statistics.median(v) for k, v in times.items()}
        for (ov_name, c_name), v in tps.items():
            print(f"overlap={ov_name:9s} compression={c_name:9s} tokens/s {v:9.1f}", flush=True)
        best = max((v / tps[("none", c)], o, c) for (o, c), v in tps.items() if o != "none")
        print(f"best overlap: {best[1]} with compression {best[2]}", flush=True)
        print(f"overlap_speedup {best[0]:.3f}", flush=True)
    dist.destroy_process_group()


def main() -> int:
    a = _args()
    if a.worker:
        worker(a)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", __file__,
           "--worker", *sys.argv[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
