"""Op-graph spans (`record_function("moe.fc1/fwd")`) that cost nothing unless a profiler records.

`span(name)` is torch.profiler.record_function while a profiler is active (runtime.profiling's
StepProfiler starts one for the steps of --profile-steps; any torch.profiler.profile does too), and
a shared do-nothing context otherwise: an idle record_function still costs ~5-10 us of host time per
enter/exit, i.e. per op, which is the host-bound GPU step's whole budget. The check reads the
profiler state torch keeps per thread and carries into autograd's worker threads, so spans opened in
backward follow the same rule. The names are the op graph's (perfmodel/specs/opnames.py); calibration
reads them, so callers pass them exactly as before.
"""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

_IDLE = contextlib.nullcontext()
_enabled = getattr(torch._C._autograd, "_profiler_enabled", None) or (lambda: True)


def span(name: str | None):
    """A profiler span named `name` while profiling; a no-op context otherwise (or when name is None)."""
    if name is None or not _enabled():
        return _IDLE
    return record_function(name)


def profiling() -> bool:
    """True while a torch profiler is recording on this thread."""
    return bool(_enabled())
