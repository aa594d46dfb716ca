"""Parallel equivalence: every plan on 4 CPU ranks matches one process (same seed, global batch).

Step-1 loss and synced gradients within rel. 1e-4; the loss over 10 steps within 1e-3.
All plans run in one torchrun launch (tests/runtime/equiv_worker.py) to keep the suite fast.
"""

import json
import os
import sys
from pathlib import Path

import proc_group
import pytest
import torch

from perfmodel.specs import PlanSpec
from runtime.groups import Parallel
from runtime.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from equiv_common import PLANS, plan_fields, tiny_model  # noqa: E402

STEPS = 10
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("equiv")
    ref = train(TrainConfig(model=tiny_model(), plan=PlanSpec(**plan_fields("dp4") | {"name": "ref"}), steps=STEPS,
                            dump_grads=out / "ref", quiet=True), Parallel.single(), torch.device("cpu"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(Path(__file__).parent / "equiv_worker.py"), str(out), str(STEPS)]
    cmd += [json.dumps(plan_fields(n)) for n in PLANS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = proc_group.run(cmd, cwd=ROOT, env=env, timeout=300)  # 12 plans; slow when the suite shares the cores
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, ref


def assemble(d: Path) -> dict[str, torch.Tensor]:
    """Full gradients from every rank's (slice, placement) dump."""
    parts: dict[str, list] = {}
    for f in sorted(d.glob("rank*.pt")):
        for name, (g, shard) in torch.load(f).items():
            parts.setdefault(name, []).append((g, shard))
    full = {}
    for name, items in parts.items():
        if items[0][1] is None:
            full[name] = items[0][0]
            for g, _ in items[1:]:  # replicas must agree after the sync
                torch.testing.assert_close(g, items[0][0], rtol=1e-5, atol=1e-7)
            continue
        dim, _, count = items[0][1]
        chunks = {}
        for g, (_, index, _) in items:
            chunks[index] = g
        assert sorted(chunks) == list(range(count)), name
        full[name] = torch.cat([chunks[i] for i in range(count)], dim=dim)
    return full


@pytest.mark.parametrize("name", list(PLANS))
def test_plan_matches_single_process(runs, name):
    out, ref = runs
    losses = json.loads((out / name / "losses.json").read_text())
    ref_losses = [r["loss"] for r in ref]
    assert losses[0] == pytest.approx(ref_losses[0], rel=1e-4)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-3
    aux = json.loads((out / name / "aux.json").read_text())
    assert aux[0] == pytest.approx(ref[0]["aux_loss"], rel=1e-4)
    got, want = assemble(out / name), assemble(out / "ref")
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        err = (got[k] - w).norm() / w.norm().clamp_min(1e-12)
        assert err <= 1e-4, f"{name}: gradient of {k} differs, rel. error {err:.2e}"
