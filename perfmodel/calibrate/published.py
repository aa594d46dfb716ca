"""Production constants of the GPU profiles fitted on published training runs, with leave-one-out
errors (`moeperf calibrate --published DIR`).

A production training loop reaches less of the hardware than a kernel benchmark. The profiles
hold kernel-level curves (GEMM, grouped GEMM and attention efficiency measured on an H100,
FP8 GEMMs fitted to measured FP8 grouped GEMMs, fabrics at nccl-tests level) scaled by
production constants, fitted here per GPU family (the profile a run's cluster names):
  compute      x the 16-bit compute maxima (GEMM, grouped GEMM, attention)
  compute_fp8  x the FP8 GEMM maxima (precision: fp8); with no FP8 run in a family it follows
               `compute` (a prior ties their ratio to 1, weight PRIOR_TIE)
  fabric       x the network fabrics' efficiency (InfiniBand / Ethernet NICs, PCIe)
  nvlink       x the NVLink efficiency; without evidence it follows `fabric` (prior PRIOR_TIE)
  launch_us    optionally (`--fit-launch`), the per-op launch overhead (`launch_overhead_us`)
by least squares on r = ln(predicted / measured tokens/s), every run weighted alike, with a weak
prior (PRIOR) toward fixed START constants so a constant no run constrains stays put.

The fit is Gauss-Newton on exact simulations: each iteration simulates every run at the current
constants and once per constant it depends on (forward differences in the log). ln(tokens/s) is
close to linear in the log constants (compute and transfer times scale as 1/constant), so a few
iterations converge. Leave-one-out: for each run, the fit without it is one Gauss-Newton step
from the full fit (the linearization is exact to the accuracy of that near-linearity), and the
held-out run is simulated exactly at those constants: its LOO error is a prediction it did not
inform. The LOO log residuals' RMS gives the profiles' uncertainty band (perfmodel.sim.uncertainty).
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from perfmodel.compare.out import kendall_tau
from perfmodel.specs import ClusterSpec, ModelSpec, PlanSpec, ProfileSpec, with_overrides
from perfmodel.specs.published import load_published, measured_tokens_per_s, resolve
from perfmodel.specs.validate import cluster_profile

# Kernel level (what a kernel benchmark reaches), the base the production constants scale.
# 16-bit curves: measured on an H100 80GB HBM3 (torch 2.11, cuBLAS / cuDNN; studies/h100-1gpu-compare/
# profile.yaml, `moeperf compare studies/h100-1gpu.yaml`). FP8: the grouped curve fitted to the FP8
# grouped-GEMM TFLOP/s in benchmarks/results/kernels_gpu_nvidia-h100-80gb-hbm3.csv; the dense one is the
# 16-bit curve x the measured FP8/BF16 grouped ratio (see perfmodel/presets/gpus/h800.yaml).
KERNEL_CURVES = {
    "gemm_efficiency": (0.770352, 4.2446e10),
    "grouped_gemm_efficiency": (0.672602, 1.40829e11),
    "attention_efficiency": (0.374866, 0.0),
    "fp8_gemm_efficiency": (0.701, 4.97e10),
    "fp8_grouped_gemm_efficiency": (0.6125, 1.65e11),
}
COMPUTE_16 = ("gemm_efficiency", "grouped_gemm_efficiency", "attention_efficiency")
COMPUTE_FP8 = ("fp8_gemm_efficiency", "fp8_grouped_gemm_efficiency")
# fabrics at nccl-tests level: NCCL bus bandwidth ~0.80 of NVLink, ~0.85 of an InfiniBand NIC
DATASHEET_FABRIC = {"nvlink": 0.80, "ib": 0.85, "pcie": 0.80, "ethernet": 0.80}
# families whose constants are copied from another: the H200 is an H100 with more HBM (same SMs,
# NVLink and NICs) and no published run of its own
SHARES = {"h200": "h100-sxm"}
PARAMS = ("compute", "compute_fp8", "fabric", "nvlink", "launch_us")
START = {"compute": 0.6212, "compute_fp8": 0.6212, "fabric": 0.5880, "nvlink": 0.5880, "launch_us": 4.0}
TIES = {"compute_fp8": "compute", "nvlink": "fabric"}  # constant -> the one it follows without evidence
PRIOR = 1e-3  # weight of (ln c - ln start)^2: keeps unconstrained constants at the start
PRIOR_TIE = 0.01  # weight of (ln compute_fp8 - ln compute)^2 and (ln nvlink - ln fabric)^2
STEP = 0.04  # forward-difference step of the log constants


@dataclass(frozen=True)
class Constants:
    compute: float = START["compute"]
    compute_fp8: float = START["compute_fp8"]
    fabric: float = START["fabric"]
    nvlink: float = START["nvlink"]
    launch_us: float = START["launch_us"]


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # the independent source
    family: str  # the GPU profile whose constants the run informs
    precision: str
    gpus: int
    measured_tokens_per_s: float
    model: ModelSpec
    cluster: ClusterSpec
    plan: PlanSpec
    base: ProfileSpec


def production_profile(base: ProfileSpec, c: Constants) -> ProfileSpec:
    """`base` with kernel-level curves x the production constants (efficiencies capped at 1)."""
    over: dict = {}
    for field, (mx, half) in KERNEL_CURVES.items():
        if field in COMPUTE_FP8 and "fp8" not in base.peak_tflops:
            continue
        scale = c.compute_fp8 if field in COMPUTE_FP8 else c.compute
        over[field] = {"max": round(min(1.0, mx * scale), 6), "half_work": half}
    over["fabrics"] = {k: {**v.model_dump(), "efficiency": round(min(1.0, DATASHEET_FABRIC.get(k, v.efficiency) *
                                                                     (c.nvlink if k == "nvlink" else c.fabric)), 6)}
                       for k, v in base.fabrics.items()}
    over["launch_overhead_us"] = round(max(0.0, c.launch_us), 4)
    return with_overrides(base, over, f"profile {base.name}")


def cases(folder: str | Path) -> list[Case]:
    out = []
    for run in load_published(folder):
        model, cluster, plan = resolve(run, Path(folder))
        base = cluster_profile(cluster, f"published_run {run.name}", Path(folder))
        out.append(Case(run.name, run.source.group, base.name, run.precision, cluster.world_size,
                        measured_tokens_per_s(run, Path(folder)), model, cluster, plan, base))
    return out


def predict(case: Case, c: Constants) -> float:
    """Simulated tokens/s of the run with its family's profile at constants `c`."""
    from perfmodel.sim import simulate

    return simulate(case.model, case.cluster, case.plan, production_profile(case.base, c)).tokens_per_s


