"""benchmarks/runtime_gpu.py on the CPU: import-safe, --help, and its --dry-run (tiny-moe, 2 steps per
configuration, every stage the GPU run has: moeperf in bf16 and both FP8 recipes, the peer, the
profiled step, the CSV/JSON and the closing `peer` / `vs_torchtitan` lines)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "runtime_gpu.py"


def _run(*args: str, timeout: float = 180):
    import proc_group

    proc = proc_group.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_help_and_import():
    assert "--dry-run" in _run("--help", timeout=60)


def test_dry_run_cpu(tmp_path):
    out = _run("--dry-run", "--out", str(tmp_path))
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines[-2].startswith("peer ") and lines[-1].startswith("vs_torchtitan ")
    assert float(lines[-1].split()[1]) > 0
    assert "profiled step" in out and "host_us_per_op" in out
    rows = list(csv.DictReader((tmp_path / "runtime_gpu.csv").open()))
    mine = [r for r in rows if r["stack"] == "moeperf"]
    assert {r["precision"] for r in mine} == {"bf16", "fp8-tensorwise", "fp8-blockwise"}
    assert {int(r["micro_batch"]) for r in mine} == {1, 2} and all(float(r["tokens_per_s"]) > 0 for r in mine)
    meta = json.loads((tmp_path / "runtime_gpu.json").read_text())
    assert meta["profiles"][0]["op_spans"] > 100 and meta["vs_peer"]["tiny-moe"] > 0
