"""Measured op times of recorded runs, paired with the op graph's FLOPs, bytes and payloads.

A run is `traces/<run-id>/rank<k>.json` + `meta.yaml` (model, plan, cluster, world_size). Each
rank's per-step time of an op event (`moe.fc1/wgrad`) is divided by the number of times the
op graph says that event runs on that rank per step (layers of the rank's pipeline stage x
micro-batches), giving one `Sample` per (run, rank, event): seconds per instance next to the
instance's work.

Profiler cost: on CPU an op lasts microseconds and torch.profiler adds a few per recorded event
(10-25 % of a step here), so traced op times overstate unprofiled ones. `profiler_us_per_event`
fits that cost from the runs themselves -- (profiled - unprofiled step time) = cost x events per
step, least squares over the runs -- and the samples lose it per event charged to each op.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from perfmodel.calibrate.trace_reader import RankTrace, read_meta, read_run
from perfmodel.sim.opgraph import Op, OpGraph
from perfmodel.specs import (
    ClusterSpec,
    ModelSpec,
    PlanSpec,
    ProfileSpec,
    SpecError,
    load_spec,
    parse_spec,
    with_overrides,
)
from perfmodel.specs.layout import group_of, rank_groups


@dataclass(frozen=True)
class Sample:
    run: str
    plan: str
    rank: int
    event: str  # op/phase
    kind: str  # gemm | grouped_gemm | attention | memory | comm
    dtype: str
    flops: float
    bytes: float  # HBM bytes (compute) or bytes per rank on the wire (comm)
    seconds: float  # measured, per instance
    instances: float  # per step on this rank
    collective: str | None = None
    group: str | None = None
    group_size: int = 1
    overlap: bool = False  # the plan overlaps communication with compute
    interval_s: float = 0.0  # comm: mean wall time since the rank's previous collective ended (unprofiled scale)

    @property
    def work(self) -> float:
        return self.flops if self.kind in ("gemm", "grouped_gemm", "attention") else self.bytes

    @property
    def key(self) -> str:
        """The fit this sample belongs to: kind.dtype, or comm.<collective>.<group>."""
        if self.kind == "comm":
            return f"comm.{self.collective}.{self.group}"
        return f"{self.kind}.{self.dtype}"


def _spec(meta: dict[str, Any], key: str, kind: str, where: str) -> Any:
    v = meta.get(key)
    if v is None:
        raise SpecError(f"{where}: meta.yaml has no {key}:")
    return parse_spec(v, kind, f"{where}:{key}") if isinstance(v, dict) else load_spec(str(v), kind)


def run_specs(meta: dict[str, Any], where: str) -> tuple[ModelSpec, PlanSpec, int]:
    model = _spec(meta, "model", "model", where)
    plan = _spec(meta, "plan", "plan", where)
    world = meta.get("world_size")
    if not isinstance(world, int) or world < 1:
        raise SpecError(f"{where}: meta.yaml world_size: expected a positive integer, got {world!r}")
    return model, plan, world


def on_world(cluster: ClusterSpec, world: int, where: str) -> ClusterSpec:
    """The cluster as a run of `world` ranks used it: fewer ranks than the preset -> one node of them."""
    if world != cluster.world_size:
        cluster = with_overrides(cluster, {"nodes": 1, "gpus_per_node": world}, where)
    return cluster


def recorded_cluster(meta: dict[str, Any], where: str) -> ClusterSpec | None:
    """The cluster a run names (meta.yaml cluster:, a preset or inline); None if not recorded."""
    return None if meta.get("cluster") is None else _spec(meta, "cluster", "cluster", where)


def run_cluster(meta: dict[str, Any], world: int, where: str) -> ClusterSpec | None:
    """The cluster a run was recorded on, on its world size; None if not recorded."""
    cluster = recorded_cluster(meta, where)
    return None if cluster is None else on_world(cluster, world, f"{where}: world_size")


def stage_of(plan: PlanSpec, world: int, rank: int) -> int:
    if plan.pp == 1:
        return 0
    return group_of(rank_groups(plan, world), "pp", rank).index(rank)


def stage_ops(graph: OpGraph, stage: int) -> dict[str, tuple[Op, float]]:
    """Each op event of a stage's rank with its instances per step (micro-batches x layers)."""
    L = graph.layout
    mb = L.microbatches
    out: dict[str, tuple[Op, float]] = {}

    def add(op: Op, n: float) -> None:
        if op.event not in out:
            out[op.event] = (op, n)
            return
        prev, m = out[op.event]
        if op.kind == prev.kind == "comm" and op.collective == prev.collective and n == m == 1:
            # one span over several collectives of a step (dp.grad_sync over dp_sp and edp): one
            # instance carrying their summed bytes per rank
            per = prev.bytes / prev.bytes_per_rank if prev.bytes_per_rank > 0 else 1.0
            out[op.event] = (replace(prev, bytes=prev.bytes + op.bytes_per_rank * per), m)
        else:
            out[op.event] = (prev, m + n)  # same event in dense and MoE layers: keep the first's work

    kinds = graph.stage_layer_kinds(stage)
    for kind, layer in graph.layers.items():
        n = kinds.count(kind)
        if n:
            for op in layer.ops:
                add(op, n * mb)
    if graph.holds_embedding(stage):
        for op in graph.embed_ops:
            add(op, mb)
    if graph.holds_head(stage):
        for op in graph.head_ops:
            add(op, mb)
    for op in graph.grad_sync_ops(stage):
        add(op, 1)
    add(graph.optimizer_op(stage), 1)
    return out


