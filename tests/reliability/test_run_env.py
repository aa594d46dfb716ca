"""`moeperf run` on a full disk and under preemption, 2 CPU ranks (gloo), tiny-moe, 12 steps.

One chain of runs (each asserts its own guarantee, the last checks they add up to an exact run):
1. reference: the free-space probe reports 0 bytes before the step-4 save (`lowdisk`): that save is
   skipped with a warning and logged in metrics.jsonl; training continues to step 12.
2. the disk fills during the step-8 save on rank 1 (`enospc`): one line naming rank, step, path and
   cause, exit 1, no traceback; step_000004 stays the latest good checkpoint; no .tmp left.
3. `--resume` with a stale .tmp folder planted, SIGTERM to `moeperf run` after step 6: the .tmp is
   removed, the step finishes, a checkpoint is saved, exit 0 with a line saying where.
4. `--resume` again: steps 1..12 once each, every loss bit-identical to the reference.
5. SIGINT to the whole process group (Ctrl-C): the step finishes, nothing is saved, exit 130."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import proc_group
import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
PLAN = "kind: plan\nep: 2\nglobal_batch: 4\nmicro_batch: 2\n"


def _cmd(tmp: Path, out: str, *extra: str) -> list[str]:
    (tmp / "plan.yaml").write_text(PLAN)
    return [sys.executable, "-m", "perfmodel.cli", "run", "--model", "tiny-moe", "--plan", str(tmp / "plan.yaml"),
            "--nproc", "2", "--steps", str(STEPS), "--layers", "2", "--seq-len", "32", "--scale", "0.5",
            "--ckpt-every", "4", "--out", str(tmp / out), *extra]


def _env(fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MOEPERF_FAULT", None)
    if fault:
        env["MOEPERF_FAULT"] = fault
    return env


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]


def _last(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_full_disk_and_preemption_chain(tmp_path):
    # 1. reference, with the step-4 save skipped for want of space
    ref = proc_group.run(_cmd(tmp_path, "ref"), env=_env("lowdisk:0:4"), cwd=ROOT, timeout=120)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "moeperf run: warning: skipped the step-4 checkpoint: it needs about" in ref.stderr
    recs = _metrics(tmp_path / "ref")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert recs[3]["ckpt_skipped"]["free_bytes"] == 0 and recs[3]["ckpt_skipped"]["need_bytes"] > 0
    assert [p.name for p in sorted((tmp_path / "ref" / "ckpt").iterdir())] == ["step_000008", "step_000012"]

    # 2. the disk fills in the middle of the step-8 save, on rank 1
    out = tmp_path / "a"
    full = proc_group.run(_cmd(tmp_path, "a"), env=_env("enospc:1:8"), cwd=ROOT, timeout=120)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert _last(full) == (f"moeperf run: error: rank 1: checkpoint step 8: No space left on device "
                           f"({out / 'ckpt' / 'step_000008.tmp'})")
    assert [p.name for p in (out / "ckpt").iterdir()] == ["step_000004"]  # intact, the latest good one
    from runtime import checkpoint

    assert checkpoint.latest_good(out / "ckpt").name == "step_000004"

    # 3. resume past a stale .tmp (a save killed earlier), then SIGTERM to `moeperf run` after step 6
    (out / "ckpt" / "step_000010.tmp").mkdir()
    (out / "ckpt" / "step_000010.tmp" / "__0_0.distcp").write_bytes(b"half")
    with proc_group.Started(_cmd(tmp_path, "a", "--resume"), env=_env(), cwd=ROOT) as job:
        job.wait_for("step 6/12", timeout=120)
        job.signal(signal.SIGTERM)
        t0 = time.monotonic()
        term = job.finish(timeout=90)
        print(f"figure: SIGTERM to exit 0 (step finished, checkpoint saved) {time.monotonic() - t0:.1f} s")
    assert term.returncode == 0, term.stderr[-3000:]
    assert "removed step_000010.tmp, an unfinished checkpoint save" in term.stderr
    stop = json.loads((out / "stopped.json").read_text())
    assert stop["signal"] == "SIGTERM" and 6 <= stop["step"] < STEPS, stop
    saved = out / "ckpt" / f"step_{stop['step']:06d}"
    assert _last(term) == (f"moeperf run: stopped by SIGTERM after step {stop['step']} of {STEPS}; saved {saved}; "
                           "continue with --resume")
    assert checkpoint.problem(saved) is None and not list((out / "ckpt").glob("*.tmp"))

    # 4. resume to the end: exact
    done = proc_group.run(_cmd(tmp_path, "a", "--resume"), env=_env(), cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"(step {stop['step']})" in done.stdout
    got = _metrics(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in recs]  # bit-for-bit

    # 5. Ctrl-C: SIGINT to the whole group (launcher, torchrun, ranks): the step finishes, no save, exit 130
    with proc_group.Started(_cmd(tmp_path, "b"), env=_env(), cwd=ROOT) as job:
        job.wait_for("step 2/12", timeout=120)
        job.signal(signal.SIGINT, group=True)
        ctrl_c = job.finish(timeout=90)
    assert ctrl_c.returncode == 130, ctrl_c.stderr[-3000:]
    stop = json.loads((tmp_path / "b" / "stopped.json").read_text())
    assert stop["signal"] == "SIGINT" and 2 <= stop["step"] < STEPS
    line = _last(ctrl_c)
    assert line.startswith(f"moeperf run: stopped by SIGINT after step {stop['step']} of {STEPS}; not saved"), line
    b = _metrics(tmp_path / "b")
    assert [r["loss"] for r in b] == [r["loss"] for r in recs[:stop["step"]]]
    assert all(int(p.name[5:]) % 4 == 0 for p in (tmp_path / "b" / "ckpt").glob("step_*"))  # only scheduled saves
