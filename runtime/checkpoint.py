"""Checkpoints with torch.distributed.checkpoint, written atomically.

Every rank saves its own shards under keys prefixed `r<rank>.` (so the checkpoint belongs to one
plan and world size, checked on resume via meta.json). The job writes `step_<n>.tmp/`, waits
for every rank, then rank 0 records every file's size and SHA-256 in meta.json and renames the
folder to `step_<n>/`: a job killed mid-save leaves only a .tmp folder, never a checkpoint that
looks complete. On resume each candidate is verified against its meta.json; a corrupt or
truncated one is skipped (with a message) for the previous complete one, and with none left the
resume is refused naming the file. The last `keep` (2) checkpoints are kept.

A save that fails on any rank (disk full, read-only, permission denied) fails on every rank alike
(CheckpointError naming the first failing rank, the step and the path; the half-written .tmp folder
is removed), so the job ends with one line and the previous checkpoint stays the latest good one.
`.tmp` folders left by a killed save are removed at the next start (`remove_stale`). Before a save,
`room` checks that the disk holds about the last checkpoint's size; if not, the save is skipped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from perfmodel import atomic, envfail
from perfmodel.specs import SpecError
from runtime import faults


class CheckpointError(Exception):
    """A save failed for the environment (disk full, ...): `rank K: checkpoint step N: cause (path)`."""


class _Writer(FileSystemWriter):
    """DCP's file writer with the `enospc` fault (tests): fails this rank's shard write as a full disk does."""

    def __init__(self, path: Path, rank: int, step: int) -> None:
        super().__init__(str(path))
        self._fault = (rank, step, str(path))

    def write_data(self, plan, planner):
        faults.enospc(*self._fault)
        return super().write_data(plan, planner)


def _why(rank: int, step: int, exc: BaseException) -> str:
    return f"rank {rank}: checkpoint step {step}: {envfail.describe(exc)}"


def _agree(err: str | None) -> str | None:
    """Every rank's error (or None) to every rank: the first one, so all ranks fail alike or none does."""
    if not dist.is_initialized():
        return err
    errs: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    return next((e for e in errs if e), None)


def _from_dcp(exc: CheckpointException, step: int) -> str:
    """The first failing rank's OSError from DCP's collected failures; anything else is not ours to name."""
    for rank, (cause, _tb) in sorted(exc.failures.items()):
        if isinstance(cause, OSError):
            return _why(rank, step, cause)
    raise exc


def remove_stale(ckpt_dir: Path) -> list[Path]:
    """Remove `step_<n>.tmp/` folders (saves that never committed: killed or failed). Call before saving."""
    stale = sorted(ckpt_dir.glob("step_*.tmp")) if ckpt_dir.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def free_bytes(path: Path) -> int:
    """Free bytes on the disk holding `path` (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def last_size(ckpt_dir: Path) -> int | None:
    """Bytes of the newest committed checkpoint, from its meta.json (None: no checkpoint yet)."""
    last = latest(ckpt_dir) if ckpt_dir.is_dir() else None
    try:
        files = json.loads((last / "meta.json").read_text())["files"] if last else None
        return sum(int(f["bytes"]) for f in files.values()) if files else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def room(ckpt_dir: Path, step: int, state: dict, rank: int) -> tuple[bool, int, int]:
    """(fits, need_bytes, free_bytes), the same on every rank: a save needs about the last checkpoint's
    size (the first one: every rank's state bytes) plus 5 %, free on every rank's disk."""
    free = 0 if faults.low_disk(rank, step) else free_bytes(ckpt_dir)
    mine = (free, _tensor_bytes(state))
    every = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    need = int((last_size(ckpt_dir) or sum(b for _, b in every)) * 1.05)
    least = min(f for f, _ in every)
    return least >= need, need, least


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def complete(ckpt_dir: Path) -> list[Path]:
    """Committed checkpoints (renamed from .tmp, with meta.json), oldest first."""
    return sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "meta.json").is_file())


def latest(ckpt_dir: Path) -> Path | None:
    done = complete(ckpt_dir)
    return done[-1] if done else None


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, dict]:
    return {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": _digest(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "meta.json"}


def problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be used (None: it is intact)."""
    try:
        saved = json.loads((path / "meta.json").read_text())
        files = saved["files"] if isinstance(saved, dict) and "files" in saved else None
        int(saved["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"meta.json unreadable ({type(exc).__name__})"
    for name, want in (files or {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, {want['bytes']} were written"
        if _digest(f) != want["sha256"]:
            return f"{name} fails its SHA-256 check"
    return None


def latest_good(ckpt_dir: Path, log: bool = True) -> Path | None:
    """The newest intact checkpoint; corrupt ones are reported and skipped. None when there is none at
    all; SpecError when there are checkpoints but every one is corrupt."""
    done = complete(ckpt_dir)
    bad = []
    for p in reversed(done):
        why = problem(p)
        if why is None:
            if bad and log:
                print(f"moeperf run: warning: skipped corrupt checkpoint(s) {'; '.join(bad)}; resuming from {p.name}",
                      file=sys.stderr, flush=True)
            return p
        bad.append(f"{p}: {why}")
    if bad:
        raise SpecError(f"--resume: every checkpoint is corrupt ({'; '.join(bad)}); remove {ckpt_dir} to start over")
    return None


def save(ckpt_dir: Path, step: int, state: dict, rank: int, meta: dict, keep: int = 2) -> Path:
    """Collective. Raises CheckpointError on every rank if any rank's part failed for the environment."""
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f"step_{step:06d}.tmp"
    err = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            err = _why(rank, step, exc)
    _fail_if(_agree(err), tmp, rank)
    try:
        dcp.save(state, storage_writer=_Writer(tmp, rank, step))
    except CheckpointException as exc:  # DCP gathers every rank's failure: all ranks land here alike
        _fail_if(_from_dcp(exc, step), tmp, rank)
    faults.point("ckpt", rank, step)  # MOEPERF_FAULT (tests): die in the middle of the save
    _barrier()
    if rank == 0:
        try:
            atomic.write_json(tmp / "meta.json", {**meta, "step": step, "files": _files(tmp)})
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except OSError as exc:
            err = _why(rank, step, exc)
    _fail_if(_agree(err), tmp, rank)
    if rank == 0:
        old = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def saved_meta(path: Path) -> dict:
    """The meta.json `save` wrote: the caller's meta (e.g. its data position) plus `step` and `files`."""
    return json.loads((path / "meta.json").read_text())


def _fail_if(err: str | None, tmp: Path, rank: int) -> None:
    if err is None:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
    raise CheckpointError(err)


def load(path: Path, state: dict, meta: dict) -> int:
    """Load `path` into `state` in place; returns the step it was taken after."""
    saved = json.loads((path / "meta.json").read_text())
    saved.pop("files", None)
    for key in ("world", "plan", "model"):
        if saved.get(key) != meta.get(key):
            raise SpecError(f"--resume: checkpoint {path} was written with a different {key}; "
                            "resume with the same model, plan and world size")
    dcp.load(state, checkpoint_id=str(path))
    return int(saved["step"])


def rng_state() -> torch.Tensor:
    return torch.get_rng_state()
