"""Host-bound time on an asynchronous device (GPU traces): `host_us_per_op` and `step_overhead_us`.

A GPU runs ahead of the Python loop that issues its kernels, so the time no kernel covers is not
extra work added to every op (as it is on CPU, where ops run inline): the device simply waits
whenever the host issues ops more slowly than they run. The simulator prices an op as
max(device time, host time per op) (perfmodel.sim.hardware), so the two are fitted the same way, on
the step times the runs measured without the profiler:

    step = step_overhead + sum over compute-op instances of max(device_s, host_s) + comm_s

with device_s each op's measured kernel time per instance (perfmodel.calibrate.data.stage_ops
gives the instances), a grid over host_s and step_overhead the least-relative-error intercept.
Runs of different micro-batch sizes tell the two apart: their op counts differ several-fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perfmodel.calibrate.data import measured_step_s, run_specs, stage_of, stage_ops
from perfmodel.calibrate.trace_reader import read_run
from perfmodel.sim.opgraph import OpGraph


@dataclass(frozen=True)
class HostCase:
    run: str
    instances: np.ndarray  # per compute event: instances per step
    device_s: np.ndarray  # per compute event: measured kernel seconds per instance
    comm_s: float  # measured collective seconds per step
    step_s: float  # measured (unprofiled) step time

    def predict(self, host_s: float, step_overhead_s: float = 0.0) -> float:
        return step_overhead_s + float(np.sum(self.instances * np.maximum(self.device_s, host_s))) + self.comm_s


def host_cases(run_dirs: list[str | Path]) -> list[HostCase]:
    """One case per run of kernel-timed (GPU) traces, from the slowest rank; [] if any run is CPU."""
    out = []
    for d in run_dirs:
        meta, traces = read_run(d)
        if not traces or not all(tr.device for tr in traces):
            return []
        model, plan, world = run_specs(meta, str(d))
        graph, step_s = OpGraph(model, plan, world), measured_step_s(meta, traces)
        best: HostCase | None = None
        for k, tr in enumerate(traces):
            ops = stage_ops(graph, stage_of(plan, world, k))
            measured = tr.op_seconds_per_step()
            comp = [(n, measured.get(ev, 0.0) / n) for ev, (op, n) in ops.items() if op.kind != "comm" and n > 0]
            comm = sum(measured.get(ev, 0.0) for ev, (op, _n) in ops.items() if op.kind == "comm")
            case = HostCase(str(d), np.array([c[0] for c in comp], float), np.array([c[1] for c in comp], float),
                            comm, step_s)
            if best is None or case.predict(0.0) > best.predict(0.0):
                best = case
        if best is not None and best.step_s > 0:
            out.append(best)
    return out


def fit_host(cases: list[HostCase]) -> tuple[float, float, float]:
    """(host seconds per op, step overhead seconds, RMS relative step-time error) over the cases."""
    if not cases:
        raise ValueError("no cases")
    meas = np.array([c.step_s for c in cases])
    w = 1.0 / meas**2
    best = (float("inf"), 0.0, 0.0)
    for h in np.concatenate([[0.0], np.geomspace(1e-6, 5e-2, 400)]):
        pred = np.array([c.predict(float(h)) for c in cases])
        s = max(0.0, float(np.sum(w * (meas - pred)) / np.sum(w)))
        err = float(np.sum(((pred + s - meas) / meas) ** 2))
        if err < best[0]:
            best = (err, float(h), s)
    return best[1], best[2], float(np.sqrt(best[0] / len(cases)))
