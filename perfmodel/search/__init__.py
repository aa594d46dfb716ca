"""The plan space of a study, pruning, parallel evaluation and ranking.

Every combination of the study's `search:` lists is a candidate, for each variant (what-if
cluster/model overrides; the study itself when it has none). Each candidate ends with one
status, and none is dropped silently:

  ok             simulated, fits in memory, ranked by tokens/s
  no-fit         simulated, but the simulator says it does not fit in memory
  invalid        the plan cannot be laid out (reason: the failing constraint)
  pruned: memory the memory model says it misses capacity (reason: by how much)
  pruned: bound  its compute-only lower bound on step time is already >= the K-th best
                 simulated step time of its variant, so it cannot reach the top K
  error          the simulator refused it (reason: its message)

Combinations that differ only in a field with no effect (chunks without intra-op overlap,
dispatch/combine precision without expert parallelism) are merged into one candidate.

Determinism: each variant's candidates are evaluated in a fixed order (fixed plans, then by
lower bound) in fixed-size rounds; pruning decisions are taken between a variant's rounds from
its results in that order, so the outcome never depends on --jobs, the executor (local
processes or Ray, perfmodel/search/executors.py) or timing. Variants' rounds run side by side.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from perfmodel.search.executors import Executor, ExecutorError, make_executor
from perfmodel.search.space import enumerate_space, plan_name, space_size  # noqa: F401 (re-exported)
from perfmodel.sim.hardware import Hardware
from perfmodel.sim.opgraph import OpGraph
from perfmodel.specs import ClusterSpec, ModelSpec, PlanSpec, ProfileSpec, SpecError, StudySpec
from perfmodel.specs.layout import plan_layout

BATCH = 48  # candidates per evaluation batch (fixed: results must not depend on --jobs)
DEFAULT_GLOBAL_BATCH = PlanSpec().global_batch
BREAKDOWN_KEYS = ("compute_s", "exposed_comm_s", "bubble_s", "grad_sync_s", "optimizer_s", "other_s")


@dataclass(frozen=True)
class VariantParts:
    name: str
    model: ModelSpec
    cluster: ClusterSpec
    profile: ProfileSpec
    world: int


@dataclass
class Row:
    """One candidate (or fixed) plan of one variant and what became of it."""

    index: int
    variant: str
    plan: PlanSpec
    fixed: bool = False
    status: str = "pending"
    reason: str = ""
    bound_s: float | None = None
    memory_GiB: float | None = None  # estimated total per GPU (memory model or simulator)
    metrics: dict[str, Any] = field(default_factory=dict)  # step_time_s, tokens_per_s, mfu, breakdown, ...

    @property
    def tokens_per_s(self) -> float:
        return float(self.metrics.get("tokens_per_s", 0.0))

    @property
    def step_time_s(self) -> float:
        return float(self.metrics.get("step_time_s", float("inf")))


@dataclass
class SearchResult:
    study: StudySpec
    variants: list[VariantParts]
    rows: list[Row]
    wall_s: float = 0.0
    merged: int = 0  # combinations merged into an equivalent candidate

    @property
    def evaluated(self) -> int:
        return sum(r.status in ("ok", "no-fit") for r in self.rows)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return dict(sorted(out.items()))

    def ranked(self, variant: str | None = None) -> list[Row]:
        """Simulated plans that fit, best tokens/s first (ties: enumeration order)."""
        rows = [r for r in self.rows if r.status == "ok" and (variant is None or r.variant == variant)]
        return sorted(rows, key=lambda r: (-r.tokens_per_s, r.index))

    def fixed(self, variant: str | None = None) -> list[Row]:
        return [r for r in self.rows if r.fixed and (variant is None or r.variant == variant)]

    def baseline(self, variant: str | None = None) -> Row | None:
        if not self.study.baseline:
            return None
        v = variant or self.variants[0].name
        return next((r for r in self.fixed(v) if r.plan.name == self.study.baseline), None)


# ---------------------------------------------------------------------- lower bound
def _op_seconds(op: Any, prof: ProfileSpec, hw: Hardware) -> float:
    """A floor on one compute-stream op's time, as the simulator's hardware model times it
    but without launch cost, the GEMM's HBM floor or comm interference: GEMM/attention FLOPs
    at the bf16 (or higher) peak x the profile's efficiency at the op's full size (a piece of
    a split op is never more efficient), memory ops by bytes at the HBM efficiency of their
    full size. Ops off the main branch may overlap: they count 0."""
    if op.branch != "main":
        return 0.0
    if op.kind == "memory":
        return op.bytes / (prof.hbm_bw_GBps * 1e9 * max(prof.memory_efficiency.at(op.bytes), 1e-9)) if op.bytes > 0 else 0.0
    if op.kind not in ("gemm", "attention") or op.flops <= 0:
        return 0.0
    peak = max(prof.peak_tflops.get("bf16", 0.0), prof.peak_tflops.get(op.dtype, 0.0)) * 1e12
    curve = prof.attention_efficiency if op.kind == "attention" else hw.gemm_curve(op)
    return op.flops / (peak * max(curve.at(op.flops), 1e-9))


def lower_bound_s(model: ModelSpec, plan: PlanSpec, world: int, prof: ProfileSpec) -> float:
    """Compute-only floor on the step time: for each stage, micro-batches x its compute-stream
    time per micro-batch (layers incl. recomputation, embedding, head) + its optimizer step;
    the busiest stage. No communication, bubble or launch cost is counted."""
    g = OpGraph(model, plan, world)
    hw = Hardware.of(prof)  # once per bound, not per op
    per_kind = {k: sum(_op_seconds(op, prof, hw) for op in lg.ops) for k, lg in g.layers.items()}
    head = sum(_op_seconds(op, prof, hw) for op in g.head_ops)
    embed = sum(_op_seconds(op, prof, hw) for op in g.embed_ops)
    worst = 0.0
    for stage in range(g.layout.pp):
        t = sum(per_kind[k] for k in g.stage_layer_kinds(stage))
        t += (head if g.holds_head(stage) else 0.0) + (embed if g.holds_embedding(stage) else 0.0)
        worst = max(worst, g.layout.microbatches * t + _op_seconds(g.optimizer_op(stage), prof, hw))
    return worst


def _bound_key(p: PlanSpec) -> tuple:
    c = p.compression
    return (p.tp, p.sp, p.ep, p.etp, p.pp, p.vpp, p.micro_batch, p.recompute, p.global_batch, c.dispatch,
            c.combine, p.distributed_optimizer, p.precision, p.fp8_recipe, p.pp_layout, p.schedule, p.dispatcher)


# ------------------------------------------------------------------------ evaluation
SimulateFn = Callable[..., Any]
MemoryFn = Callable[..., Any] | None


def default_simulate() -> SimulateFn:
    from perfmodel.sim import simulate

    return simulate


def default_memory() -> MemoryFn:
    try:
        from perfmodel.sim.memory import estimate_memory
    except ImportError:
        return None
    return estimate_memory


def _apply(row: Row, status: str, payload: Any) -> None:
    if status == "error":
        row.status, row.reason = "error", payload
        return
    row.metrics = payload
    mem = payload["memory_GiB"].get("total")
    row.memory_GiB = mem if mem is not None else row.memory_GiB
    row.status = "ok" if payload["fits"] else "no-fit"
    if not payload["fits"]:
        row.reason = "simulator: does not fit in GPU memory"


def _kth_best(rows: list[Row], k: int) -> float:
    times = sorted(r.step_time_s for r in rows if r.status == "ok")
    return times[k - 1] if len(times) >= k else float("inf")


def _prepare(study: StudySpec, v: VariantParts, start: int, memory_fn: MemoryFn,
             prune_memory: bool) -> tuple[list[Row], int]:
    """All rows of one variant (fixed plans first), with invalid/memory-pruned ones decided."""
    gb = study.global_batch or (study.plans[0].global_batch if study.plans else DEFAULT_GLOBAL_BATCH)
    rows: list[Row] = []
    for p in study.plans:
        plan = p.model_copy(update={"global_batch": gb}) if study.global_batch else p
        rows.append(Row(start + len(rows), v.name, PlanSpec(**plan.model_dump(exclude={"calibrate"})), fixed=True))
    cands, merged = enumerate_space(study.search, gb, v.model.layers) if study.search else ([], 0)
    for c in cands:
        if isinstance(c, str):
            rows.append(Row(start + len(rows), v.name, PlanSpec(name="(not a plan)"), status="invalid", reason=c))
        else:
            rows.append(Row(start + len(rows), v.name, c))
    bounds: dict[tuple, float] = {}
    estimates: dict[tuple, Any] = {}
    layouts: dict[tuple, str] = {}  # layout key -> "" (valid) or the failing constraint
    for row in rows:
        if row.status != "pending":
            continue
        key = _bound_key(row.plan) + (row.plan.dp, row.plan.schedule)
        if key not in layouts:
            try:
                plan_layout(row.plan, v.model, v.world)
                layouts[key] = ""
            except SpecError as exc:
                layouts[key] = " ".join(str(exc).split())
        if layouts[key]:
            row.status, row.reason = "invalid", layouts[key]
            continue
        key = _bound_key(row.plan)
        if key not in bounds:
            bounds[key] = lower_bound_s(v.model, row.plan, v.world, v.profile)
        row.bound_s = bounds[key]
        if memory_fn is not None:
            # overlap (and rank order) do not change memory: one estimate per memory-relevant plan
            mkey = key + (row.plan.compression.grad_sync,)
            if mkey not in estimates:
                estimates[mkey] = memory_fn(v.model, row.plan, v.world, v.profile)
            est = estimates[mkey]
            row.memory_GiB = float(est.total_GiB)
            if not est.fits and not row.fixed and prune_memory:
                row.status, row.reason = "pruned: memory", f"short {est.short_GiB:.2f} GiB " \
                    f"(needs {est.total_GiB:.1f} of {est.capacity_GiB:.1f} GiB)"
    return rows, merged


def run_search(study: StudySpec, variants: list[VariantParts], *, jobs: int | None = None,
               simulate_fn: SimulateFn | None = None, memory_fn: MemoryFn | str = "default",
               keep_top: int = 10, prune: bool = True, batch: int = BATCH,
               progress: Callable[[int, int], None] | None = None,
               executor: str = "local", address: str | None = None) -> SearchResult:
    """Evaluate the study's fixed plans and search space for every variant.

    keep_top: plans that could still rank in the top `keep_top` of their variant are never
    pruned by the bound. prune=False evaluates everything valid (reference for tests).
    batch: candidates per evaluation round; pruning is decided between rounds.
    executor: "local" (`jobs` processes, default all cores) or "ray" (Ray tasks on the cluster
    at `address`, or on a local Ray instance with `jobs` CPUs); the result is the same.
    """
    t0 = time.perf_counter()
    fn = simulate_fn or default_simulate()
    mem = default_memory() if memory_fn == "default" else memory_fn
    if executor == "local":
        jobs = max(1, jobs or os.cpu_count() or 1)
    rows: list[Row] = []
    merged = 0
    per_variant: list[list[Row]] = []
    for v in variants:
        vr, m = _prepare(study, v, len(rows), mem, prune)
        rows += vr
        merged += m
        per_variant.append(vr)
    todo = sum(r.status == "pending" for r in rows)
    if progress:
        progress(0, todo)
    ex = make_executor(executor, {v.name: v for v in variants}, fn, jobs=jobs, address=address)
    try:
        _evaluate_rounds(per_variant, ex, keep_top if prune else None, batch, todo, progress)
    except BaseException:
        ex.close(ok=False)
        raise
    ex.close()
    return SearchResult(study=study, variants=variants, rows=rows, wall_s=time.perf_counter() - t0, merged=merged)


def _evaluate_rounds(per_variant: list[list[Row]], ex: Executor, keep_top: int | None, batch: int,
                     todo: int, progress: Callable[[int, int], None] | None) -> None:
    """Each variant's pending rows in rounds of `batch` (fixed plans, then by lower bound); a
    variant's next round is pruned and submitted once its last one is complete, while other
    variants' rounds run alongside. Outcomes are keyed by row index: each pending row gets
    exactly one, whatever the completion order or the executor's retries."""
    rounds: list[Iterator[list[Row]]] = []
    for vr in per_variant:
        fixed = [r for r in vr if r.fixed and r.status == "pending"]
        order = fixed + sorted((r for r in vr if not r.fixed and r.status == "pending"),
                               key=lambda r: (r.bound_s, r.index))
        rounds.append(_batches(order, batch))
    in_flight: dict[int, Row] = {}  # row index -> row awaiting its outcome
    left = [0] * len(per_variant)  # outcomes the variant's current round still awaits
    done = 0

    def start_round(i: int) -> None:
        nonlocal done
        for chunk in rounds[i]:
            kth = _kth_best(per_variant[i], keep_top) if keep_top else float("inf")
            live = []
            for r in chunk:
                if not r.fixed and r.bound_s is not None and r.bound_s >= kth:
                    r.status = "pruned: bound"
                    r.reason = f"compute floor {r.bound_s:.3f} s >= #{keep_top} best step {kth:.3f} s"
                    done += 1
                else:
                    live.append(r)
            if live:
                in_flight.update((r.index, r) for r in live)
                left[i] = len(live)
                ex.submit(i, [(r.index, r.variant, r.plan) for r in live])
                return
            if progress:  # the whole round was pruned: on to the next
                progress(done, todo)

    for i in range(len(per_variant)):
        start_round(i)
    while in_flight:
        finished = ex.wait()
        if not finished:
            raise ExecutorError(f"the executor returned no outcome for {len(in_flight)} plan(s)")
        for i, outcomes in finished:
            for idx, status, payload in outcomes:
                row = in_flight.pop(idx, None)
                if row is None:  # exactly once: a second outcome for a plan is a bug, never counted
                    raise ExecutorError(f"plan #{idx} came back twice or was never submitted")
                _apply(row, status, payload)
            left[i] -= len(outcomes)
            done += len(outcomes)
            if progress:
                progress(done, todo)
            if left[i] == 0:
                start_round(i)
    stray = [r.index for vr in per_variant for r in vr if r.status == "pending"]
    if stray or done != todo:
        raise ExecutorError(f"{len(stray)} plan(s) never evaluated ({done} of {todo} done)")


def _batches(order: list[Row], size: int) -> Iterator[list[Row]]:
    for i in range(0, len(order), size):
        yield order[i:i + size]
