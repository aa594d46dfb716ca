"""Shared helpers for the kernel tests (imported by path-relative name via conftest's directory)."""

import torch

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: one number per tensor, robust to entries near zero."""
    if b.numel() == 0:
        return 0.0
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def random_counts(gen: torch.Generator, experts: int, max_rows: int) -> torch.Tensor:
    """Counts with at least one empty expert whenever experts > 1 (the case the kernels must skip)."""
    counts = torch.randint(0, max_rows + 1, (experts,), generator=gen)
    if experts > 1:
        counts[torch.randint(0, experts, (1,), generator=gen)] = 0
    return counts
