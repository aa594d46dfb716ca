"""simulate(): one training iteration of a plan on a cluster.

Symmetry: one representative rank per pipeline stage (the one whose tp/sp/dp coordinates
are 0; its groups hold the hottest expert rank). Stages are translations of each other on
a symmetric fabric, so each distinct layer kind (moe / dense) is simulated once per phase
group (forward; recompute + backward) with stage 0's group placement, in a simpy run where
its compute and collectives share the rank's resources. Each virtual stage's time is the sum
of its own layers' (perfmodel.pplayout: uneven layouts; + embedding on the first virtual stage,
the head on the last), split into forward, backward and its wgrad part; the plan's schedule
(perfmodel.sim.pipeline: 1F1B, interleaved, ZB-V, DualPipeV with F&B overlap) is run on them;
then DP gradient sync and the optimizer step. Overlapped, the sync runs per model chunk (virtual
stage) on one DP channel per rank: a chunk's reduction starts during its last backward and runs
under the rest of the rank's cool-down, the next iteration's parameter gathers run ahead of each
chunk's first forward; only what outlasts the rank's last action, or what a first forward waits
for, is exposed (_overlapped_sync).

Breakdown (of the busiest pipeline rank; `critical_stage` in details): compute_s (busy compute
of its micro-batches), exposed_comm_s (layer comm not hidden under compute), bubble_s (the rest
of the step it spends idle: pipeline fill/drain, p2p waits, waiting on slower ranks), grad_sync_s
(exposed), optimizer_s, and other_s (the profile's per-step host time, where calibrated); they
add up to step_time_s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from perfmodel.collectives import CollectiveCost, collective_cost, latency_steps
from perfmodel.hardware import Hardware
from perfmodel.layout import group_count, group_of_rank
from perfmodel.opgraph import Op, OpGraph
from perfmodel.pplayout import StageLayout
from perfmodel.sim.layer import LayerRun, run_layer
from perfmodel.sim.pipeline import PipelineRun, run_schedule
from perfmodel.sim.result import SimResult
from perfmodel.sim.timeline import build_timeline
from perfmodel.specs import ClusterSpec, CollectiveFit, ModelSpec, PlanSpec, ProfileSpec, check_precision
from perfmodel.topology import Topology, topology_for
from perfmodel.uncertainty import band

_GRAPHS: dict[tuple[str, str, int], OpGraph] = {}
_RUNS: dict[tuple, tuple] = {}  # (layer graph, profile, topology, (fwd, bwd) LayerRuns): objects pin their ids


def _graph(model: ModelSpec, plan: PlanSpec, world: int) -> OpGraph:
    """The op graph per (model, plan, world), built once (SpecError for an impossible plan)."""
    key = (model.model_dump_json(), plan.model_dump_json(), world)
    g = _GRAPHS.get(key)
    if g is None:
        if len(_GRAPHS) > 4096:
            _GRAPHS.clear()
        g = _GRAPHS[key] = OpGraph(model, plan, world)
    return g


@dataclass
class _Ctx:
    topo: Topology
    plan: PlanSpec
    world: int
    reps: tuple[int, ...]  # representative rank of each stage
    fits: dict[str, CollectiveFit]  # calibrated alpha-beta per "collective.group" or "collective"
    exponent: float = 1.0  # calibrated latency growth with group size (ProfileSpec.latency_exponent)
    memo: dict[tuple, CollectiveCost] = field(default_factory=dict)

    def group(self, kind: str, stage: int) -> tuple[int, ...]:
        # closed form (layout.group_of_rank): only the representatives' groups exist, never the world's
        return group_of_rank(self.plan, self.world, kind, self.reps[stage])

    def n_groups(self, kind: str) -> int:
        return group_count(self.plan, self.world, kind)

    def cost(self, op: Op, stage: int = 0) -> CollectiveCost:
        g = self.group(op.group or "", stage)
        # the cost depends on the collective, its group and the imbalance only (bytes are applied by
        # the caller): one evaluation per distinct triple (gradient syncs repeat on every rank)
        key = (op.collective, op.group, op.imbalance, g, op.bytes > 0, op.routing)
        hit = self.memo.get(key)
        if hit is None:
            hit = self.memo[key] = self._cost(op, g)
        return hit

    def _cost(self, op: Op, g: tuple[int, ...]) -> CollectiveCost:
        cost = collective_cost(self.topo, op.collective or "", g, op.imbalance, self.n_groups(op.group or ""),
                               op.routing)
        fit = self.fits.get(f"{op.collective}.{op.group}") or self.fits.get(op.collective or "")
        if fit is None or op.bytes <= 0:
            return cost
        # a calibrated profile measured this collective on this kind of group: its alpha-beta
        # (seconds = latency + bytes_per_rank * imbalance / bw) replaces the topology's estimate
        per_payload = op.bytes_per_rank * op.imbalance / op.bytes
        steps = latency_steps(op.collective or "", len(g), self.exponent)
        return CollectiveCost(fit.latency_us * 1e-6 * steps, per_payload / (fit.bw_GBps * 1e9), cost.link_class,
                              f"{cost.algorithm}+calibrated")


def _sync_chunks(graph: OpGraph, ctx: _Ctx, s: int) -> tuple[float, float, list[tuple[int, float, float]]]:
    """Rank s's DP gradient reduction and parameter gather times, and their split over its virtual
    stages (model chunks): (v, reduce_s, gather_s) per chunk, by the chunk's share of each sync
    group's parameters (the embedding with virtual stage 0, the output head with the last)."""
    st = graph.layout.stages
    mine = st.stages_of(s)
    share: dict[int, dict[str, float]] = {}
    for v in mine:
        share[v] = {"dp_sp": 0.0, "edp": 0.0}
        for kind in graph.vstage_layer_kinds(v):
            for g, k in graph.layers[kind].params.items():
                share[v][g] += k
    total = graph.stage_params(s)
    ends = [v for v in mine if v in (0, st.n_stages - 1)] or mine[:1]
    for g in share[mine[0]]:  # what the layers do not hold: embedding / head parameters
        extra = total[g] - sum(share[v][g] for v in mine)
        for v in ends:
            share[v][g] += extra / len(ends)
    sums, per = [0.0, 0.0], {v: [0.0, 0.0] for v in mine}  # [reduce, gather]
    for op in graph.grad_sync_ops(s):
        t, i, g = ctx.cost(op, s).time_s(op.bytes), int(op.name == "dp.param_gather"), op.group or ""
        sums[i] += t
        for v in mine:
            per[v][i] += t * share[v][g] / total[g]
    return sums[0], sums[1], [(v, r, g) for v, (r, g) in per.items()]


