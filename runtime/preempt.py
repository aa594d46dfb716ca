"""Preemption and lost nodes, seen from a rank.

SIGTERM (a cluster preempting the job; `moeperf run` forwards its own SIGTERM to the ranks): the rank
finishes the current step, every rank saves a checkpoint, and the job exits 0; rank 0 writes
`<out>/stopped.json` saying where it stopped, which the launcher prints. SIGINT (Ctrl-C) does the same
without the save. A signal only sets a flag; the flags travel in the step's one all-reduce
(train._step_stats), so all ranks stop after the same step without an extra host round-trip, even if
only some of them were signalled.

Elastic jobs (`--nnodes MIN:MAX`): a checkpoint belongs to one world size, so a restart with fewer
nodes than MAX cannot continue; its ranks wait instead (`wait_for_nodes`), and when the lost node
rejoins the rendezvous torchrun restarts every worker into the full world, which resumes from the last
checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from perfmodel import atomic

STOPPED = "stopped.json"
_got = {signal.SIGTERM: 0.0, signal.SIGINT: 0.0}


def _handler(signum: int, _frame) -> None:
    _got[signal.Signals(signum)] = 1.0


def install() -> None:
    """Turn SIGTERM/SIGINT into flags read at the end of each step (main thread only)."""
    for sig in _got:
        signal.signal(sig, _handler)


def flags() -> list[float]:
    """[SIGTERM seen, SIGINT seen] on this rank, summed over ranks by the step's all-reduce."""
    return [_got[signal.SIGTERM], _got[signal.SIGINT]]


def decide(sigterm: float, sigint: float) -> str | None:
    """The stop every rank agrees on from the summed flags: SIGTERM (save) wins over SIGINT."""
    return "SIGTERM" if sigterm > 0 else "SIGINT" if sigint > 0 else None


def write_stopped(out: Path, signal_name: str, step: int, steps: int, checkpoint: Path | None) -> None:
    """Rank 0: where the job stopped, for the launcher's last line. Best effort (the disk may be full)."""
    try:
        atomic.write_json(out / STOPPED, {"signal": signal_name, "step": step, "steps": steps,
                                          "checkpoint": str(checkpoint) if checkpoint else None})
    except OSError:
        pass


def wait_for_nodes(world: int, needed: int) -> int:
    """Ranks of a shrunken elastic world: idle until torchrun restarts us (the lost node rejoined: SIGTERM)
    or the user stops the job. Returns the exit status (0)."""
    install()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("GROUP_RANK", "0")) == 0:
        print(f"moeperf run: waiting for the lost node(s): {world} of {needed} ranks present; the job resumes "
              "from the last checkpoint when they rejoin", file=sys.stderr, flush=True)
    while not any(flags()):
        time.sleep(0.2)
    return 0


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (an agent's ranks), from /proc (Linux)."""
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:  # field 4, after "(comm) state"
                kids.append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return kids
