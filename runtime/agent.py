"""torchrun for `moeperf run`, without its own traceback.

`python -m runtime.agent ARGS` is `python -m torch.distributed.run ARGS`, except that when the job fails
torchrun's failure summary (which rank exited how) comes out on stderr as lines prefixed HIDDEN instead
of as a two-screen ChildFailedError traceback: the launcher reads them (runtime.launch.torchrun_exits),
keeps them in <out>/agent.log and prints one line naming the cause. Rank tracebacks (a bug in a rank)
still pass through untouched.
"""

from __future__ import annotations

import logging
import sys

HIDDEN = "moeperf-agent| "


class _Hidden(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            for ln in self.format(record).splitlines():
                sys.stderr.write(f"{HIDDEN}{ln}\n")
        except Exception:  # noqa: BLE001 - logging must never take the agent down
            pass


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # the agent's own log lines (restarts, "failed (exitcode: 1)", closing signals) go to agent.log
    handler = _Hidden()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        log = logging.getLogger(name)
        log.handlers = [handler]
        log.propagate = False
    try:
        torchrun(argv)
    except ChildFailedError as exc:
        for ln in exc.format_msg().splitlines():
            sys.stderr.write(f"{HIDDEN}{ln}\n")
        return 1
    except SignalException as exc:  # the whole job was signalled (a scheduler): the ranks handled it
        sys.stderr.write(f"{HIDDEN}agent stopped by {exc.sigval.name}\n")
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
