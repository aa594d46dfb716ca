"""Run `moeperf` in-process with captured output and a hang guard; check the outcome contract:
exit 0, or exit 2 with exactly one line on stderr; never a traceback, never a temp/partial file."""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path

from perfmodel.cli import main as cli

HANG_S = 60
SCALE = 20 if os.environ.get("HYPOTHESIS_PROFILE") == "big" else 1  # examples multiplier


COUNTS: dict[str, int] = {}  # 'command rc=N' -> inputs (reported by the big run)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"no answer within {HANG_S} s")


def invoke(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue()


def leftovers(*folders: Path) -> list[str]:
    """Temp files (atomic.py's `.<name>.*.tmp`, checkpoint `.tmp` folders) left under `folders`."""
    bad = []
    for d in folders:
        if d.is_dir():
            bad += [str(p) for p in d.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    return bad


def check(argv: list[str], *out_dirs: Path, allow_ok: bool = True) -> tuple[int, str, str]:
    rc, out, err = invoke(argv)
    COUNTS[f"{argv[0] if argv else '-'} rc={rc}"] = COUNTS.get(f"{argv[0] if argv else '-'} rc={rc}", 0) + 1
    try:
        from hypothesis import event

        event(f"exit {rc}")
    except Exception:  # noqa: BLE001 - outside a hypothesis test
        pass
    assert "Traceback" not in err and "Traceback" not in out, (argv, err[-2000:])
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moeperf"), (argv, err[-2000:])
    else:
        assert rc == 0 and allow_ok, (argv, rc, err[-2000:])
    assert not leftovers(*out_dirs), (argv, leftovers(*out_dirs))
    return rc, out, err
