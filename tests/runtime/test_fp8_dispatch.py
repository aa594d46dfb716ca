"""precision fp8 + FP8 dispatch on 2 gloo ranks (ep=2): the tokens travel already quantized the way
the expert fc1 GEMM reads them, and fc1 uses the received payload and scales without casting its
input again (runtime.fp8_linear.from_wire; only wgrad's transposed copy is cast).

- casts: with the FP8 dispatch fc1's forward input cast ("moe.fc1:x") never runs, the transposed
  copy ("moe.fc1:xT") does; with a bf16 dispatch it is the other way round.
- bytes: a token sent costs H + 4 bytes (e4m3 + one fp32 scale) under tensorwise, H + 4 * H/128
  (one scale per 1x128 tile: fc1's activation tiles) under blockwise; 4H on the fp32 wire on CPU.
- inter-op overlap (async all-to-all carrying the payload, expert wgrad deferred) gives the same
  gradients as the blocking path.
"""

import json
import os
import sys
from pathlib import Path

import proc_group
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
H = 256
BASE = {"ep": 2, "global_batch": 4, "micro_batch": 2, "precision": "fp8"}
PLANS = {
    "tw_wire_bf16": {**BASE, "fp8_recipe": "tensorwise"},
    "tw_wire_fp8": {**BASE, "fp8_recipe": "tensorwise", "compression": {"dispatch": "fp8"}},
    "bw_wire_fp8": {**BASE, "fp8_recipe": "blockwise", "compression": {"dispatch": "fp8"}},
    "bw_wire_fp8_inter_op": {**BASE, "fp8_recipe": "blockwise", "compression": {"dispatch": "fp8"},
                             "overlap": {"inter_op": True}},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp8_dispatch")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).parent / "fp8_worker.py"), str(out)]
    cmd += [json.dumps({"name": n, **f}) for n, f in PLANS.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = proc_group.run(cmd, cwd=ROOT, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _result(out: Path, name: str) -> dict:
    return json.loads((out / name / "result.json").read_text())


@pytest.mark.timeout(300)
def test_fc1_reads_the_dispatched_fp8_without_casting_again(runs):
    plain = _result(runs, "tw_wire_bf16")
    assert plain["casts"]["moe.fc1:x"] > 0 and "moe.fc1:xT" not in plain["casts"]
    for name in ("tw_wire_fp8", "bw_wire_fp8", "bw_wire_fp8_inter_op"):
        casts = _result(runs, name)["casts"]
        assert "moe.fc1:x" not in casts, (name, casts)
        assert casts["moe.fc1:xT"] == plain["casts"]["moe.fc1:x"], (name, casts)
        assert casts["moe.fc2:x"] == plain["casts"]["moe.fc2:x"]  # the other GEMMs cast as before


@pytest.mark.timeout(300)
def test_dispatch_carries_fc1_scale_groups(runs):
    assert _result(runs, "tw_wire_bf16")["bytes_per_token"] == 4 * H  # fp32 rows on CPU
    assert _result(runs, "tw_wire_fp8")["bytes_per_token"] == H + 4
    assert _result(runs, "bw_wire_fp8")["bytes_per_token"] == H + 4 * H // 128
    assert _result(runs, "bw_wire_fp8_inter_op")["bytes_per_token"] == H + 4 * H // 128


@pytest.mark.timeout(300)
def test_overlap_path_gives_the_same_gradients(runs):
    for rank in (0, 1):  # same plan layout: compare each rank's (slice of the) synced gradients
        got = torch.load(runs / "bw_wire_fp8_inter_op" / f"rank{rank}.pt")
        want = torch.load(runs / "bw_wire_fp8" / f"rank{rank}.pt")
        assert sorted(got) == sorted(want)
        for k, (w, _) in want.items():
            err = (got[k][0] - w).norm() / w.norm().clamp_min(1e-12)
            assert err <= 1e-5, f"rank {rank}: gradient of {k} differs, rel. error {err:.2e}"
