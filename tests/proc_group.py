"""Run a command that starts worker processes (torchrun and its ranks) from a test, so that a hung
or timed-out run never leaves workers behind and never inherits the in-process test settings.

``run(cmd, timeout=..., env=..., cwd=...)`` is ``subprocess.run(cmd, capture_output=True, text=True,
timeout=...)``, except that the command gets its own session (process group) and the whole group is
SIGKILLed on timeout, on any exception while waiting (pytest-timeout, Ctrl-C) and after the command
exits (a straggler of a failed launch).  subprocess.run alone kills only the direct child: the
torchrun workers lived on, holding the cores the rest of the suite needed.

``child_env(**extra)`` is os.environ without the variables set for in-process tests only:
TRITON_INTERPRET=1 (tests/runtime/kernels/conftest.py sets it for the whole pytest process, so every
command a later test started inherited it and ran its Triton kernels in the CPU interpreter).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

IN_PROCESS_ONLY = ("TRITON_INTERPRET",)


def child_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in IN_PROCESS_ONLY}
    env.update(extra)
    return env


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def run(cmd: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None, cwd=None,
        input: str | None = None) -> subprocess.CompletedProcess:
    env = child_env() if env is None else child_env(env)
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdin=subprocess.PIPE if input is not None else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = _drain(proc)
        raise subprocess.TimeoutExpired(proc.args, timeout, output=out, stderr=err) from None
    except BaseException:
        _kill_group(proc.pid)
        _drain(proc)
        raise
    finally:
        _kill_group(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _drain(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # a process outside the group still holds the pipes
        proc.kill()
        proc.wait()
        return "", ""


class Started:
    """A command started in its own process group whose output is read as it comes, so a test can wait
    for a line (`wait_for`), signal it mid-run (`signal`), then `finish`; `kill` (also on any error in
    the test: use it as a context manager) SIGKILLs the whole group."""

    def __init__(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd=None) -> None:
        import threading

        env = child_env() if env is None else child_env(env)
        self.proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, buf), daemon=True)
                         for s, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, buf: list[str]) -> None:
        for line in stream:
            buf.append(line)

    def wait_for(self, text: str, timeout: float) -> None:
        import time

        end = time.monotonic() + timeout
        while not any(text in ln for ln in self.out + self.err):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"never saw {text!r}: {''.join(self.out)[-1500:]}{''.join(self.err)[-3000:]}")
            time.sleep(0.05)

    def signal(self, sig: int, group: bool = False) -> None:
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def finish(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout)
        finally:
            self.kill()
        for t in self._readers:
            t.join(10)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, "".join(self.out), "".join(self.err))

    def kill(self) -> None:
        _kill_group(self.proc.pid)

    def __enter__(self) -> Started:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