def _predict_job(job: tuple[Case, Constants]) -> float:
    return predict(*job)


class _Pool:
    """Simulations in parallel processes (jobs > 1) or in this one."""

    def __init__(self, jobs: int):
        self.ex = ProcessPoolExecutor(jobs) if jobs > 1 else None

    def map(self, jobs: list[tuple[Case, Constants]], progress=None) -> list[float]:
        it = self.ex.map(_predict_job, jobs) if self.ex else map(_predict_job, jobs)
        out = []
        for v in it:
            out.append(v)
            if progress:
                progress()
        return out

    def close(self) -> None:
        if self.ex:
            self.ex.shutdown()


# --------------------------------------------------------------------------- parameters
def free_params(cs: list[Case], fit_launch: bool) -> list[tuple[str, str]]:
    """(family, constant) pairs the fit varies, in a fixed order."""
    out = []
    for fam in sorted({c.family for c in cs}):
        names = ["compute", "compute_fp8", "fabric", "nvlink"]  # tied constants follow by prior (TIES)
        if fit_launch:
            names.append("launch_us")
        out += [(fam, n) for n in names]
    return out


def _log(name: str, v: float) -> float:
    return v if name == "launch_us" else math.log(v)


def _exp(name: str, x: float) -> float:
    return max(0.0, x) if name == "launch_us" else math.exp(x)


def constants_of(theta: np.ndarray, params: list[tuple[str, str]], family: str, start: dict[str, Constants]) -> Constants:
    c = start.get(family, Constants())
    for (fam, name), x in zip(params, theta, strict=True):
        if fam == family:
            c = replace(c, **{name: _exp(name, float(x))})
    return c


def _step(name: str) -> float:
    """Forward-difference step of a constant: STEP in the log, 5 us for the launch overhead."""
    return 5.0 if name == "launch_us" else STEP


def _depends(case: Case, param: tuple[str, str]) -> bool:
    fam, name = param
    return fam == case.family and (name != "compute_fp8" or case.precision == "fp8")


def _prior_center(params: list[tuple[str, str]]) -> np.ndarray:
    """The priors' center: the fixed START constants, so the fit does not depend on where it starts
    (the presets' current constants) and regenerating the presets is reproducible."""
    return np.array([_log(n, START[n]) for _, n in params])