def _overlapped_sync(chunks: list[tuple[int, float, float]], pipe: PipelineRun, finish_s: float, F: list[float],
                     B: list[float], st: StageLayout) -> tuple[float, float]:
    """Overlapped DP sync of one pipeline rank on a model-chunk basis (MegaScale, arXiv 2402.15627
    s.3.2; Megatron-LM's overlap_grad_reduce / overlap_param_gather): one DP channel per rank runs
    the collectives in turn, each chunk's in per-layer buckets. A chunk's gradient reduction starts
    during its last backward (buckets become ready layer by layer) and may run under the rest of the
    rank's cool-down; what outlasts the rank's last action is exposed. The next iteration's gathers
    run in forward order from the step's start; a chunk's first bucket must arrive before its first
    forward starts and all of them before that forward ends, or the rank waits (rank 0's first chunk
    always does: its first forward is the step's first action). Returns (exposed reduction, delay)."""
    free = 0.0
    for v, r, _ in sorted(chunks, key=lambda c: pipe.grads_ready_s[c[0]]):
        ready, k = pipe.grads_ready_s[v], max(1, st.ranges[v][1] - st.ranges[v][0])
        free = max(max(free, ready - B[v]) + r, ready + r / k)
    exp_r = max(0.0, free - finish_s)
    free = delay = 0.0
    for v, _, g in sorted(chunks, key=lambda c: pipe.first_fwd_s[c[0]]):
        if g <= 0:
            continue
        k, start = max(1, st.ranges[v][1] - st.ranges[v][0]), pipe.first_fwd_s[v]
        delay = max(delay, free + g / k - start, free + g - start - F[v])
        free += g
    return exp_r, delay


def _serial_s(ops: tuple[Op, ...] | list[Op], hw: Hardware) -> float:
    return sum(hw.compute_s(op) for op in ops if op.kind != "comm")


