"""Fault injection for the reliability tests: `MOEPERF_FAULT=WHERE:RANK:STEP[,WHERE:RANK:STEP...]`.

At a named point (`step`: in the middle of a training step, after forward+backward and before the
gradient sync; `ckpt`: in the middle of a checkpoint save, after this rank's shards are written and
before the save is committed) the rank SIGKILLs itself, exactly like `kill -9` from outside: no
Python cleanup, no error report. Faults fire only in the first attempt of a job (torchrun's
TORCHELASTIC_RESTART_COUNT=0), so a restarted job runs clean. Unset, this costs one dict lookup.
"""

from __future__ import annotations

import os
import signal


def _armed(where: str, rank: int, step: int) -> bool:
    spec = os.environ.get("MOEPERF_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) == 3 and parts[0] == where and parts[1:] == [str(rank), str(step)]:
            return True
    return False


def point(where: str, rank: int, step: int) -> None:
    """Die here (SIGKILL) if MOEPERF_FAULT names this point."""
    if _armed(where, rank, step):
        os.kill(os.getpid(), signal.SIGKILL)
