"""One layer's ops for one phase group (forward, or recompute+backward) on a representative rank.

Overlap is modelled by how ops are placed on streams:
  none      one stream runs every op in program order (comm blocks compute)
  inter_op  comm ops run on one stream per group kind; the compute stream runs the first
            ready op in program order, wgrad GEMMs last (they fill the gaps while dgrad
            waits for comm), independent branches (the shared expert) run under the comm;
            the micro-batch may also be split in two halves whose ops interleave (the comm
            of one under the compute of the other): the faster of the two is kept
  intra_op  each GEMM + adjacent collective chain (e.g. dispatch a2a -> fc1, fc2 -> combine
            a2a) is cut into `chunks` pieces pipelined across compute and comm streams; the
            first piece's comm is the fill cost. chunk: every piece is its own kernel (own
            launch, efficiency at its size); tile: pieces of one fused kernel (efficiency of
            the whole GEMM, a small per-tile overhead, the collective's latency once)
Compute and comm share the rank's resources in a FluidNet: comm ops share their bounding
link class, and compute slows by the profile's interference factor while comm runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

from perfmodel.collectives import CollectiveCost
from perfmodel.hardware import Hardware
from perfmodel.opgraph import QUANT_OPS, Op
from perfmodel.sim.fluid import FluidNet
from perfmodel.specs import OverlapSpec

CHAIN_GROUPS = ("ep", "etp", "tp")  # collectives fused/pipelined with their GEMM by intra-op overlap
CHAIN_MEMORY = QUANT_OPS  # (de)quantize kernels around a compressed collective are pipelined with it


@dataclass(eq=False)
class SimOp:
    op: Op
    label: str
    frac: float = 1.0
    eff_work: float | None = None
    launch_s: float | None = None
    latency: bool = True
    deps: list[SimOp] = field(default_factory=list)
    stream: str = "compute"
    low: bool = False
    done: simpy.Event | None = None
    start_s: float = 0.0
    end_s: float = 0.0


@dataclass
class LayerRun:
    duration_s: float
    compute_s: float  # busy time of the compute stream
    spans: list[SimOp]

    @property
    def exposed_comm_s(self) -> float:
        return max(0.0, self.duration_s - self.compute_s)


def _chains(ops: list[Op]) -> list[list[Op]]:
    """GEMM + adjacent collective chains (each op in at most one chain)."""
    by = {op.event: op for op in ops}
    cons: dict[str, list[Op]] = {op.event: [] for op in ops}
    for op in ops:
        for d in op.deps:
            if d in cons:
                cons[d].append(op)
    link = lambda o: o.kind == "comm" or o.name in CHAIN_MEMORY  # noqa: E731
    taken: set[str] = set()
    out = []
    for g in ops:
        if g.kind != "gemm" or g.phase == "wgrad" or g.event in taken:
            continue
        for side in ("before", "after"):
            chain, cur = [], g
            while True:
                if side == "before":
                    nxt = by.get(cur.deps[0]) if len(cur.deps) == 1 else None
                else:
                    c = [o for o in cons[cur.event] if o.phase != "wgrad"]
                    nxt = c[0] if len(c) == 1 and len(c[0].deps) == 1 else None
                if nxt is None or not link(nxt) or nxt.event in taken:
                    break
                chain.append(nxt)
                cur = nxt
            while chain and chain[-1].kind != "comm":
                chain.pop()
            if any(o.kind == "comm" and o.group in CHAIN_GROUPS for o in chain):
                full = chain[::-1] + [g] if side == "before" else [g] + chain
                taken.update(o.event for o in full)
                out.append(full)
                break
    return out


def expand(ops: list[Op], overlap: OverlapSpec, hw: Hardware, halves: int = 1) -> list[SimOp]:
    """SimOps in program order, with micro-batch halves (inter-op) and chunks/tiles (intra-op)."""
    n = overlap.chunks if overlap.intra_op != "none" else 1
    chains = _chains(ops) if n > 1 else []
    in_chain = {o.event: (i, j) for i, c in enumerate(chains) for j, o in enumerate(c)}
    tile = overlap.intra_op == "tile"
    out: list[SimOp] = []
    for h in range(halves):
        sfx = f"#{h}" if halves > 1 else ""
        last: dict[str, SimOp] = {}
        for op in ops:
            stream = "compute" if op.kind != "comm" else f"comm.{op.group}"
            deps = [last[d] for d in op.deps if d in last]
            if op.event not in in_chain:
                s = SimOp(op, op.event + sfx, 1 / halves, deps=deps, stream=stream, low=op.phase == "wgrad")
                out.append(s)
                last[op.event] = s
                continue
            ci, j = in_chain[op.event]
            if j > 0:
                continue  # emitted with the chain's head
            chain = chains[ci]
            prev_piece: list[SimOp | None] = [None] * len(chain)
            for i in range(n):
                for k, o in enumerate(chain):
                    st = "compute" if o.kind != "comm" else f"comm.{o.group}"
                    d = list(deps) if k == 0 else [prev_piece[k - 1]]
                    if prev_piece[k] is not None:
                        d.append(prev_piece[k])
                    s = SimOp(o, f"{o.event}{sfx}.{i}", 1 / (halves * n), deps=d, stream=st)
                    if tile:
                        s.eff_work = o.flops / halves
                        s.launch_s = hw.launch_s if i == 0 else hw.tile_overhead_s
                        s.latency = i == 0
                    out.append(s)
                    prev_piece[k] = s
            for k, o in enumerate(chain):
                last[o.event] = prev_piece[k]  # type: ignore[assignment]
    if halves > 1:  # interleave the halves in program order: a0 b0 a1 b1 ...
        per = len(out) // 2
        out = [x for pair in zip(out[:per], out[per:], strict=True) for x in pair]
    return out


def run_layer(ops: list[Op], overlap: OverlapSpec, hw: Hardware,
              comm_cost: Callable[[Op], CollectiveCost]) -> LayerRun:
    """Simulate the ops; with inter-op overlap, the faster of the whole and the split micro-batch."""
    run = _run(ops, overlap, hw, comm_cost, 1)
    if overlap.inter_op:
        split = _run(ops, overlap, hw, comm_cost, 2)
        if split.duration_s < run.duration_s:
            return split
    return run


def _run(ops: list[Op], overlap: OverlapSpec, hw: Hardware, comm_cost: Callable[[Op], CollectiveCost],
         halves: int) -> LayerRun:
    sops = expand(ops, overlap, hw, halves)
    serial = not overlap.inter_op and overlap.intra_op == "none"
    env = simpy.Environment()
    net = FluidNet(env, {"compute": 1.0, "nvlink": 1.0, "nic": 1.0, "spine": 1.0, "none": 1.0},
                   slowdown=hw.profile.comm_compute_slowdown, slowed=frozenset({"compute"}))
    for s in sops:
        s.done = env.event()
        if serial:
            s.stream = "compute"
    busy = [0.0]

    def execute(s: SimOp):
        s.start_s = env.now
        if s.op.kind == "comm":
            c = comm_cost(s.op)
            if s.latency and c.latency_s:
                yield env.timeout(c.latency_s)
            job = net.submit(s.op.bytes * s.frac * c.s_per_byte, (c.link_class,), "comm")
        else:
            job = net.submit(hw.compute_s(s.op, s.frac, s.eff_work, s.launch_s), ("compute",), "compute")
        yield job.done
        s.end_s = env.now
        if s.op.kind != "comm":
            busy[0] += s.end_s - s.start_s
        s.done.succeed()

    def in_order(queue: list[SimOp]):
        for s in queue:
            pend = [d.done for d in s.deps if not d.done.triggered]
            if pend:
                yield env.all_of(pend)
            yield from execute(s)

    def by_priority(queue: list[SimOp]):
        while queue:
            ready = [s for s in queue if all(d.done.triggered for d in s.deps)]
            if not ready:
                yield env.any_of([d.done for s in queue for d in s.deps if not d.done.triggered])
                continue
            pick = next((s for s in ready if not s.low), ready[0])
            queue.remove(pick)
            yield from execute(pick)

    streams: dict[str, list[SimOp]] = {}
    for s in sops:
        streams.setdefault(s.stream, []).append(s)
    for name, queue in streams.items():
        env.process(by_priority(queue) if name == "compute" and overlap.inter_op else in_order(queue))
    env.run()
    return LayerRun(env.now, busy[0], sops)
