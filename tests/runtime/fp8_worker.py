"""Run under torchrun (2 ranks): precision fp8 plans with ep=2, one training step each; rank 0 writes,
per plan, the FP8 casts made (runtime.fp8_linear.CASTS), the forward dispatch's bytes per token sent
and the step-1 gradients (test_fp8_dispatch.py reads them).

Usage: torchrun --nproc-per-node 2 tests/runtime/fp8_worker.py OUT_DIR PLAN_JSON...
"""

import inspect
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from perfmodel.specs import ModelSpec, MoESpec, PlanSpec
from runtime import comm, fp8_linear
from runtime.groups import build_parallel
from runtime.train import TrainConfig, init_distributed, train

# one layer, so the first step routes every token alike under every plan (bytes are comparable);
# hidden 256 = two 1x128 tiles per token under blockwise
MODEL = dict(name="fp8-dispatch", layers=1, hidden=256, heads=2, kv_heads=1, head_dim=32, vocab=256, seq_len=32,
             moe=dict(experts=4, top_k=2, expert_ffn_hidden=64))


ROWS = [0]  # token rows this rank sent to the other rank in forward dispatches
_a2a = comm.all_to_all_async


def _counting_a2a(*args, **kwargs):
    a = inspect.signature(_a2a).bind(*args, **kwargs)
    a.apply_defaults()
    if a.arguments["name"] == "moe.dispatch_a2a/fwd":
        ins = list(a.arguments["in_splits"])
        ROWS[0] += sum(ins) - ins[dist.get_rank(a.arguments["group"])]
    return _a2a(*args, **kwargs)


def main() -> None:
    comm.all_to_all_async = _counting_a2a  # looked up at call time by the blocking and the overlapped path
    out, plans = Path(sys.argv[1]), [json.loads(p) for p in sys.argv[2:]]
    rank, world, device = init_distributed(60)
    model = ModelSpec(**{**MODEL, "moe": MoESpec(**MODEL["moe"])})
    for fields in plans:
        plan = PlanSpec(**fields)
        par = build_parallel(plan, world, rank)
        fp8_linear.CASTS.clear()
        ROWS[0] = 0
        train(TrainConfig(model=model, plan=plan, steps=1, dump_grads=out / plan.name, quiet=True), par, device)
        sent = torch.tensor([comm.STATS.bytes_sent.get("moe.dispatch_a2a/fwd", 0), ROWS[0]], dtype=torch.float64)
        dist.all_reduce(sent)
        if rank == 0:
            (out / plan.name / "result.json").write_text(json.dumps({"casts": dict(fp8_linear.CASTS),
                                                                     "bytes_per_token": float(sent[0] / sent[1])}))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
