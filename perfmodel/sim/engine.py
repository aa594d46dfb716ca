"""simulate(): one training iteration of a plan on a cluster.

Symmetry: one representative rank per pipeline stage (the one whose tp/sp/dp coordinates
are 0; its groups hold the hottest expert rank). Stages are translations of each other on
a symmetric fabric, so each distinct layer kind (moe / dense) is simulated once per phase
group (forward; recompute + backward) with stage 0's group placement, in a simpy run where
its compute and collectives share the rank's resources. Stage times are sums of layer
times (+ embedding on the first stage, the head on the last); the pipeline schedule is
composed from them; then DP gradient sync (exposed or overlapped with the last
micro-batch's backward / the next forward's parameter gather) and the optimizer step.

Breakdown (critical = the stage that finishes last): compute_s (busy compute of its
micro-batches), exposed_comm_s (layer comm not hidden under compute), bubble_s (pipeline
idle incl. p2p waits), grad_sync_s (exposed), optimizer_s, and other_s (the profile's per-step
host time, where calibrated); they add up to step_time_s.
"""

from __future__ import annotations

from dataclasses import dataclass

from perfmodel.collectives import CollectiveCost, collective_cost, latency_steps
from perfmodel.hardware import Hardware
from perfmodel.layout import rank_group_index, rank_groups
from perfmodel.opgraph import Op, OpGraph
from perfmodel.sim.layer import LayerRun, run_layer
from perfmodel.sim.pipeline import run_pipeline
from perfmodel.sim.result import SimResult
from perfmodel.sim.timeline import build_timeline
from perfmodel.specs import ClusterSpec, CollectiveFit, ModelSpec, PlanSpec, ProfileSpec
from perfmodel.topology import Topology, topology_for

