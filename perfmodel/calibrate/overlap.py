"""`comm_compute_slowdown` from the step times of runs that overlap communication with compute.

How much compute slows while communication is in flight shows in one place only: how much of
an overlapped plan's communication its step really hides. Per-op times cannot tell (on shared
CPU cores a GEMM is not slower while a peer's all-to-all progresses, yet nothing is hidden: the
cores the waiting rank frees already run the other ranks). So the value is fitted on step
times: the one (grid 0..3, step 0.05) whose simulated step times of the overlapped runs, priced
as the runtime executed them and with every other field as calibrated, best match the measured
ones (least squares of relative error, less the median error of the runs that overlap nothing).
Without an overlapped run the base profile's value stays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from perfmodel.calibrate.data import measured_step_s, run_cluster, run_specs
from perfmodel.calibrate.trace_reader import RankTrace
from perfmodel.specs import ClusterSpec, ModelSpec, PlanSpec, ProfileSpec

GRID = np.round(np.arange(0.0, 3.0001, 0.05), 2)


Case = tuple[ModelSpec, ClusterSpec, PlanSpec, float]  # model, cluster, plan as executed, measured step s


def step_cases(runs: list[tuple[str, dict[str, Any], list[RankTrace]]]) -> tuple[list[Case], list[Case]]:
    """The runs that overlap communication with compute, and those that do not (with a recorded
    cluster and step time)."""
    from perfmodel.sim.layer import as_executed

    over: list[Case] = []
    plain: list[Case] = []
    for where, meta, traces in runs:
        model, plan, world = run_specs(meta, where)
        ov = as_executed(plan.overlap)
        step_s, cluster = measured_step_s(meta, traces), run_cluster(meta, world, where)
        if step_s > 0 and cluster is not None:
            case = (model, cluster, plan.model_copy(update={"overlap": ov}), step_s)
            (over if ov.inter_op or ov.intra_op != "none" else plain).append(case)
    return over, plain


def _rel_errors(profile: ProfileSpec, cases: list[Case]) -> list[float]:
    from perfmodel.sim import simulate

    return [(simulate(m, c, plan, profile).step_time_s - t) / t for m, c, plan, t in cases]


def fit_slowdown(profile: ProfileSpec, over: list[Case], plain: list[Case]) -> tuple[float, float] | None:
    """(slowdown, RMS of the overlapped runs' relative step-time error at it, beyond the median
    error of the runs that overlap nothing: what overlap adds, not the profile's general bias);
    None without an overlapped run."""
    if not over:
        return None
    bias = float(np.median(_rel_errors(profile, plain))) if plain else 0.0

    def err(x: float) -> float:
        rel = _rel_errors(profile.model_copy(update={"comm_compute_slowdown": float(x)}), over)
        return float(np.sqrt(np.mean(np.square(np.array(rel) - bias))))

    errs = [err(x) for x in GRID]
    i = int(np.argmin(errs))
    return float(GRID[i]), errs[i]
