"""Run under torchrun (2 gloo ranks): count host round-trips in a training step of each plan given
(tests/runtime/test_host_syncs.py). Writes OUT/<plan>/rank<k>.json: the events of the 2nd step.
Usage: torchrun --nproc-per-node 2 tests/runtime/host_sync_worker.py OUT PLAN_JSON...
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from host_syncs import HostSyncCounter  # noqa: E402

from perfmodel.specs import PlanSpec, load_spec  # noqa: E402
from runtime.data import Data, local_batch  # noqa: E402
from runtime.groups import build_parallel  # noqa: E402
from runtime.train import TrainConfig, forward_backward, init_distributed, optimizer_step, setup  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    rank, world, device = init_distributed(60)
    model = load_spec("tiny-moe", "model")
    for fields in (json.loads(p) for p in sys.argv[2:]):
        plan = PlanSpec(**fields)
        run = setup(TrainConfig(model=model, plan=plan, steps=2, quiet=True), build_parallel(plan, world, rank), device)
        data = Data(model.vocab, model.seq_len, plan.global_batch, 0)
        for step in (1, 2):  # the 2nd step is counted: the 1st may do one-time work (probes, caches)
            inputs, targets = local_batch(data.batch(step), run.par)
            with HostSyncCounter() as c:
                forward_backward(run, inputs, targets)
                optimizer_step(run, 1e-3, 1.0)
        d = out / plan.name
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rank{rank}.json").write_text(json.dumps({"events": c.events, "microbatches": run.microbatches,
                                                        "moe_layers": len(run.stages[0][1].moe_layers())}))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
