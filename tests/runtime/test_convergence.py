"""Slow (about 3 min on 2 cores): tiny-moe on 4 CPU ranks learns byte-level text, and a resume
from the step-100 checkpoint replays steps 101-200 exactly. Run with MOEPERF_SLOW=1.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import proc_group
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.skipif(os.environ.get("MOEPERF_SLOW") != "1", reason="slow: set MOEPERF_SLOW=1")


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    return {r["step"]: r["loss"] for r in recs}


def test_tiny_moe_learns_text_and_resumes_exactly(tmp_path):
    corpus = tmp_path / "corpus.txt"  # a frozen copy: the repository's own text, byte-level
    corpus.write_bytes(b"\n".join(p.read_bytes() for p in sorted((ROOT / "perfmodel").glob("*.py"))))
    plan = tmp_path / "plan.yaml"
    plan.write_text("kind: plan\nname: ep4\nep: 4\nglobal_batch: 16\nmicro_batch: 4\n")
    args = [sys.executable, "-m", "perfmodel.cli", "run", "--model", "tiny-moe", "--plan", str(plan),
            "--nproc", "4", "--steps", "200", "--data", str(corpus), "--lr", "2e-3", "--ckpt-every", "100"]
    a = tmp_path / "a"
    proc = proc_group.run(args + ["--out", str(a)], cwd=ROOT, env=ENV, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = _losses(a)
    assert full[200] <= 0.7 * full[1], (full[1], full[200])
    b = tmp_path / "b"  # the job as if killed after step 100's checkpoint
    shutil.copytree(a, b)
    shutil.rmtree(b / "ckpt" / "step_000200")
    proc = proc_group.run(args + ["--out", str(b), "--resume"], cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(step 100)" in proc.stdout
    assert _losses(b) == full