def _prior_rows(theta: np.ndarray, params: list[tuple[str, str]], theta0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residual rows and their Jacobian for the priors."""
    rows, jac = [], []
    for i, (fam, name) in enumerate(params):
        w = math.sqrt(PRIOR) * (0.1 if name == "launch_us" else 1.0)
        rows.append(w * (theta[i] - theta0[i]))
        e = np.zeros(len(params))
        e[i] = w
        jac.append(e)
        if name in TIES:
            j = params.index((fam, TIES[name]))
            rows.append(math.sqrt(PRIOR_TIE) * (theta[i] - theta[j]))
            e = np.zeros(len(params))
            e[i], e[j] = math.sqrt(PRIOR_TIE), -math.sqrt(PRIOR_TIE)
            jac.append(e)
    return np.array(rows), np.array(jac)


@dataclass
class Fit:
    params: list[tuple[str, str]]
    theta: np.ndarray
    residuals: np.ndarray  # ln(pred / measured) per case at theta
    jacobian: np.ndarray  # d residual / d theta
    iterations: int

    def constants(self, family: str, start: dict[str, Constants]) -> Constants:
        """The fitted constants of `family` (a family sharing another's: that one's)."""
        return constants_of(self.theta, self.params, SHARES.get(family, family), start)


def _evaluate(cs: list[Case], theta: np.ndarray, params: list[tuple[str, str]], start: dict[str, Constants],
              pool: _Pool, progress=None) -> tuple[np.ndarray, np.ndarray]:
    jobs: list[tuple[Case, Constants]] = []
    for case in cs:
        jobs.append((case, constants_of(theta, params, case.family, start)))
        for k, p in enumerate(params):
            if _depends(case, p):
                th = theta.copy()
                th[k] += _step(p[1])
                jobs.append((case, constants_of(th, params, case.family, start)))
    values = pool.map(jobs, progress)
    r = np.zeros(len(cs))
    J = np.zeros((len(cs), len(params)))
    at = 0
    for i, case in enumerate(cs):
        r[i] = math.log(values[at] / case.measured_tokens_per_s)
        base = values[at]
        at += 1
        for k, p in enumerate(params):
            if _depends(case, p):
                J[i, k] = (math.log(values[at]) - math.log(base)) / _step(p[1])
                at += 1
    return r, J


def _gn_step(r: np.ndarray, J: np.ndarray, theta: np.ndarray, params: list[tuple[str, str]],
             theta0: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """The Gauss-Newton update of the linearized least squares (rows in `keep` only)."""
    if keep is not None:
        r, J = r[keep], J[keep]
    pr, pj = _prior_rows(theta, params, theta0)
    A = np.vstack([J, pj])
    b = np.concatenate([r, pr])
    delta, *_ = np.linalg.lstsq(A, -b, rcond=None)
    return delta


def fit(cs: list[Case], start: dict[str, Constants], fit_launch: bool = False, jobs: int = 1,
        max_iter: int = 6, progress=None) -> Fit:
    params = free_params(cs, fit_launch)
    theta0 = _prior_center(params)
    theta = np.array([_log(n, getattr(start.get(f, Constants()), n)) for f, n in params])  # where GN starts
    pool = _Pool(jobs)
    iterations = 0
    try:
        while iterations < max_iter:
            iterations += 1
            r, J = _evaluate(cs, theta, params, start, pool, progress)
            delta = _gn_step(r, J, theta, params, theta0)
            theta = theta + delta
            if np.max(np.abs(delta)) < 2e-3:
                break
        r, J = _evaluate(cs, theta, params, start, pool, progress)
    finally:
        pool.close()
    return Fit(params, theta, r, J, iterations)


def leave_one_out(cs: list[Case], f: Fit, start: dict[str, Constants], jobs: int = 1,
                  progress=None) -> tuple[np.ndarray, list[Constants]]:
    """Each run's log residual predicted by the constants fitted without it."""
    theta0 = _prior_center(f.params)
    held: list[Constants] = []
    for i, case in enumerate(cs):
        keep = np.array([j != i for j in range(len(cs))])
        theta = f.theta + _gn_step(f.residuals, f.jacobian, f.theta, f.params, theta0, keep)
        held.append(constants_of(theta, f.params, case.family, start))
    pool = _Pool(jobs)
    try:
        values = pool.map(list(zip(cs, held, strict=True)), progress)
    finally:
        pool.close()
    loo = np.array([math.log(v / c.measured_tokens_per_s) for v, c in zip(values, cs, strict=True)])
    return loo, held


def summary(cs: list[Case], f: Fit, loo: np.ndarray) -> dict:
    errs = np.expm1(loo)
    per_gpu_meas = [c.measured_tokens_per_s / c.gpus for c in cs]
    per_gpu_loo = [c.measured_tokens_per_s * math.exp(r) / c.gpus for c, r in zip(cs, loo, strict=True)]
    return {"runs": len(cs), "groups": len({c.group for c in cs}),
            "loo_median_error_pct": round(100 * float(np.median(np.abs(errs))), 2),
            "loo_max_error_pct": round(100 * float(np.max(np.abs(errs))), 2),
            "fit_median_error_pct": round(100 * float(np.median(np.abs(np.expm1(f.residuals)))), 2),
            "kendall_tau": round(kendall_tau(per_gpu_meas, per_gpu_loo), 4)}
