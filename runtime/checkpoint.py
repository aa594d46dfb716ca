"""Checkpoints with torch.distributed.checkpoint, written atomically.

Every rank saves its own shards under keys prefixed `r<rank>.` (so the checkpoint belongs to one
plan and world size, checked on resume via meta.json). The job writes `step_<n>.tmp/`, waits
for every rank, then rank 0 renames it to `step_<n>/`: a job killed mid-save leaves only a
.tmp folder, never a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from perfmodel import atomic
from perfmodel.specs import SpecError


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def latest(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "meta.json").is_file())
    return done[-1] if done else None


def save(ckpt_dir: Path, step: int, state: dict, rank: int, meta: dict, keep: int = 2) -> Path:
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f"step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if rank == 0:
        atomic.write_json(tmp / "meta.json", {**meta, "step": step})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        old = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()
    return final


def load(path: Path, state: dict, meta: dict) -> int:
    """Load `path` into `state` in place; returns the step it was taken after."""
    saved = json.loads((path / "meta.json").read_text())
    for key in ("world", "plan", "model"):
        if saved.get(key) != meta.get(key):
            raise SpecError(f"--resume: checkpoint {path} was written with a different {key}; "
                            "resume with the same model, plan and world size")
    dcp.load(state, checkpoint_id=str(path))
    return int(saved["step"])


def rng_state() -> torch.Tensor:
    return torch.get_rng_state()
