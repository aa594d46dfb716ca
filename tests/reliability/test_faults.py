"""Fault injection on 4 CPU ranks (gloo): kill -9 of a rank mid-step, kill -9 in the middle of a
checkpoint save, a corrupt checkpoint file. Each either recovers exactly (same losses, steps 1..N
once each, as an uninterrupted run) or fails cleanly, naming the cause.

Faults come from runtime/faults.py (MOEPERF_FAULT=WHERE:RANK:STEP): the rank SIGKILLs itself,
which is what `kill -9` from outside does, at a point a test can name."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import proc_group
import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
PLAN = "kind: plan\nsp: 2\nep: 2\nglobal_batch: 8\nmicro_batch: 2\n"


def _run(tmp: Path, out: str, *extra: str, fault: str | None = None, timeout: int = 120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MOEPERF_FAULT", None)
    if fault:
        env["MOEPERF_FAULT"] = fault
    (tmp / "plan.yaml").write_text(PLAN)
    args = ["--model", "tiny-moe", "--plan", str(tmp / "plan.yaml"), "--nproc", "4", "--steps", str(STEPS),
            "--layers", "2", "--seq-len", "32", "--scale", "0.5", "--ckpt-every", "2", "--out", str(tmp / out)]
    t0 = time.monotonic()
    proc = proc_group.run([sys.executable, "-m", "perfmodel.cli", "run", *args, *extra], cwd=ROOT, env=env,
                          timeout=timeout)
    return proc, time.monotonic() - t0


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ref")
    proc, _ = _run(tmp, "ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "ref"


def _same_as_reference(out: Path, reference: Path) -> None:
    got, want = _metrics(out), _metrics(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # no lost or repeated step
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # bit-for-bit


def test_rank_killed_mid_step_ends_job_naming_it(tmp_path):
    proc, secs = _run(tmp_path, "a", fault="step:2:3")
    assert proc.returncode == 1 and secs < 60, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("moeperf run: error: rank 2 died: killed by SIGKILL"), last


def test_rank_killed_mid_step_restarts_and_resumes_exactly(tmp_path, reference):
    proc, _ = _run(tmp_path, "a", "--max-restarts", "1", fault="step:2:5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(step 4)" in proc.stdout  # resumed from the last checkpoint
    _same_as_reference(tmp_path / "a", reference)


def test_killed_during_checkpoint_save_resumes_from_previous(tmp_path, reference):
    proc, _ = _run(tmp_path, "a", "--max-restarts", "1", fault="ckpt:0:4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step_000002 (step 2)" in proc.stdout  # the half-written step 4 was never used
    _same_as_reference(tmp_path / "a", reference)
    assert not list((tmp_path / "a" / "ckpt").glob("*.tmp"))


def test_corrupt_checkpoint_is_skipped_or_refused(tmp_path, reference):
    shutil.copytree(reference, tmp_path / "a")
    ckpts = sorted((tmp_path / "a" / "ckpt").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_000004", "step_000006"]
    shard = next(p for p in sorted(ckpts[-1].iterdir()) if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc, _ = _run(tmp_path, "a", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped corrupt checkpoint" in proc.stderr and "SHA-256" in proc.stderr
    assert "(step 4)" in proc.stdout
    _same_as_reference(tmp_path / "a", reference)
    # every checkpoint corrupt: refused before launch, one line naming the file, exit 2
    for p in (tmp_path / "a" / "ckpt").glob("step_*/*.distcp"):
        p.write_bytes(p.read_bytes()[:-7])
    proc, secs = _run(tmp_path, "a", "--resume")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "every checkpoint is corrupt" in err[0], proc.stderr
    assert "were written" in err[0] and secs < 60
