"""Compression end to end on 4 CPU ranks: FP8 dispatch/combine + BF16 gradient sync train like the
uncompressed plan, and the byte counters (runtime.comm.STATS -> metrics) show the savings.

Always on: the small equivalence model, 30 steps. MOEPERF_SLOW=1 adds the issue's run: tiny-moe,
200 steps (about 3 min on 2 cores), final loss within 1 %.
"""

import json
import os
import sys
from pathlib import Path

import proc_group
import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE = {"name": "plain", "ep": 4, "global_batch": 16, "micro_batch": 4}
FP8 = {**BASE, "name": "fp8", "compression": {"dispatch": "fp8", "combine": "fp8", "grad_sync": "bf16"}}


def _run(tmp_path: Path, model: str, steps: int, timeout: int) -> tuple[list[dict], list[dict]]:
    corpus = tmp_path / "corpus.txt"  # byte-level text: the repository's own sources
    corpus.write_bytes(b"\n".join(p.read_bytes() for p in sorted((ROOT / "perfmodel").glob("*.py"))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(Path(__file__).parent / "compress_worker.py"), str(tmp_path), model, str(steps), "2e-3", str(corpus),
           json.dumps(BASE), json.dumps(FP8)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = proc_group.run(cmd, cwd=ROOT, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return (json.loads((tmp_path / "plain.json").read_text()), json.loads((tmp_path / "fp8.json").read_text()))


def _check(plain: list[dict], fp8: list[dict], hidden: int) -> None:
    assert plain[-1]["loss"] < 0.8 * plain[0]["loss"]  # it learned something
    assert abs(fp8[-1]["loss"] - plain[-1]["loss"]) <= 0.01 * plain[-1]["loss"]
    # the forward a2a rows cost H+4 bytes (e4m3 + fp32 scale) instead of 4H (fp32 on CPU; 2H for bf16
    # on GPU); gradients go back in bf16 instead of fp32. Step 1 routes alike up to the first MoE layer's
    # rounding (later layers may route a few tokens to other ranks), hence rel=2e-2
    assert fp8[0]["a2a_fwd_bytes"] / plain[0]["a2a_fwd_bytes"] == pytest.approx((hidden + 4) / (4 * hidden), rel=2e-2)
    bwd = [r["a2a_bytes"] - r["a2a_fwd_bytes"] for r in (plain[0], fp8[0])]
    assert bwd[1] / bwd[0] == pytest.approx(0.5, rel=2e-2)
    assert sum(r["a2a_bytes"] for r in fp8) <= 0.5 * sum(r["a2a_bytes"] for r in plain)
    assert fp8[0]["grad_sync_bytes"] == pytest.approx(0.5 * plain[0]["grad_sync_bytes"], rel=0.01)


def test_fp8_dispatch_bf16_grad_sync_small(tmp_path):
    plain, fp8 = _run(tmp_path, "equiv", 30, 240)
    _check(plain, fp8, 64)


@pytest.mark.skipif(os.environ.get("MOEPERF_SLOW") != "1", reason="slow: set MOEPERF_SLOW=1")
def test_fp8_dispatch_bf16_grad_sync_tiny_moe_200_steps(tmp_path):
    plain, fp8 = _run(tmp_path, "tiny-moe", 200, 900)
    print(f"tiny-moe 200 steps: loss plain {plain[-1]['loss']:.4f} fp8+bf16 {fp8[-1]['loss']:.4f}; "
          f"a2a bytes ratio {sum(r['a2a_bytes'] for r in fp8) / sum(r['a2a_bytes'] for r in plain):.3f}")
    _check(plain, fp8, 128)
