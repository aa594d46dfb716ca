"""Fault injection for the reliability tests: `MOEPERF_FAULT=WHERE:RANK:STEP[:ATTEMPT][,...]`.

At a named point (`step`: in the middle of a training step, after forward+backward and before the
gradient sync; `ckpt`: in the middle of a checkpoint save, after this rank's shards are written and
before the save is committed) the rank SIGKILLs itself, exactly like `kill -9` from outside: no
Python cleanup, no error report. Two disk faults stand in for a full disk (no root, no tmpfs in CI):
`enospc` makes the rank's checkpoint shard write at that step fail with OSError(ENOSPC) inside
torch.distributed.checkpoint, as a full disk does; `lowdisk` makes the free-space probe before that
step's save report 0 bytes free. `node:LOCAL_RANK:STEP` (mid-step, like `step`) loses the whole node:
that local rank SIGKILLs its torchrun agent, the agent's other ranks and itself, as a machine that
dies does (set it in one node's environment only). A fault fires only in the job attempt it names (torchrun's
TORCHELASTIC_RESTART_COUNT; default 0, the first), so a restarted job does not repeat it.
Unset, this costs one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal

from runtime import preempt


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


def enospc(rank: int, step: int, path: str) -> None:
    """Raise ENOSPC here (a shard write) if MOEPERF_FAULT names `enospc:RANK:STEP`."""
    if _armed("enospc", rank, step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def low_disk(rank: int, step: int) -> bool:
    """True if MOEPERF_FAULT names `lowdisk:RANK:STEP`: the free-space probe then reports 0 bytes."""
    return _armed("lowdisk", rank, step)


def point(where: str, rank: int, step: int) -> None:
    """Die here (SIGKILL) if MOEPERF_FAULT names this point."""
    if _armed(where, rank, step):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "step" and _armed("node", int(os.environ.get("LOCAL_RANK", "0")), step):
        agent = os.getppid()
        for pid in [agent, *preempt.children(agent)]:
            if pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

