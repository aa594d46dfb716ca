"""Checkpoints with torch.distributed.checkpoint, written atomically.

Every rank saves its own shards under keys prefixed `r<rank>.` (so the checkpoint belongs to one
plan and world size, checked on resume via meta.json). The job writes `step_<n>.tmp/`, waits
for every rank, then rank 0 records every file's size and SHA-256 in meta.json and renames the
folder to `step_<n>/`: a job killed mid-save leaves only a .tmp folder, never a checkpoint that
looks complete. On resume each candidate is verified against its meta.json; a corrupt or
truncated one is skipped (with a message) for the previous complete one, and with none left the
resume is refused naming the file. The last `keep` (2) checkpoints are kept.
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

from perfmodel import atomic
from perfmodel.specs import SpecError
from runtime import faults


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
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f"step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    faults.point("ckpt", rank, step)  # MOEPERF_FAULT (tests): die in the middle of the save
    _barrier()
    if rank == 0:
        atomic.write_json(tmp / "meta.json", {**meta, "step": step, "files": _files(tmp)})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        old = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def saved_meta(path: Path) -> dict:
    """The meta.json `save` wrote: the caller's meta (e.g. its data position) plus `step` and `files`."""
    return json.loads((path / "meta.json").read_text())


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