def _kind(op: Op) -> str:
    if op.kind == "gemm" and op.shape and op.shape[0] > 1:
        return "grouped_gemm"
    return op.kind


def unattributed_per_step(traces: list[RankTrace], plan: PlanSpec, world: int, graph: OpGraph,
                          us_per_event: float = 0.0) -> list[tuple[float, float]]:
    """Per rank: (compute-op instances per step, step seconds no op span claims: Python, framework
    glue, small unnamed ops)."""
    out = []
    for tr in traces:
        rank = int(re.findall(r"\d+", Path(tr.path).name)[0])
        ops = stage_ops(graph, stage_of(plan, world, rank))
        n = sum(k for op, k in ops.values() if op.kind != "comm")
        if n > 0 and tr.steps:
            out.append((float(n), tr.unattributed_s_per_step(us_per_event)))
    return out


def _unprofiled_step_s(meta: dict[str, Any]) -> float | None:
    times = meta.get("step_times_s")
    if isinstance(times, list) and times and all(isinstance(t, (int, float)) for t in times):
        return statistics.median(float(t) for t in times)
    return None


def profiler_us_per_event(runs: list[tuple[dict[str, Any], list[RankTrace]]]) -> float:
    """Profiler cost per recorded event (us): least squares of profiled - unprofiled step time =
    cost x events per step over the runs (0 without unprofiled step times or CPU events)."""
    num = den = 0.0
    for meta, traces in runs:
        unprof = _unprofiled_step_s(meta)
        prof = [statistics.fmean(tr.step_times_s()) for tr in traces if tr.steps and tr.events]
        if unprof is None or not prof:
            continue
        n = statistics.fmean(tr.step_events() for tr in traces if tr.steps and tr.events)
        num += (statistics.median(prof) - unprof) * n
        den += n * n
    return max(0.0, num / den * 1e6) if den > 0 else 0.0


def comm_intervals(tr: RankTrace, comm_events: set[str]) -> dict[str, float]:
    """Per comm event: mean seconds between the end of the rank's previous collective (or the
    step's start) and this collective's start -- the work its peers may drift apart over."""
    out: dict[str, list[float]] = defaultdict(list)
    last: dict[tuple[Any, Any, int], float] = {}
    for s in sorted(tr.spans, key=lambda s: s.start_us):
        if s.step is None or s.event not in comm_events:
            continue
        key = (s.pid, s.tid, s.step)
        prev = last.get(key, tr.steps[s.step][0] if s.step < len(tr.steps) else s.start_us)
        out[s.event].append(max(0.0, s.start_us - prev) * 1e-6)
        last[key] = max(prev, s.start_us + s.dur_us)
    return {k: statistics.fmean(v) for k, v in out.items()}


