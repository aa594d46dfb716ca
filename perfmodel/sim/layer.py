"""One layer's ops for one phase group (forward, or recompute+backward) on a representative rank.

Overlap is modelled as the runtime executes it (runtime/moe.py, runtime/overlap.py):
  none      one stream runs every op in program order (comm blocks compute)
  inter_op  comm ops run on one stream per group kind; the compute stream runs the first
            ready op in program order; independent branches (the shared expert) run under
            the comm (after the experts: under the combine a2a, and under its gradient in
            backward); the expert wgrad GEMMs (moe.fc1/fc2) are deferred (they run while the
            dispatch gradient all-to-all is in flight), other wgrads stay next to their dgrad.
            The micro-batch is not split (`expand(halves=2)` remains for studies of a split)
  intra_op  the expert path dispatch a2a -> fc1 -> act -> fc2 -> combine a2a (and any GEMM +
            adjacent expert-parallel collective chain) is cut into `chunks` pieces pipelined
            across compute and comm streams; the first piece's comm is the fill cost.
            chunk: every piece is its own kernel (own launch, efficiency at its size);
            tile: pieces of one fused kernel (efficiency of the whole GEMM, a small per-tile
            overhead, the collective's latency once) -- a GPU technique the runtime does not
            have: it runs tile as chunk, so `moeperf compare` prices measured plans with
            `as_executed` (tile -> chunk; gradient sync not overlapped, as in runtime.optim)
Compute and comm share the rank's resources in a FluidNet: comm ops share their bounding
link class, and compute slows by the profile's interference factor while comm runs.
Straggler wait: peers drift apart in proportion to the work between syncs, so a collective
first waits for the last of its n ranks: `sync_skew` x the compute its rank did since its
previous collective started x E[max of n normals] (perfmodel.sim.collectives.straggler_wait_s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

from perfmodel.sim.collectives import CollectiveCost, straggler_wait_s
from perfmodel.sim.fluid import FluidNet
from perfmodel.sim.hardware import Hardware
from perfmodel.sim.opgraph import QUANT_OPS, Op
from perfmodel.specs import OverlapSpec

CHAIN_GROUPS = ("ep", "etp")  # collectives pipelined with their GEMM by intra-op overlap (the runtime
# chunks the expert-parallel token path only: TP all-gather/reduce-scatter stay whole)
# (de)quantize kernels around a compressed collective, and the FP8 casts of the expert GEMMs' inputs,
# are pipelined with it
CHAIN_MEMORY = QUANT_OPS | {"moe.fc1_quant", "moe.fc2_quant"}
EXPERT_BODY = ("moe.act", "moe.fc2_quant", "moe.fc2", "moe.fc1")  # chunked with the dispatch/combine a2a around them
UNCHAINED = ("moe.dispatch_counts",)  # one exchange of every chunk's counts, before the first chunk
DEFERRED_WGRAD = ("moe.fc1", "moe.fc2")  # inter-op: wgrad deferred under the dispatch gradient a2a


def as_executed(overlap: OverlapSpec) -> OverlapSpec:
    """The overlap the runtime really executes: tile runs as chunk (no tile-level kernel), and the
    gradient sync runs after the backward (runtime.optim syncs whole buckets once it is done)."""
    return overlap.model_copy(update={"intra_op": "chunk" if overlap.intra_op == "tile" else overlap.intra_op,
                                      "grad_sync": False})


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
    link = lambda o: (o.kind == "comm" and o.name not in UNCHAINED) or o.name in CHAIN_MEMORY  # noqa: E731
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
                if side == "before" and g.name in EXPERT_BODY:
                    full += _body_and_after(full[-1], cons, taken, link)
                taken.update(o.event for o in full)
                out.append(full)
                break
    return out


def _body_and_after(cur: Op, cons: dict[str, list[Op]], taken: set[str], link) -> list[Op]:
    """The rest of the expert path after fc1 (act, fc2; mirrored in dgrad) and the collective
    chain after it: the runtime pipelines the whole dispatch -> experts -> combine per chunk."""
    body: list[Op] = []
    while True:
        c = [o for o in cons[cur.event] if o.phase != "wgrad"]
        if len(c) != 1 or len(c[0].deps) != 1 or c[0].event in taken:
            break
        nxt = c[0]
        if nxt.name in EXPERT_BODY and nxt.kind != "comm":
            body.append(nxt)
        elif link(nxt):
            body.append(nxt)
        else:
            break
        cur = nxt
    while body and body[-1].kind != "comm":
        body.pop()
    return body


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
                low = op.phase == "wgrad" and op.name in DEFERRED_WGRAD
                s = SimOp(op, op.event + sfx, 1 / halves, deps=deps, stream=stream, low=low)
                out.append(s)
                last[op.event] = s
                continue
            ci, j = in_chain[op.event]
            if j > 0:
                continue  # emitted with the chain's head
            chain = chains[ci]
            # leading collective(s) of piece i+1 are issued before the rest of piece i, as the
            # runtime launches chunk i+1's dispatch before chunk i's experts (and their combine)
            head = next((k for k, o in enumerate(chain) if o.kind != "comm" and o.name not in CHAIN_MEMORY),
                        len(chain))
            order = [(0, k) for k in range(head)]
            for i in range(n):
                order += [(i + 1, k) for k in range(head) if i + 1 < n] + [(i, k) for k in range(head, len(chain))]
            pieces: dict[tuple[int, int], SimOp] = {}
            for i, k in order:
                o = chain[k]
                st = "compute" if o.kind != "comm" else f"comm.{o.group}"
                d = list(deps) if k == 0 else [pieces[i, k - 1]]
                if i > 0:
                    d.append(pieces[i - 1, k])
                s = SimOp(o, f"{o.event}{sfx}.{i}", 1 / (halves * n), deps=d, stream=st)
                if tile:
                    s.eff_work = o.flops / halves
                    s.launch_s = hw.launch_s if i == 0 else hw.tile_overhead_s
                    s.latency = i == 0
                out.append(s)
                pieces[i, k] = s
            for k, o in enumerate(chain):
                last[o.event] = pieces[n - 1, k]
    if halves > 1:  # interleave the halves in program order: a0 b0 a1 b1 ...
        per = len(out) // 2
        out = [x for pair in zip(out[:per], out[per:], strict=True) for x in pair]
    return out


def run_layer(ops: list[Op], overlap: OverlapSpec, hw: Hardware,
              comm_cost: Callable[[Op], CollectiveCost]) -> LayerRun:
    """Simulate the ops in the order and on the streams the runtime uses (no micro-batch split:
    runtime.moe overlaps within one micro-batch; intra-op chunks are the finer unit)."""
    return _run(ops, overlap, hw, comm_cost, 1)


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
    since_sync = [0.0]  # compute seconds since the last collective started
    skew = hw.profile.sync_skew

    def execute(s: SimOp):
        s.start_s = env.now
        if s.op.kind == "comm":
            c = comm_cost(s.op)
            wait, since_sync[0] = straggler_wait_s(skew, since_sync[0], s.op.group_size), 0.0
            net.comm_presence(+1)  # interferes with compute from its start, not only while bytes move
            if wait > 0:
                yield env.timeout(wait)
            if s.latency and c.latency_s:
                yield env.timeout(c.latency_s)
            job = net.submit(s.op.bytes * s.frac * c.s_per_byte, (c.link_class,), "comm")
            yield job.done
            net.comm_presence(-1)
        else:
            job = net.submit(hw.compute_s(s.op, s.frac, s.eff_work, s.launch_s, host=s.latency), ("compute",), "compute")
            yield job.done
        s.end_s = env.now
        if s.op.kind != "comm":
            busy[0] += s.end_s - s.start_s
            since_sync[0] += s.end_s - s.start_s
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
    # the last op's end, not env.now: a rate change (compute speeding up when a collective ends)
    # leaves the fluid model's superseded timers in the queue, later than the real finish
    return LayerRun(max((s.end_s for s in sops), default=0.0), busy[0], sops)
