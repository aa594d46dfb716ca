"""Run under torchrun (4 ranks): train each plan for a few steps, dump step-1 gradients and losses.

One launch covers every plan (each builds its own process groups) to keep the suite fast.
Usage: torchrun --nproc-per-node 4 tests/runtime/equiv_worker.py OUT_DIR STEPS [--layers N] PLAN_JSON...
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from perfmodel.specs import PlanSpec
from runtime.groups import build_parallel
from runtime.train import TrainConfig, init_distributed, train

sys.path.insert(0, str(Path(__file__).parent))
from equiv_common import tiny_model  # noqa: E402


def main() -> None:
    out, steps, rest = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    layers = None
    if rest[:1] == ["--layers"]:
        layers, rest = int(rest[1]), rest[2:]
    model = tiny_model() if layers is None else tiny_model(layers)
    plans = [json.loads(p) for p in rest]
    rank, world, device = init_distributed(60)
    for fields in plans:
        plan = PlanSpec(**fields)
        par = build_parallel(plan, world, rank)
        d = out / plan.name
        recs = train(TrainConfig(model=model, plan=plan, steps=steps, dump_grads=d, quiet=True), par, device)
        if rank == 0:
            (d / "losses.json").write_text(json.dumps([r["loss"] for r in recs]))
            (d / "aux.json").write_text(json.dumps([r["aux_loss"] for r in recs]))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
