"""Fit a hardware profile from recorded traces: `moeperf calibrate TRACE_DIR... --out PROFILE`.

Every fit is a straight line in the op's work, solved by least squares on relative error
(numpy only), so it reads back directly into the profile's schema:

* memory ops      t = launch + bytes / (hbm_bw * memory_efficiency.max)
  -> `launch_overhead_us` (intercept) and `memory_efficiency.max` (or `hbm_bw_GBps` above 1);
* GEMM / grouped GEMM / attention, per dtype
                  t = launch + (flops + half_work) / (peak[dtype] * max)
  -> the curve's `max` and `half_work` (the intercept beyond launch), `peak_tflops[dtype]` for
  the other dtypes (and for the main one where the measured rate beats the preset peak);
* collectives, per collective and group kind
                  t = latency + bytes_per_rank / bw
  -> `collectives["all_to_all.ep"]` etc., per collective over all groups, and the fabric's
  latency and efficiency (median latency; rate / the cluster's link bandwidth);
* profiler cost: what torch.profiler adds per recorded event, fitted from profiled vs
  unprofiled step times of the runs and taken out of every sample (perfmodel.calibrate.data);
* framework overhead: step time outside every op span (Python glue, small unnamed ops), fitted
  over the runs as a part per compute-op instance (added to `launch_overhead_us`) and a part per
  step (`step_overhead_us`: data, zero_grad, the loop); on CPU it is a large share of a step.
  On GPU traces (kernel times) the host runs ahead of the device instead: `host_us_per_op` (an
  op lasts at least that long) and `step_overhead_us` are fitted on the step times
  (perfmodel.calibrate.host);
* `sync_skew`: the spread of the ranks' arrival at a collective as a fraction of the work each
  did since its previous collective (ranks drift apart while they compute; the mean rank waits
  for the last of its n peers: perfmodel.sim.collectives.straggler_wait_s), chosen jointly with the
  collectives' alpha-beta fits (which are then fitted on the time without that wait);
* `comm_compute_slowdown`: fitted on the step times of the runs that overlap communication
  with compute (perfmodel.calibrate.overlap); kept from the base profile without such a run.

The profile is written atomically with `calibrated_from` (the run directories) and `residuals`
(RMS relative error and sample count of each fit); one PNG per fit goes beside it.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from perfmodel import atomic
from perfmodel.argparse_util import parser
from perfmodel.calibrate.data import Sample, base_profile, collect, expand_dirs, shown
from perfmodel.calibrate.host import fit_host, host_cases
from perfmodel.calibrate.overlap import fit_slowdown, step_cases
from perfmodel.calibrate.trace_reader import read_run
from perfmodel.sim.collectives import latency_steps, straggler_wait_s
from perfmodel.specs import ProfileSpec, SpecError, parse_spec

CURVES = {"gemm": "gemm_efficiency", "grouped_gemm": "grouped_gemm_efficiency", "attention": "attention_efficiency"}


def linfit(w: np.ndarray, t: np.ndarray, intercept: float | None = None,
           weight: np.ndarray | None = None) -> tuple[float, float]:
    """t ~ a + b*w; a >= 0, b > 0. A fixed `intercept` fits b only.

    Without `weight` the fit minimises relative error. With `weight` (instances per step) it is
    weighted least squares on absolute time: with a free intercept its residuals then sum to
    zero, so the fitted ops' total time per step is reproduced exactly (what a step time needs).
    """
    w, t = np.asarray(w, float), np.asarray(t, float)
    ok = (t > 0) & np.isfinite(t) & np.isfinite(w) & (w >= 0)
    wt = np.sqrt(np.asarray(weight, float)[ok]) / float(np.mean(t[ok])) if weight is not None and ok.any() else None
    w, t = w[ok], t[ok]
    if len(t) == 0:
        raise ValueError("no samples")
    r = 1.0 / t if wt is None else wt

    def slope(a: float) -> float:
        num, den = float(np.sum((t - a) * w * r * r)), float(np.sum(w * w * r * r))
        return max(num / den, 1e-30) if den > 0 else 1e-30

    if intercept is None and len(np.unique(w)) >= 2:
        A = np.stack([r, w * r], axis=1)
        (a, b), *_ = np.linalg.lstsq(A, t * r, rcond=None)
        if a >= 0 and b > 0:
            return float(a), float(b)
        if b <= 0:  # time does not grow with work: all latency
            return float(np.median(t)), 1e-30
        return 0.0, slope(0.0)
    a = max(0.0, intercept if intercept is not None else 0.0)
    if intercept is None:  # one size only: cannot split latency from rate; charge it all to rate
        return 0.0, slope(0.0)
    return a, slope(a)


def hops(s: Sample, exponent: float = 1.0) -> float:
    """Latency steps of the sample's collective (perfmodel.sim.collectives.latency_steps)."""
    return latency_steps(s.collective or "", s.group_size, exponent)


