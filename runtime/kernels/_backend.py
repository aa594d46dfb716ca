"""Backend selection shared by every kernel module.

Triton is imported lazily and only once, so `backend="torch"` works on machines where
triton is missing, and the error for `backend="triton"` names the actual cause.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

BACKENDS = ("triton", "torch", "auto")


@lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """None when triton imports, else the reason (kept so every caller sees the same text)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    return None


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# triton.jit picks interpreted or compiled when a kernel is *defined*, i.e. when the kernel
# modules import; freezing the flag then keeps our decisions consistent with the kernel objects
# even if the environment changes later.
_INTERPRET = _env_interpret()


def interpret_mode() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they run on CPU tensors)."""
    return _INTERPRET


def enable_interpreter() -> None:
    """Set TRITON_INTERPRET=1 for this process, or fail clearly if it is too late to matter.

    triton decides interpreted vs compiled when triton.language is imported (its own helpers
    such as tl.cdiv are jit functions), so the variable must be set before the first import of
    triton; redefining our kernels afterwards would not help.
    """
    global _INTERPRET
    os.environ["TRITON_INTERPRET"] = "1"
    if _INTERPRET or triton_import_error() is not None:
        _INTERPRET = _INTERPRET or triton_import_error() is None
        return
    raise RuntimeError("runtime.kernels (and triton) were imported before TRITON_INTERPRET=1 was set; "
                       "set it before anything imports triton, e.g. at the top of a conftest.py")


def triton_usable_on(device: torch.device) -> bool:
    """Triton runs compiled on CUDA and interpreted on CPU only under TRITON_INTERPRET=1."""
    if triton_import_error() is not None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpret_mode()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend to the one that runs; fail loudly rather than silently falling back.

    'auto' picks triton wherever it can run (CUDA, or CPU with TRITON_INTERPRET=1) and torch
    otherwise; an explicit 'triton' that cannot run is an error, because a silent fallback would
    make 'kernels: triton' runs measure the torch path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if triton_usable_on(device) else "torch"
    err = triton_import_error()
    if err is not None:
        raise RuntimeError(f"backend='triton' requested but triton is not importable ({err}); "
                           "install triton>=3.6 or use backend='torch'")
    if not triton_usable_on(device):
        raise RuntimeError(f"backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors "
                           f"(got device {device}); set TRITON_INTERPRET=1 before importing triton "
                           "or use backend='torch'")
    return "triton"


def use_autotune(device: torch.device) -> bool:
    """Autotuning only pays on a real GPU; in the interpreter it would run every config serially."""
    return device.type == "cuda" and not interpret_mode()
