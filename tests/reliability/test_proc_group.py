"""tests/proc_group.run: a timed-out command's whole process group dies, and in-process-only
variables (TRITON_INTERPRET) do not reach it."""

import os
import subprocess
import sys
import time

import proc_group
import pytest

# starts a grandchild (like torchrun's ranks), prints its pid, then both sleep
PARENT = ("import subprocess, sys, time\n"
          "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
          "print(p.pid, flush=True)\n"
          "time.sleep(120)\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper counts as dead
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_timeout_kills_the_whole_group():
    with pytest.raises(subprocess.TimeoutExpired) as exc:
        proc_group.run([sys.executable, "-c", PARENT], timeout=5)
    grandchild = int(exc.value.output.split()[0])
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_in_process_variables_are_not_inherited(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    code = "import os; print(os.environ.get('TRITON_INTERPRET'), os.environ.get('X'))"
    proc = proc_group.run([sys.executable, "-c", code], timeout=60, env={**os.environ, "X": "y"})
    assert proc.returncode == 0 and proc.stdout.split() == ["None", "y"]
