"""The discrete-event simulator: `simulate(model, cluster, plan, profile=None, *, trace=False)`.

`simulate` is imported lazily so that perfmodel.sim.collectives can use perfmodel.sim.fluid
without an import cycle.
"""

from typing import Any

from perfmodel.sim.result import SimResult, TraceEvent

__all__ = ["simulate", "SimResult", "TraceEvent"]


def __getattr__(name: str) -> Any:
    if name == "simulate":
        from perfmodel.sim.engine import simulate

        return simulate
    raise AttributeError(f"module 'perfmodel.sim' has no attribute {name!r}")
