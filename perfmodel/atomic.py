"""Atomic output files: write to a temp file in the same folder, fsync, rename.

A killed process or a full disk leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    try:
        return _write(path, data)
    except OSError as exc:  # name the file the caller asked for, not the temp file (or nothing: ENOSPC)
        if exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc


def _write(path: Path, data: bytes) -> Path:
    if path.parent.exists() and not path.parent.is_dir():  # mkdir would say "File exists": misleading
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: object) -> Path:
    import json

    return write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")
