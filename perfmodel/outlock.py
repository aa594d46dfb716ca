"""One writer per output folder: `moeperf search` and `moeperf run` hold `<out>/.moeperf.lock` while they
write. A second command with the same --out refuses at once (exit 1), naming the holder's pid and
command. The lock is an flock(2): the kernel drops it when its holder dies, however it dies, so a lock
left by a dead process is simply taken over (with a notice naming the dead pid). The file is removed
when its holder finishes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from perfmodel.envfail import EnvError

NAME = ".moeperf.lock"


@dataclass
class OutLock:
    path: Path
    fd: int
    created: bool = False  # the folder did not exist before the lock: removed again if left empty

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlinked before unlocking: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = -1
        if self.created:
            try:
                self.path.parent.rmdir()  # only if empty: a command that failed before writing leaves nothing
            except OSError:
                pass

    def __enter__(self) -> OutLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire(out: Path, command: str) -> OutLock:
    """Take --out's lock or raise EnvError naming the holder. OSError (read-only, full...) passes up."""
    if out.parent.exists() and not out.parent.is_dir():  # mkdir would say "File exists": misleading
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(out))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / NAME
    for _ in range(10):  # the holder may unlink the file between our open and our flock: retry
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = _holder(path)
            who = f"moeperf {h.get('command', '?')} (pid {h.get('pid', '?')} on {h.get('host', '?')})"
            raise EnvError(f"{out} is in use by {who}; wait for it to finish or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # we locked a file its holder had just removed: lock the new one
            os.close(fd)
            continue
        old = _holder(path)
        if old.get("pid"):
            print(f"moeperf {command}: warning: took over the lock of pid {old['pid']} ({old.get('command', '?')}), "
                  "which is no longer running", file=sys.stderr, flush=True)
        try:
            data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError:
            pass  # a full disk: the lock holds without the note
        return OutLock(path, fd, created)
    raise EnvError(f"{out}: could not take the lock {path} (it keeps changing)")
