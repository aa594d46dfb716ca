"""CI guard (CPU): no host round-trip creeps back into a training step.

A GPU step is only as fast as the host can issue it if the host never waits for the device inside
it (issue 17). tests/runtime/host_syncs.py counts, on the CPU, every call that would make a CUDA
host wait: Tensor.tolist/item/cpu/numpy/__int__/__float__/__bool__/__index__, and below autograd the
aten ops they lower to plus the ops whose output size depends on the data (bincount, nonzero,
repeat_interleave without output_size, boolean masks, ...).

- EP = 1, one process, tiny-moe: 0 in forward + backward + optimizer (runtime.train.forward_backward
  and optimizer_step: the same two calls a training step makes), under the plain plan and under
  FP8 (both recipes), overlap, recomputation. The metrics read after the step (runtime.train.
  _step_stats: one transfer per step) is outside what is counted, and allowed.
- EP = 2, two gloo ranks: at most one per MoE layer per micro-batch, each the all-to-all split sizes
  read in runtime.moe (every chunk's send and receive sizes in one transfer).
- Self-checks: the counter sees a deliberate `.tolist()` (and a bincount) put back into the MoE
  layer, so the guard fails when one creeps in.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))
from host_syncs import HostSyncCounter  # noqa: E402

from perfmodel.specs import PlanSpec, load_spec  # noqa: E402
from runtime.data import Data, local_batch  # noqa: E402
from runtime.groups import Parallel  # noqa: E402
from runtime.moe import MoE  # noqa: E402
from runtime.train import TrainConfig, forward_backward, optimizer_step, setup  # noqa: E402

MODEL = load_spec("tiny-moe", "model")
ROOT = Path(__file__).resolve().parents[2]
PLANS_EP1 = {
    "plain": {},
    "fp8_tensorwise": {"precision": "fp8"},
    "fp8_blockwise": {"precision": "fp8", "fp8_recipe": "blockwise"},
    "inter_op_chunk2": {"overlap": {"inter_op": True, "intra_op": "chunk", "chunks": 2}},
    "recompute_full": {"recompute": "full"},
}


def _counted_step(plan: PlanSpec, steps: int = 2) -> tuple[HostSyncCounter, int]:
    """Train `steps` steps of tiny-moe in this process; count the last (the first may warm caches)."""
    run = setup(TrainConfig(model=MODEL, plan=plan, steps=steps, quiet=True), Parallel.single(), torch.device("cpu"))
    data = Data(MODEL.vocab, MODEL.seq_len, plan.global_batch, 0)
    for step in range(1, steps + 1):
        inputs, targets = local_batch(data.batch(step), run.par)
        with HostSyncCounter() as c:
            forward_backward(run, inputs, targets)
            optimizer_step(run, 1e-3, 1.0)
    return c, run.microbatches


@pytest.mark.parametrize("name", list(PLANS_EP1))
def test_no_host_sync_in_a_step_ep1(name):
    c, _ = _counted_step(PlanSpec(name=name, global_batch=4, micro_batch=2, **PLANS_EP1[name]))
    assert c.count == 0, f"host round-trips in a training step ({name}): {dict(c.summary())}"


def test_counter_sees_a_sync_put_back(monkeypatch):
    """The guard must fail if someone adds a .tolist() (or a bincount) back into the MoE layer."""
    orig = MoE._permute

    def permute_with_syncs(self, t, idx):
        xs, counts, order = orig(self, t, idx)
        counts.tolist()  # what the dispatcher used to do with the expert counts
        torch.bincount(idx.reshape(-1), minlength=self.E)
        return xs, counts, order

    monkeypatch.setattr(MoE, "_permute", permute_with_syncs)
    c, microbatches = _counted_step(PlanSpec(name="selfcheck", global_batch=4, micro_batch=2), steps=1)
    per_layer = MODEL.layers * microbatches
    kinds = c.summary()
    tolists = sum(n for (kind, where), n in kinds.items() if kind == "Tensor.tolist" and "test_host_syncs" in where)
    assert tolists == per_layer, kinds
    assert sum(n for (kind, _), n in kinds.items() if kind == "aten:bincount") == per_layer, kinds
    # and outside a counted region nothing is patched any more
    assert torch.Tensor.tolist is not None and torch.tensor([1]).tolist() == [1]


def test_ep2_at_most_one_sync_per_moe_layer_and_microbatch(tmp_path):
    import proc_group

    plans = [{"name": "ep2", "ep": 2, "global_batch": 4, "micro_batch": 1},
             {"name": "ep2_fp8_dispatch_chunk2", "ep": 2, "global_batch": 4, "micro_batch": 1,
              "precision": "fp8", "compression": {"dispatch": "fp8", "combine": "fp8"},
              "overlap": {"inter_op": True, "intra_op": "chunk", "chunks": 2}}]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).parent / "host_sync_worker.py"), str(tmp_path), *(json.dumps(p) for p in plans)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = proc_group.run(cmd, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for p in plans:
        for rank in (0, 1):
            rec = json.loads((tmp_path / p["name"] / f"rank{rank}.json").read_text())
            allowed = rec["moe_layers"] * rec["microbatches"]
            events = [tuple(e) for e in rec["events"]]
            assert len(events) <= allowed, (p["name"], rank, allowed, events)
            assert len(events) == allowed, f"{p['name']}: expected the split-size reads, saw {events}"
            assert all(k == "Tensor.tolist" and where.startswith("runtime/moe.py") for k, where in events), events