_GRAPHS: dict[tuple[str, str, int], OpGraph] = {}


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
    groups: dict[str, tuple[tuple[int, ...], ...]]
    index: dict[str, dict[int, tuple[int, ...]]]  # kind -> rank -> its group (layout.rank_group_index)
    reps: tuple[int, ...]  # representative rank of each stage
    fits: dict[str, CollectiveFit]  # calibrated alpha-beta per "collective.group" or "collective"
    exponent: float = 1.0  # calibrated latency growth with group size (ProfileSpec.latency_exponent)

    def group(self, kind: str, stage: int) -> tuple[int, ...]:
        return self.index[kind][self.reps[stage]]

    def cost(self, op: Op, stage: int = 0) -> CollectiveCost:
        g = self.group(op.group or "", stage)
        cost = collective_cost(self.topo, op.collective or "", g, op.imbalance, len(self.groups[op.group or ""]))
        fit = self.fits.get(f"{op.collective}.{op.group}") or self.fits.get(op.collective or "")
        if fit is None or op.bytes <= 0:
            return cost
        # a calibrated profile measured this collective on this kind of group: its alpha-beta
        # (seconds = latency + bytes_per_rank * imbalance / bw) replaces the topology's estimate
        per_payload = op.bytes_per_rank * op.imbalance / op.bytes
        steps = latency_steps(op.collective or "", len(g), self.exponent)
        return CollectiveCost(fit.latency_us * 1e-6 * steps, per_payload / (fit.bw_GBps * 1e9), cost.link_class,
                              f"{cost.algorithm}+calibrated")


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
    world = cluster.world_size
    graph = _graph(model, plan, world)
    L = graph.layout
    hw = Hardware.of(profile)
    topo = topology_for(cluster, profile)
    index = rank_group_index(plan, world)
    ctx = _Ctx(topo, rank_groups(plan, world), index, index["pp"][0], profile.collectives, profile.latency_exponent)

    runs: dict[str, tuple[LayerRun, LayerRun]] = {}
    for kind, lg in graph.layers.items():
        fwd = run_layer(lg.phase("fwd"), plan.overlap, hw, ctx.cost)
        bwd = run_layer(lg.phase("recompute", "dgrad", "wgrad"), plan.overlap, hw, ctx.cost)
        runs[kind] = (fwd, bwd)
    head_f = _serial_s([op for op in graph.head_ops if op.phase == "fwd"], hw)
    head_b = _serial_s([op for op in graph.head_ops if op.phase != "fwd"], hw)
    embed = _serial_s(graph.embed_ops, hw)

    F, B, CF, CB = [], [], [], []
    for s in range(L.pp):
        kinds = graph.stage_layer_kinds(s)
        f = b = cf = cb = 0.0
        for kind in ("moe", "dense"):
            n = kinds.count(kind)
            if n:
                rf, rb = runs[kind]
                f, b, cf, cb = f + n * rf.duration_s, b + n * rb.duration_s, cf + n * rf.compute_s, cb + n * rb.compute_s
        extra_f = (embed if s == 0 else 0.0) + (head_f if s == L.pp - 1 else 0.0)
        extra_b = (embed if s == 0 else 0.0) + (head_b if s == L.pp - 1 else 0.0)
        F.append(f + extra_f)
        B.append(b + extra_b)
        CF.append(cf + extra_f)
        CB.append(cb + extra_b)

    p2p_s = 0.0
    if L.pp > 1:
        c = collective_cost(topo, "send_recv", (ctx.reps[0], ctx.reps[1]), 1.0, len(ctx.groups["pp"]))
        p2p_s = c.time_s(graph.pp_bytes)
    m = L.microbatches
    pipe = run_pipeline(F, B, m, L.vpp, p2p_s)

    slow = profile.comm_compute_slowdown
    host_s = profile.step_overhead_us * 1e-6  # per-step host time (calibrated; 0 on presets)
    totals, syncs = [], []
    for s in range(L.pp):
        red = gat = 0.0
        for op in graph.grad_sync_ops(s):
            t = ctx.cost(op, s).time_s(op.bytes)
            if op.name == "dp.param_gather":
                gat += t
            else:
                red += t
        if plan.overlap.grad_sync:
            buckets = max(1, L.layers_per_stage)
            exp_r = max(red / buckets, red - B[s] / L.vpp)
            exp_g = max(gat / buckets, gat - F[s] / L.vpp)
            exposed = exp_r + exp_g + slow * ((red - exp_r) + (gat - exp_g))
        else:
            exposed = red + gat
        opt = hw.compute_s(graph.optimizer_op(s))
        syncs.append((red, gat, exposed, opt))
        totals.append(pipe.finish_s[s] + exposed + opt + host_s)
    step = max(totals)
    cs = totals.index(step)
    red, gat, exposed, opt = syncs[cs]
    compute = m * (CF[cs] + CB[cs])
    exposed_comm = m * ((F[cs] - CF[cs]) + (B[cs] - CB[cs]))
    breakdown = {"compute_s": compute, "exposed_comm_s": exposed_comm,
                 "bubble_s": pipe.finish_s[cs] - pipe.busy_s[cs], "grad_sync_s": exposed, "optimizer_s": opt}
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
                     "stage_bwd_s": B, "critical_stage": cs},
        "collectives": {op.event: ctx.cost(op).algorithm for op in graph.layers[main].ops if op.kind == "comm"},
    }
    res = SimResult(step_time_s=step, tokens_per_s=graph.tokens_per_iteration() / step, mfu=mfu,
                    breakdown=breakdown, memory_GiB=memory, fits=fits, name=plan.name,
                    plan=plan.model_dump(mode="json"), details=details)
    if trace:
        res.timeline = build_timeline(pipe, runs[main], syncs, totals, ctx, graph)
    return res


def _op_times(run: tuple[LayerRun, LayerRun]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in run:
        for s in r.spans:
            out[s.op.event] = out.get(s.op.event, 0.0) + (s.end_s - s.start_s)
    return out