def _memory(model: ModelSpec, plan: PlanSpec, world: int, profile: ProfileSpec) -> tuple[dict[str, float], bool]:
    try:
        from perfmodel.memory import estimate_memory
    except ImportError:  # pragma: no cover - memory model not installed
        return {}, True
    est = estimate_memory(model, plan, world, profile)
    keep = ("weights_GiB", "grads_GiB", "optimizer_GiB", "activations_GiB", "buffers_GiB", "total_GiB",
            "capacity_GiB", "short_GiB")
    return {k.removesuffix("_GiB"): float(getattr(est, k)) for k in keep if hasattr(est, k)}, bool(est.fits)


def simulate(model: ModelSpec, cluster: ClusterSpec, plan: PlanSpec, profile: ProfileSpec | None = None, *,
             trace: bool = False) -> SimResult:
    """Simulate one iteration; SpecError for a plan that cannot be laid out on the cluster."""
    profile = profile or cluster.profile()
    check_precision(plan, profile)
    world = cluster.world_size
    graph = _graph(model, plan, world)
    L = graph.layout
    hw = Hardware.of(profile)
    topo = topology_for(cluster, profile)
    ctx = _Ctx(topo, plan, world, group_of_rank(plan, world, "pp", 0), profile.collectives, profile.latency_exponent)

    runs: dict[str, tuple[LayerRun, LayerRun]] = {}
    for kind, lg in graph.layers.items():
        # a layer's run depends on its ops (shared across plans: OpGraph.layers), the overlap, the
        # hardware and where its collectives' groups sit: plans differing only in the schedule, pp
        # layout or batch reuse it
        groups = tuple(sorted({(op.group, ctx.group(op.group, 0)) for op in lg.ops if op.kind == "comm"}))
        key = (id(lg), plan.overlap, id(profile), id(topo), groups)
        hit = _RUNS.get(key)
        if hit is None or hit[0] is not lg or hit[1] is not profile or hit[2] is not topo:
            fwd = run_layer(lg.phase("fwd"), plan.overlap, hw, ctx.cost)
            bwd = run_layer(lg.phase("recompute", "dgrad", "wgrad"), plan.overlap, hw, ctx.cost)
            if len(_RUNS) > 4096:
                _RUNS.clear()
            hit = _RUNS[key] = (lg, profile, topo, (fwd, bwd))
        runs[kind] = hit[3]
    head_f = _serial_s([op for op in graph.head_ops if op.phase == "fwd"], hw)
    head_b = _serial_s([op for op in graph.head_ops if op.phase != "fwd"], hw)
    head_w = _serial_s([op for op in graph.head_ops if op.phase == "wgrad"], hw)
    embed = _serial_s(graph.embed_ops, hw)
    wgrad = {k: sum(s.end_s - s.start_s for s in rb.spans if s.op.phase == "wgrad") for k, (_, rb) in runs.items()}

    # per virtual stage, one micro-batch: forward, whole backward, its wgrad part, compute-only times
    st = L.stages
    n = st.n_stages
    F, B, W, CF, CB = ([0.0] * n for _ in range(5))
    for v in range(n):
        for kind in graph.vstage_layer_kinds(v):
            rf, rb = runs[kind]
            F[v] += rf.duration_s
            B[v] += rb.duration_s
            CF[v] += rf.compute_s
            CB[v] += rb.compute_s
            W[v] += wgrad[kind]
        extra_f = (embed if v == 0 else 0.0) + (head_f if v == n - 1 else 0.0)
        extra_b = (embed if v == 0 else 0.0) + (head_b if v == n - 1 else 0.0)
        F[v], CF[v], B[v], CB[v] = F[v] + extra_f, CF[v] + extra_f, B[v] + extra_b, CB[v] + extra_b
        W[v] += head_w if v == n - 1 else 0.0

    p2p_s = 0.0
    if L.pp > 1:
        c = collective_cost(topo, "send_recv", (ctx.reps[0], ctx.reps[1]), 1.0, ctx.n_groups("pp"))
        p2p_s = c.time_s(graph.pp_bytes)
    m = L.microbatches
    slow = profile.comm_compute_slowdown

    def fb_s(vf: int, vb: int) -> float:
        """DualPipe's F&B: one micro-batch's forward and another's backward share the rank; each
        one's collectives run under the other's compute (slowed by the interference factor)."""
        compute, comm = CF[vf] + CB[vb], (F[vf] - CF[vf]) + (B[vb] - CB[vb])
        return max(compute + slow * min(comm, compute), comm)

    pipe = run_schedule(st, plan.schedule if L.pp > 1 else "1f1b", m, F, B, W, p2p_s, fb_s, record=trace)

    host_s = profile.step_overhead_us * 1e-6  # per-step host time (calibrated; 0 on presets)
    syncs, tails, delays = [], [], []
    for s in range(L.pp):
        red, gat, chunks = _sync_chunks(graph, ctx, s)
        if plan.overlap.grad_sync:
            exp_r, delay = _overlapped_sync(chunks, pipe, pipe.finish_s[s], F, B, st)
            hidden = slow * max(0.0, red + gat - exp_r - delay)  # compute slowed while the hidden part runs
        else:
            exp_r, delay, hidden = red + gat, 0.0, 0.0
        # FP8 plans: the optimizer step is followed by the FP8 weight copies (+ transposes), once per step
        opt = hw.compute_s(graph.optimizer_op(s)) + _serial_s(graph.fp8_weight_cast_ops(s), hw)
        syncs.append([red, gat, exp_r + hidden, opt])
        tails.append(exp_r + hidden + opt + host_s)
        delays.append(delay)
    # a parameter gather that a rank's first forward waits for delays the whole pipeline behind it
    delay = max(delays)
    totals = [delay + pipe.finish_s[s] + tails[s] for s in range(L.pp)]
    for sy in syncs:
        sy[2] += delay
    step = max(totals)
    # the breakdown is the busiest rank's (its own work + everything it waits for = the step): with
    # uneven stages the rank that finishes last may be a light one waiting on the others, whose
    # "bubble" would hide what really paces the pipeline
    work = [pipe.busy_s[s] + syncs[s][2] + syncs[s][3] for s in range(L.pp)]
    cs = max(range(L.pp), key=lambda s: (work[s], totals[s]))
    red, gat, exposed, opt = syncs[cs]
    mine = st.stages_of(cs)
    compute = m * sum(CF[v] + CB[v] for v in mine)
    exposed_comm = max(0.0, pipe.busy_s[cs] - compute)
    breakdown = {"compute_s": compute, "exposed_comm_s": exposed_comm,
                 "bubble_s": step - host_s - work[cs], "grad_sync_s": exposed, "optimizer_s": opt}
    if host_s > 0:
        breakdown["other_s"] = host_s
    memory, fits = _memory(model, plan, world, profile)
    mfu = graph.model_flops_per_iteration() / (step * world * hw.peak_bf16_flops())
    main = "moe" if "moe" in runs else "dense"
    details = {
        "layer_ops": _op_times(runs[main]),
        "layer_s": {k: {"fwd": f.duration_s, "bwd": b.duration_s, "fwd_compute": f.compute_s,
                        "bwd_compute": b.compute_s} for k, (f, b) in runs.items()},
        "comm_bytes_per_rank": {op.event: op.bytes_per_rank for op in graph.layers[main].ops if op.kind == "comm"},
        "grad_sync": {"reduce_s": red, "gather_s": gat, "exposed_s": exposed,
                      "bytes_per_rank": sum(op.bytes_per_rank for op in graph.grad_sync_ops(cs))},
        "pipeline": {"pp": L.pp, "vpp": L.vpp, "microbatches": m, "p2p_s": p2p_s, "stage_fwd_s": F,
                     "stage_bwd_s": B, "stage_wgrad_s": W, "critical_stage": cs, "schedule": plan.schedule,
                     "layers_per_stage": [hi - lo for lo, hi in st.ranges]},
        "collectives": {op.event: ctx.cost(op).algorithm for op in graph.layers[main].ops if op.kind == "comm"},
    }
    tokens_per_s = graph.tokens_per_iteration() / step
    low, high = band(tokens_per_s, profile.uncertainty)
    res = SimResult(step_time_s=step, tokens_per_s=tokens_per_s, mfu=mfu,
                    breakdown=breakdown, memory_GiB=memory, fits=fits, name=plan.name,
                    plan=plan.model_dump(mode="json"), details=details, tokens_per_s_low=low, tokens_per_s_high=high)
    if trace:
        res.timeline = build_timeline(pipe, runs[main], syncs, totals, ctx, graph)
    return res


def _op_times(run: tuple[LayerRun, LayerRun]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in run:
        for s in r.spans:
            out[s.op.event] = out.get(s.op.event, 0.0) + (s.end_s - s.start_s)
    return out
