"""Same inputs -> byte-identical outputs: `moeperf simulate` (JSON and Chrome trace) in separate
processes with different hash seeds, and `moeperf search` with --jobs 1 and --jobs 2 (every report
file: plans.csv, report.md, report.html, figures, best_plan.yaml, best_timeline.json)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from perfmodel.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
STUDY = """\
kind: study
name: det
model: mixtral-8x7b
cluster: h100-dgx-64
global_batch: 64
baseline: base
plans:
  - {name: base, tp: 2, ep: 4}
  - {name: ovl, sp: 2, ep: 8, overlap: {inter_op: true, intra_op: tile}, compression: {dispatch: fp8}}
search:
  tp: [1, 2]
  sp: [1, 2]
  ep: [4, 8]
  pp: [1, 2]
  recompute: [none, full]
"""
PLAN = "kind: plan\nsp: 2\nep: 4\npp: 2\nvpp: 2\nschedule: interleaved\nglobal_batch: 32\n" \
       "overlap: {inter_op: true, intra_op: chunk, chunks: 2}\n"


def test_simulate_is_byte_identical_across_processes(tmp_path):
    (tmp_path / "plan.yaml").write_text(PLAN)
    outs = []
    for seed in ("1", "2"):
        trace = tmp_path / f"trace{seed}.json"
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-m", "perfmodel.cli", "simulate", "--model", "mixtral-8x7b",
                               "--cluster", "h100-dgx-8", "--plan", str(tmp_path / "plan.yaml"), "--json",
                               "--trace", str(trace)], env=env, capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs.append((proc.stdout, trace.read_bytes()))
    assert outs[0] == outs[1]


def test_search_is_byte_identical_with_jobs_1_and_2(tmp_path, capsys):
    study = tmp_path / "det.yaml"
    study.write_text(STUDY)
    for jobs in ("1", "2"):
        assert cli(["search", str(study), "--out", str(tmp_path / f"j{jobs}"), "--jobs", jobs, "--quiet"]) == 0, \
            capsys.readouterr().err
    one = sorted(p.name for p in (tmp_path / "j1").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "j2").iterdir())
    assert {"plans.csv", "report.md", "report.html", "best_plan.yaml", "best_timeline.json"} <= set(one)
    for name in one:
        assert (tmp_path / "j1" / name).read_bytes() == (tmp_path / "j2" / name).read_bytes(), name
    assert not [n for n in one if n.startswith(".") or n.endswith(".tmp")]  # no temp files left behind