def samples_of_run(run_dir: str | Path, us_per_event: float = 0.0,
                   run: tuple[dict[str, Any], list[RankTrace]] | None = None
                   ) -> tuple[list[Sample], dict[str, Any], list[RankTrace]]:
    meta, traces = run or read_run(run_dir)
    where = str(run_dir)
    model, plan, world = run_specs(meta, where)
    graph = OpGraph(model, plan, world)
    overlap = plan.overlap.inter_op or plan.overlap.intra_op != "none"
    out: list[Sample] = []
    by_stage: dict[int, dict[str, tuple[Op, float]]] = {}
    unprof = _unprofiled_step_s(meta)
    prof = [statistics.fmean(tr.step_times_s()) for tr in traces if tr.steps]
    # intervals are traced wall time: bring them to the unprofiled pace of the run
    pace = min(1.0, unprof / statistics.median(prof)) if unprof and prof and statistics.median(prof) > 0 else 1.0
    for tr in traces:
        rank = int(re.findall(r"\d+", Path(tr.path).name)[0])
        st = stage_of(plan, world, rank)
        ops = by_stage.setdefault(st, stage_ops(graph, st))
        measured = tr.op_seconds_per_step(us_per_event)
        # layer collectives only: the simulator prices gradient sync and p2p without straggler wait
        gaps = comm_intervals(tr, {ev for ev, (op, _n) in ops.items()
                                   if op.kind == "comm" and not op.name.startswith(("dp.", "pp."))})
        merged: dict[str, float] = defaultdict(float)
        for ev, sec in measured.items():
            merged[ev] += sec
        for ev, sec in merged.items():
            if ev not in ops or sec <= 0:
                continue
            op, n = ops[ev]
            if n <= 0:
                continue
            if op.kind == "comm" and op.group_size <= 1 and op.collective != "send_recv":
                continue
            work_bytes = op.bytes_per_rank * op.imbalance if op.kind == "comm" else op.bytes
            out.append(Sample(run=Path(run_dir).name, plan=plan.name, rank=rank, event=ev, kind=_kind(op),
                              dtype=op.dtype, flops=op.flops, bytes=work_bytes, seconds=sec / n, instances=n,
                              collective=op.collective, group=op.group, group_size=op.group_size,
                              overlap=overlap, interval_s=gaps.get(ev, 0.0) * pace))
    return out, meta, traces


def collect(run_dirs: list[str | Path]) -> tuple[list[Sample], list[tuple[float, float]], float]:
    """Samples of every run, (compute ops, unattributed seconds) per step of each rank of each run,
    and the profiler cost per event taken out of both (us)."""
    runs = [read_run(d) for d in run_dirs]
    cost = profiler_us_per_event(runs)
    out: list[Sample] = []
    over: list[tuple[float, float]] = []
    for d, run in zip(run_dirs, runs, strict=True):
        samples, meta, traces = samples_of_run(d, cost, run)
        out += samples
        model, plan, world = run_specs(meta, str(d))
        over += unattributed_per_step(traces, plan, world, OpGraph(model, plan, world), cost)
    return out, over, cost


def measured_step_s(meta: dict[str, Any], traces: list[RankTrace]) -> float:
    """A run's step time: meta's unprofiled step times when recorded, else the traced steps (max over ranks)."""
    unprof = _unprofiled_step_s(meta)
    if unprof is not None:
        return unprof
    per_rank = []
    for tr in traces:
        s = sorted(tr.step_times_s())
        if s:
            per_rank.append(s[len(s) // 2])
    return max(per_rank) if per_rank else 0.0


def expand_dirs(dirs: list[str]) -> list[Path]:
    """Run directories (rank<k>.json + meta.yaml); a folder of run folders is expanded."""
    out: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise SpecError(f"{d}: not a trace directory")
        if (d / "meta.yaml").is_file():
            out.append(d)
            continue
        subs = sorted(p.parent for p in d.glob("*/meta.yaml")) or sorted(p.parent for p in d.glob("*/*/meta.yaml"))
        if not subs:
            raise SpecError(f"{d}: no meta.yaml in it or its sub-folders (expected traces/<run-id>/meta.yaml)")
        out += subs
    return out


def shown(d: Path) -> str:
    """A run directory as `calibrated_from` records it: relative to the working directory when inside it."""
    try:
        return str(Path(d).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(d)


def base_profile(run_dir: Path, base: str | None) -> tuple[ProfileSpec, float | None]:
    """The profile to start from (--base, else the run's cluster GPU preset) and the cluster's link bandwidth."""
    spec = recorded_cluster(read_meta(run_dir), str(run_dir))
    prof = load_spec(base, "profile") if base else (spec.profile() if spec else load_spec("cpu", "profile"))
    bw = spec.intra_node.bw_GBps if spec and spec.intra_node.bw_GBps else None
    return prof, bw