def _fabric_fit(comm: list[Sample]) -> tuple[float, float]:
    """One fabric for every collective: t = latency * hops + bytes_per_rank / rate (relative LS)."""
    h = np.array([hops(s) for s in comm], float)
    w, t = _arrays(comm)
    r = 1.0 / t
    (lat, inv), *_ = np.linalg.lstsq(np.stack([h * r, w * r], axis=1), np.ones_like(t), rcond=None)
    if inv <= 0:
        inv = 1e-12
        lat = float(np.median(t / h))
    if lat < 0:
        lat = 0.0
        inv = float(np.sum(t * w * r * r) / max(np.sum(w * w * r * r), 1e-300))
    return float(lat), 1.0 / max(float(inv), 1e-30)


def rms_rel(w: np.ndarray, t: np.ndarray, a: float, b: float) -> float:
    pred = a + b * np.asarray(w, float)
    return float(np.sqrt(np.mean(((pred - t) / t) ** 2))) if len(t) else 0.0


def _arrays(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([s.work for s in samples], float), np.array([s.seconds for s in samples], float)


def _wfit(samples: list[Sample]) -> tuple[float, float]:
    """Time-preserving fit (weights: instances per step)."""
    return linfit(*_arrays(samples), weight=np.array([s.instances for s in samples], float))


def _wait(s: Sample, skew: float) -> float:
    return straggler_wait_s(skew, s.interval_s, s.group_size)


def _less_wait(s: Sample, skew: float) -> Sample:
    """The sample without its straggler wait (perfmodel.sim.collectives.straggler_wait_s)."""
    return replace(s, seconds=max(s.seconds - _wait(s, skew), 0.05 * s.seconds))


def _key_fit(ss: list[Sample], rate: float, exponent: float = 1.0) -> tuple[float, float]:
    """(latency per latency step, seconds per byte) of one collective kind. Its own slope only where
    its samples span sizes (>= 4x) on one group size; otherwise (one payload size, or sizes
    confounded with group sizes) the fabric-wide rate, and the latency is what remains, per
    latency step (weighted least squares, instances per step as weights)."""
    w = [s.work for s in ss]
    if min(w) > 0 and max(w) >= 4 * min(w) and len({s.group_size for s in ss}) == 1:
        a, b = _wfit(ss)
        return a / hops(ss[0], exponent), b
    b = 1.0 / max(rate, 1e-30)
    n = np.array([s.instances for s in ss], float)
    h = np.array([hops(s, exponent) for s in ss], float)
    rest = np.array([max(0.0, s.seconds - b * s.work) for s in ss])
    return float(np.sum(n * h * rest) / np.sum(n * h * h)), b


def _comm_fits(comm: dict[str, list[Sample]], skew: float, exponent: float = 1.0
               ) -> tuple[dict[str, tuple[float, float]], float]:
    """Per-collective (latency_s per step, s_per_byte) after removing `skew` x interval, and the
    relative error of the whole model on the samples."""
    rest = {k: [_less_wait(s, skew) for s in ss] for k, ss in comm.items()}
    rate = _fabric_fit([s for ss in rest.values() for s in ss])[1]
    fits = {k: _key_fit(ss, rate, exponent) for k, ss in rest.items()}
    err = sum(((a * hops(s, exponent) + b * s.work + _wait(s, skew) - s.seconds) / s.seconds) ** 2
              for k, (a, b) in fits.items() for s in comm[k])
    return fits, err


def _comm_model(comm: dict[str, list[Sample]]) -> tuple[float | None, float | None]:
    """(`sync_skew`, `latency_exponent`): the ranks' drift per second of work between collectives
    (their straggler wait), and how latency grows with the group, chosen jointly with every
    collective's alpha-beta refitted on the rest (grid: skew 0..3, exponent 0..1; least relative
    error). Each is None when the samples cannot tell (no intervals; no collective kind seen on
    two group sizes)."""
    if not comm:
        return None, None
    tell_skew = any(s.interval_s > 0 for ss in comm.values() for s in ss)
    tell_exp = any(len({s.group_size for s in ss}) > 1 for ss in comm.values())
    skews = np.linspace(0.0, 3.0, 151) if tell_skew else [0.0]
    exps = np.linspace(0.0, 1.0, 11) if tell_exp else [1.0]
    best = min((_comm_fits(comm, float(g), float(p))[1], float(g), float(p)) for g in skews for p in exps)
    return (best[1] if tell_skew else None), (best[2] if tell_exp else None)


def framework_overhead(over: list[tuple[float, float]]) -> tuple[float, float]:
    """(seconds per compute-op instance, seconds per step) of the time no op span claims: a line
    in the op count over the runs' ranks where their op counts differ, else all of it per op."""
    if not over:
        return 0.0, 0.0
    n = np.array([o[0] for o in over], float)
    t = np.array([o[1] for o in over], float)
    if len(np.unique(n)) >= 2:
        a, b = linfit(n, t)
        if b > 1e-20:
            return b, a
    return float(np.median(t / n)), 0.0


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def fit_profile(samples: list[Sample], base: ProfileSpec, sources: list[str], link_bw_GBps: float | None = None,
                overhead_s: float = 0.0, profiler_us_per_event: float = 0.0, step_overhead_s: float = 0.0,
                datasheet_peaks: bool = False) -> tuple[ProfileSpec, dict[str, dict[str, Any]]]:
    """The calibrated profile and, per fit, its samples and line (for the figures).

    `datasheet_peaks` (GPU traces): the base profile's peaks are the vendor's, so a fit never
    raises them (efficiency tops out at 1), and a dtype whose GEMMs are too small to be
    FLOP-bound (a router's, median < 1 GFLOP) keeps its peak instead of one read off overheads.

    `overhead_s`: step time outside every op span (Python and framework glue) per compute-op
    instance; it joins the launch overhead, so the simulated step carries it too (and
    `step_overhead_s` once per step).
    """
    if not samples:
        raise SpecError("calibrate: the traces hold no op the op graph knows (were ops wrapped in "
                        "record_function('op/phase')?)")
    fits: dict[str, dict[str, Any]] = {}
    d = base.model_dump(mode="python")
    resid: dict[str, float] = {}
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.kind == "comm" or not s.overlap:
            groups[s.key].append(s)

    def record(key: str, ss: list[Sample], a: float, b: float, unit: str) -> None:
        w, t = _arrays(ss)
        fits[key] = {"work": w.tolist(), "seconds": t.tolist(), "a": a, "b": b, "unit": unit,
                     "events": [s.event for s in ss]}
        resid[f"{key}.rms_rel_err"] = _sig(rms_rel(w, t, a, b), 4)
        resid[f"{key}.n"] = float(len(ss))

    # memory-bound ops -> launch overhead + memory efficiency
    mem = [s for k, ss in groups.items() if k.startswith("memory.") for s in ss]
    launch_s = base.launch_overhead_us * 1e-6
    if mem:
        a, b = _wfit(mem)
        launch_s = a
        record("memory", mem, a, b, "bytes")
        rate = 1.0 / b
        eff = rate / (base.hbm_bw_GBps * 1e9)
        if eff > 1:
            d["hbm_bw_GBps"], eff = _sig(rate / 1e9), 1.0
        d["memory_efficiency"] = {"max": _sig(min(1.0, eff)), "half_work": 0.0}
    d["launch_overhead_us"] = _sig((launch_s + overhead_s) * 1e6)
    d["step_overhead_us"] = _sig(step_overhead_s * 1e6)
    resid["framework_overhead_us"] = _sig(overhead_s * 1e6, 4)
    # taken out of the samples (perfmodel.calibrate.data); kept so per-op comparisons can do the same
    resid["profiler_us_per_event"] = _sig(profiler_us_per_event, 4)
    # compute curves: the main dtype sets max/half_work, other dtypes their peak
    peaks = dict(d["peak_tflops"])
    for kind, field in CURVES.items():
        by_dtype = {k.split(".", 1)[1]: ss for k, ss in groups.items() if k.startswith(f"{kind}.")}
        if not by_dtype:
            continue
        main = max(by_dtype, key=lambda dt: sum(s.flops * s.instances for s in by_dtype[dt]))
        curve = d.get(field) or d["gemm_efficiency"]
        eff_max = None
        for dt in [main] + [x for x in sorted(by_dtype) if x != main]:
            ss = by_dtype[dt]
            a, b = _wfit(ss)
            record(f"{kind}.{dt}", ss, a, b, "flops")
            rate = 1.0 / b
            if dt == main:
                peak = peaks.get(dt) or peaks.get("bf16") or max(peaks.values())
                eff_max = rate / (peak * 1e12)
                if eff_max > 1:
                    if kind == "gemm" and not datasheet_peaks:
                        peaks[dt], eff_max = _sig(rate / 1e12 / 0.9), 0.9
                    else:
                        eff_max = 1.0
                half = max(0.0, (a - launch_s) / b)
                curve = {"max": _sig(eff_max), "half_work": _sig(half)}
            elif kind == "gemm" and eff_max and not (datasheet_peaks and np.median([x.flops for x in ss]) < 1e9):
                peaks[dt] = _sig(rate / 1e12 / eff_max)
                if datasheet_peaks and dt in base.peak_tflops:
                    peaks[dt] = min(peaks[dt], base.peak_tflops[dt])
        d[field] = curve
    d["peak_tflops"] = peaks
    # collectives: alpha-beta per collective and group kind, after the straggler wait
    comm_groups = {k: ss for k, ss in groups.items() if k.startswith("comm.")}
    skew, exponent = _comm_model(comm_groups)
    if skew is not None:
        d["sync_skew"] = _sig(skew, 4)
    if exponent is not None:
        d["latency_exponent"] = _sig(exponent, 4)
    exponent = 1.0 if exponent is None else exponent
    key_fits, _err = _comm_fits(comm_groups, skew or 0.0, exponent) if comm_groups else ({}, 0.0)
    groups = {k: ([_less_wait(s, skew or 0.0) for s in ss] if k in comm_groups else ss) for k, ss in groups.items()}
    coll: dict[str, dict[str, float]] = {}
    by_coll: dict[str, list[Sample]] = defaultdict(list)
    for key, ss in sorted(groups.items()):
        if not key.startswith("comm."):
            continue
        a, b = key_fits[key]
        record(key, ss, a, b, "bytes")
        coll[key.removeprefix("comm.")] = {"latency_us": _sig(a * 1e6), "bw_GBps": _sig(max(1e-9, 1 / b / 1e9))}
        by_coll[ss[0].collective or "?"].extend(ss)
    comm = [s for ss in by_coll.values() for s in ss]
    if comm:
        lat, rate = _fabric_fit(comm)  # one fabric for every collective: the rate the per-kind fits fall back on
        for name, ss in sorted(by_coll.items()):
            a, b = _key_fit(ss, rate, exponent)
            coll.setdefault(name, {"latency_us": _sig(a * 1e6), "bw_GBps": _sig(max(1e-9, 1 / b / 1e9))})
        d["collectives"] = coll
        fabric = next(iter(d["fabrics"]))
        bw = link_bw_GBps or rate / 1e9
        d["fabrics"] = {**d["fabrics"], fabric: {
            "latency_us": _sig(lat * 1e6), "efficiency": _sig(float(np.clip(rate / (bw * 1e9), 1e-4, 1.0)))}}
    # the base's error band belongs to the base's constants, not to this fit: a fit has none until
    # its own out-of-sample residuals are known (moeperf compare adds its held-out band)
    d.update(uncertainty=None)
    d.update(name=f"{base.name}-calibrated", source=f"calibrated by moeperf calibrate from {len(sources)} run(s)",
             calibrated_from=list(sources), residuals=dict(sorted(resid.items())))
    return parse_spec(d, "profile", "calibrated profile"), fits


def profile_yaml(profile: ProfileSpec) -> str:
    data = profile.model_dump(mode="json", exclude_none=True)
    head = "# calibrated hardware profile written by `moeperf calibrate` (same schema as the presets)\n"
    return head + yaml.safe_dump(data, sort_keys=False, width=110)


def plot_fits(fits: dict[str, dict[str, Any]], out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, f in sorted(fits.items()):
        w, t = np.array(f["work"]), np.array(f["seconds"])
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.scatter(np.maximum(w, 1), t * 1e6, s=14, alpha=0.7, label="measured (per instance)")
        xs = np.geomspace(max(1.0, w.min() if len(w) else 1.0), max(2.0, w.max() * 1.2 if len(w) else 2.0), 50)
        ax.plot(xs, (f["a"] + f["b"] * xs) * 1e6, "r-",
                label=f"fit: {f['a'] * 1e6:.1f} us + work / {1 / f['b']:.3g} per s")
        ax.set(xscale="log", yscale="log", xlabel=f["unit"], ylabel="time per instance (us)", title=key)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        written.append(atomic.write_bytes(out_dir / f"{stem}.{key}.png", buf.getvalue()))
    return written


def calibrate(run_dirs: list[str | Path], out: str | Path, base: str | None = None,
              figures: bool = True) -> tuple[ProfileSpec, dict[str, dict[str, Any]]]:
    dirs = expand_dirs([str(d) for d in run_dirs])
    prof, bw = base_profile(dirs[0], base)
    samples, over, per_event_us = collect(dirs)
    hosts = host_cases(dirs)  # GPU traces: the host runs ahead of the device (perfmodel.calibrate.host)
    if hosts:
        per_op, (host_s, per_step, host_err) = 0.0, fit_host(hosts)
    else:
        per_op, per_step = framework_overhead(over)
    profile, fits = fit_profile(samples, prof, [shown(d) for d in dirs], bw, per_op, per_event_us, per_step,
                                datasheet_peaks=bool(hosts))
    if hosts:
        resid = {**profile.residuals, "host.n": float(len(hosts)), "host.step_rms_rel_err": _sig(host_err, 4)}
        profile = profile.model_copy(update={"host_us_per_op": _sig(host_s * 1e6),
                                             "residuals": dict(sorted(resid.items()))})
    overlapped, plain = step_cases([(str(d), *read_run(d)) for d in dirs])
    slow = fit_slowdown(profile, overlapped, plain)
    if slow is not None:
        resid = {**profile.residuals, "comm_compute_slowdown.n": float(len(overlapped)),
                 "comm_compute_slowdown.step_rms_rel_err": _sig(slow[1], 4)}
        profile = profile.model_copy(update={"comm_compute_slowdown": slow[0], "residuals": dict(sorted(resid.items()))})
    out = Path(out)
    atomic.write_text(out, profile_yaml(profile))
    if figures:
        plot_fits(fits, out.parent, out.stem)
    return profile, fits


def main(argv: list[str]) -> int:
    if any(a == "--published" or a.startswith("--published=") for a in argv):
        from perfmodel.calibrate.published_cli import main as main_published

        return main_published(argv)
    ap = parser("calibrate", "fit a hardware profile (efficiency curves, launch cost, collective alpha/beta, "
                "comm/compute interference) from recorded traces")
    ap.add_argument("trace_dirs", nargs="+", metavar="TRACE_DIR", help="traces/<run-id> folders (or a folder of them)")
    ap.add_argument("--out", required=True, help="profile YAML to write (figures go beside it)")
    ap.add_argument("--base", default=None, help="profile preset/path to start from (default: the run's cluster GPU)")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if Path(a.out).is_dir():
        raise SpecError(f"--out {a.out}: is a folder; name the profile YAML to write")
    profile, fits = calibrate(a.trace_dirs, a.out, a.base, figures=not a.no_figures)
    if a.json:
        print(json.dumps({"profile": str(a.out), "residuals": profile.residuals, "fits": sorted(fits)}, indent=1))
    else:
        print(f"wrote {a.out} ({len(fits)} fits from {len(profile.calibrated_from)} run(s))")
        for k, v in profile.residuals.items():
            if k.endswith(".rms_rel_err"):
                print(f"  {k[:-12]:<28} rms rel. error {v:6.1%}  n={int(profile.residuals[k[:-12] + '.n'])}")
    return 0
