"""`moeperf run`: bad plans stop before launch; a failing rank stops the job naming it; resume is exact."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import proc_group
import pytest

from perfmodel.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _plan(tmp_path: Path, text: str) -> str:
    p = tmp_path / "plan.yaml"
    p.write_text("kind: plan\n" + text)
    return str(p)


@pytest.mark.parametrize("plan,nproc,needle", [
    ("ep: 3\n", 4, "plan.ep*etp"),
    ("dp: 2\n", 4, "plan.dp"),
    ("sp: 8\n", 8, "plan.tp*sp"),
    ("ep: 2\netp: 2\n", 4, "plan.etp"),
])
def test_bad_plan_exits_2_before_launch(tmp_path, capsys, plan, nproc, needle):
    out = tmp_path / "out"
    rc = cli(["run", "--model", "tiny-moe", "--plan", _plan(tmp_path, plan), "--nproc", str(nproc), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0]
    assert not out.exists()


def test_bad_flags_exit_2(tmp_path, capsys):
    assert cli(["run", "--model", "no-such-model", "--plan", _plan(tmp_path, "")]) == 2
    assert cli(["run", "--model", "tiny-moe", "--plan", _plan(tmp_path, ""), "--steps", "0"]) == 2
    assert cli(["run", "--model", "tiny-moe", "--plan", _plan(tmp_path, ""), "--data", str(tmp_path / "nope")]) == 2


def _run(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = proc_group.run([sys.executable, "-m", "perfmodel.cli", "run", *args], cwd=ROOT, env=ENV, timeout=120)
    return proc, time.monotonic() - t0


def text_corpus(path: Path) -> Path:
    """A fixed byte-level corpus (seeded pseudo-sentences), so both runs read the same bytes."""
    import random

    rng = random.Random(0)
    words = "the expert router sends each token to two of eight experts and the loss falls".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(400)))
    return path


def _losses(out: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]


def test_failing_rank_stops_job_and_resume_is_exact(tmp_path):
    plan = _plan(tmp_path, "sp: 2\nep: 2\nglobal_batch: 8\nmicro_batch: 2\n")
    base = ["--model", "tiny-moe", "--plan", plan, "--nproc", "4", "--steps", "8", "--seq-len", "32",
            "--ckpt-every", "4", "--data", str(text_corpus(tmp_path / "corpus.txt")), "--scale", "0.5"]
    full, _ = _run(base + ["--out", str(tmp_path / "a")])
    assert full.returncode == 0, full.stderr[-3000:]
    assert "step 8/8" in full.stdout and "tokens/s" in full.stdout.splitlines()[-1]
    # rank 2 raises at step 6, after the step-4 checkpoint: the job must stop, naming rank 2
    failed, secs = _run(base + ["--out", str(tmp_path / "b"), "--inject-failure", "2:6"])
    assert failed.returncode != 0 and secs < 60
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("moeperf run: error: rank 2 failed") and "injected failure" in last
    resumed, _ = _run(base + ["--out", str(tmp_path / "b"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "(step 4)" in resumed.stdout
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # bit-for-bit, steps 1-8
