"""Run under torchrun: train plans on text data, write each plan's metrics records (loss, bytes).

Usage: torchrun --nproc-per-node 4 tests/runtime/compress_worker.py OUT MODEL STEPS LR DATA PLAN_JSON...
MODEL is a preset/path, or "equiv" for the small model of equiv_common.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from perfmodel.specs import PlanSpec, load_spec
from runtime.groups import build_parallel
from runtime.train import TrainConfig, init_distributed, train

sys.path.insert(0, str(Path(__file__).parent))
from equiv_common import tiny_model  # noqa: E402


def main() -> None:
    out, model, steps, lr, data = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    spec = tiny_model() if model == "equiv" else load_spec(model, "model")
    rank, world, device = init_distributed(120)
    for fields in (json.loads(p) for p in sys.argv[6:]):
        plan = PlanSpec(**fields)
        par = build_parallel(plan, world, rank)
        cfg = TrainConfig(model=spec, plan=plan, steps=steps, data=[data], lr=lr, quiet=True)
        recs = train(cfg, par, device)
        if rank == 0:
            (out / f"{plan.name}.json").write_text(json.dumps(recs))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
