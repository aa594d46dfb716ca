"""Fault injection for the reliability tests: `MOEPERF_FAULT=WHERE:RANK:STEP[:ATTEMPT][,...]`.

At a named point (`step`: in the middle of a training step, after forward+backward and before the
gradient sync; `ckpt`: in the middle of a checkpoint save, after this rank's shards are written and
before the save is committed) the rank SIGKILLs itself, exactly like `kill -9` from outside: no
Python cleanup, no error report. A fault fires only in the job attempt it names (torchrun's
TORCHELASTIC_RESTART_COUNT; default 0, the first), so a restarted job does not repeat it.
Unset, this costs one dict lookup.
"""

from __future__ import annotations

import os
import signal


def _armed(where: str, rank: int, step: int) -> bool:
    spec = os.environ.get("MOEPERF_FAULT")
    if not spec:
        return False
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) == 3:
            parts.append("0")
        if len(parts) == 4 and parts == [where, str(rank), str(step), attempt]:
            return True
    return False


def point(where: str, rank: int, step: int) -> None:
    """Die here (SIGKILL) if MOEPERF_FAULT names this point."""
    if _armed(where, rank, step):
        os.kill(os.getpid(), signal.SIGKILL)
