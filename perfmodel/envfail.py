"""Environment failures: the machine, not the input, refused (disk full, read-only folder, permission
denied, a file where a folder should be, an output folder held by another moeperf). One line that
names the cause and the path, exit 1; bad input keeps exit 2 (perfmodel/cli.py).

Any command (and any future one) reuses it: raise an OSError (or EnvError) and perfmodel.cli turns it
into the line; or call `fail(command, exc)` directly from a command's own handler.
"""

from __future__ import annotations

import sys

EXIT_ENV = 1  # environment / internal failure; 2 is bad input


class EnvError(Exception):
    """A failure of the environment that already has its one-line message (no path/cause to add)."""


def describe(exc: BaseException) -> str:
    """`cause (path)` for an OSError (`No space left on device (/mnt/x/ckpt)`), else the message."""
    if isinstance(exc, OSError):
        cause = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
        path = exc.filename
        return f"{cause} ({path})" if path else cause
    return " ".join(str(exc).split())


def line(command: str, exc: BaseException, prefix: str = "") -> str:
    """The one line a user sees: `moeperf run: error: rank 1: checkpoint step 6: No space left ... (path)`."""
    return f"moeperf {command}: error: {prefix}{describe(exc)}"


def fail(command: str, exc: BaseException, prefix: str = "") -> int:
    """Print the one line on stderr and return the exit status (1)."""
    print(line(command, exc, prefix), file=sys.stderr, flush=True)
    return EXIT_ENV

