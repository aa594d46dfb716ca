"""The discrete-event simulator: `simulate(model, cluster, plan, profile=None, *, trace=False)`."""

from perfmodel.sim.engine import simulate
from perfmodel.sim.result import SimResult, TraceEvent

__all__ = ["simulate", "SimResult", "TraceEvent"]
