"""What one simulated iteration reports. The JSON keys are a DESIGN.md contract:
`step_time_s, tokens_per_s, tokens_per_s_low, tokens_per_s_high, mfu, breakdown, memory_GiB`
(+ name, plan, details); low/high are the profile's error band (perfmodel.uncertainty), null
when the profile has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def stable(x: Any) -> Any:
    """Floats to 9 significant digits and dict keys sorted, recursively: byte-stable JSON."""
    if isinstance(x, float):
        return float(f"{x:.9g}")
    if isinstance(x, dict):
        return {k: stable(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
        return [stable(v) for v in x]
    return x


@dataclass
class TraceEvent:
    """One span of the simulated timeline (Chrome trace 'X' event once written)."""

    name: str  # op event name, e.g. "moe.fc1/wgrad"
    track: str  # stream or link class, e.g. "stage0/compute", "stage0/comm.ep", "link/ib"
    start_s: float
    dur_s: float
    args: dict[str, Any] = field(default_factory=dict)  # layer, microbatch, rank, bytes, flops


@dataclass
class SimResult:
    step_time_s: float
    tokens_per_s: float
    mfu: float
    # seconds of the iteration's critical path attributed to: compute, exposed_comm, bubble,
    # optimizer, grad_sync (exposed), other; they add up to step_time_s
    breakdown: dict[str, float]
    memory_GiB: dict[str, float]  # weights, grads, optimizer, activations, buffers, total, capacity
    fits: bool = True
    name: str = ""
    plan: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # per-op times of a layer, comm volumes, ...
    timeline: list[TraceEvent] = field(default_factory=list)
    # the profile's error band on tokens_per_s (perfmodel.uncertainty.band); None: no calibrated band
    tokens_per_s_low: float | None = None
    tokens_per_s_high: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Deterministic, JSON-ready dict (floats rounded so output is byte-stable)."""
        return stable({"name": self.name, "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
                  "tokens_per_s_low": self.tokens_per_s_low, "tokens_per_s_high": self.tokens_per_s_high,
                  "mfu": self.mfu, "breakdown": self.breakdown, "memory_GiB": self.memory_GiB,
                  "fits": self.fits, "plan": self.plan, "details": self.details})
