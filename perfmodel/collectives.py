"""Collective algorithms expanded into flows on the topology, and their cost.

Payload B is the op's local buffer (opgraph convention): the full gathered/reduced buffer
for all_gather / reduce_scatter / all_reduce, the send buffer for all_to_all, the message
for send_recv. Algorithms (as NCCL picks them for these shapes):
  ring          inside one NVLink domain, or one rank per node: each rank sends (n-1)/n B
                (all_reduce 2(n-1)/n B) to its ring successor; n-1 (2(n-1)) latency steps
  hierarchical  l ranks on each of k nodes: reduce-scatter over NVLink, the ring across
                nodes on B/l per rail (l rings in parallel), all-gather over NVLink
  pairwise a2a  every rank sends B/n to each peer at once (intra- and inter-node flows);
                flows to/from the representative (hottest) rank scale by the imbalance
  deepep a2a    the deepep dispatcher (DeepEP; DeepSeek-V3 s.3.2.2): a token crosses the network
                once per destination node, to the GPU of the same local index, which forwards
                its copies over NVLink; both stages run at once (one phase)
  send_recv     one flow

Cost: in the fluid model every flow scales with B, so a collective costs
`latency_s + B * s_per_byte`; both come from ONE fluid run per (placement, algorithm) at
B = 1 and are cached. Other groups of the same kind run at the same time: on each link the
representative group gets the share b / max(b, load) of its capacity, where load is the mean
load that all n_groups concurrent groups put on the links of that class (by symmetry,
n_groups x the representative's load on the class / the class's link count).

Scale: phases are arrays of flows (a 100k-GPU group's gradient sync has ~10^5); a phase of
many flows is priced on arrays (routes from Topology.routes_array, loads by bincount, the fluid
run in fluid.batch_finish_s) with every sum in the per-flow order, so both paths give the same
bits; and a group is priced once per shape: its translate by whole fabric blocks on identical
full leaves costs the same (_canonical).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import simpy

from perfmodel.sim.fluid import FluidNet, batch_finish_s
from perfmodel.topology import LINK_CLASSES, Topology

MAX_FLUID_FLOWS = 4096  # above this, a phase's time is its most loaded link (exact when flows end together)
SMALL_PHASE_FLOWS = 128  # up to this many flows a phase is priced flow by flow (array set-up costs more)


@dataclass(frozen=True)
class Flow:
    src: int
    dst: int
    bytes: float  # per byte of payload


@dataclass(frozen=True, eq=False)
class Phase:
    """Flows that start together, as arrays (a 100k-GPU group's phase has ~10^5 flows)."""
    src: np.ndarray
    dst: np.ndarray
    bytes: np.ndarray  # per byte of payload
    steps: int  # latency steps (ring hops in sequence)

    @property
    def flows(self) -> tuple[Flow, ...]:
        return tuple(Flow(a, b, x) for a, b, x in zip(self.src.tolist(), self.dst.tolist(), self.bytes.tolist(), strict=True))


@dataclass(frozen=True)
class CollectiveCost:
    latency_s: float
    s_per_byte: float
    link_class: str  # the link class that bounds it: nvlink | nic | spine | none
    algorithm: str

    def time_s(self, payload_bytes: float) -> float:
        return self.latency_s + payload_bytes * self.s_per_byte if payload_bytes > 0 else 0.0


def _rings(rings: np.ndarray, frac: float, steps: int) -> Phase:
    """Rings (one per row) in parallel: each rank sends `frac` to its successor."""
    src = rings.ravel()
    return Phase(src, np.roll(rings, -1, axis=1).ravel(), np.full(src.size, frac), steps)


def distinct_nodes_per_token(top_k: int, nodes: int, expert_groups: int = 1, groups_per_token: int = 0) -> float:
    """Expected number of nodes a token's top_k experts sit on, the experts spread evenly over `nodes`
    and picked independently among the eligible nodes: all of them, or under group-limited routing
    the nodes of the token's `groups_per_token` groups (a group spans nodes/expert_groups nodes when
    there are fewer groups than nodes, else one). M eligible nodes: M (1 - (1 - 1/M)^top_k)."""
    eligible = float(nodes)
    if groups_per_token:
        eligible = min(eligible, groups_per_token * max(1.0, nodes / expert_groups))
    return eligible * (1.0 - (1.0 - 1.0 / eligible) ** top_k)


def _deepep(intra: np.ndarray, imbalance: float, routing: tuple[int, int, int]) -> Phase:
    """Flows per byte of payload (top_k copies per token) of the deepep dispatch (or combine): each
    rank sends a token once to the same-local-index GPU of every other destination node (the
    expected remote nodes per token / top_k of the payload, split over the K-1 remote nodes), and
    each GPU forwards what its node must spread over NVLink ((l-1)/l of its B, 1/l to each peer).
    `intra`: the group's ranks, one row per node."""
    top_k, groups, per_token = routing
    k, l = intra.shape
    remote = distinct_nodes_per_token(top_k, k, groups, per_token) * (k - 1) / k
    per_node = remote / top_k / (k - 1)
    nodes = intra.tolist()
    rep = nodes[0][0]
    src, dst, frac = [], [], []
    for i, node in enumerate(nodes):
        for j, a in enumerate(node):
            for i2, other in enumerate(nodes):
                if i2 != i:
                    b = other[j]
                    src.append(a), dst.append(b), frac.append(per_node * (imbalance if rep in (a, b) else 1.0))
            for b in node:
                if b != a:
                    src.append(a), dst.append(b), frac.append((imbalance if rep in (a, b) else 1.0) / l)
    return Phase(np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64), np.array(frac), 1)


def expand(collective: str, group: tuple[int, ...], topo: Topology, imbalance: float = 1.0,
           routing: tuple[int, int, int] | None = None) -> tuple[str, list[Phase]]:
    """(algorithm name, phases of flows per byte of payload) for the group's collective. `routing`
    (all_to_all only): the deepep dispatcher's (top_k, expert_groups, groups_per_token)."""
    n = len(group)
    g = np.asarray(group, dtype=np.int64)
    if collective == "send_recv":
        return "p2p", [Phase(g[:1], g[-1:], np.ones(1), 1)] if n > 1 else []
    if n <= 1:
        return "none", []
    dom = g // topo.domain_gpus
    order = np.argsort(dom, kind="stable")  # by NVLink domain, the group's order inside one
    _, per = np.unique(dom, return_counts=True)
    k, l = len(per), int(per[0])
    even = bool((per == l).all())
    if collective == "all_to_all":
        if routing is not None and k > 1 and l > 1 and even:
            return "deepep", [_deepep(g[order].reshape(k, l), imbalance, routing)]
        a, b = np.repeat(g, n), np.tile(g, n)
        off = a != b
        a, b = a[off], b[off]
        hot = (a == g[0]) | (b == g[0])  # flows to/from the representative rank scale by the imbalance
        return "pairwise", [Phase(a, b, np.where(hot, imbalance, 1.0) / n, 1)]
    hier = k > 1 and l > 1 and even
    if not hier:
        f = (n - 1) / n
        if collective == "all_reduce":
            return "ring", [_rings(g[None, :], 2 * f, 2 * (n - 1))]
        return "ring", [_rings(g[None, :], f, n - 1)]
    fl, fk = (l - 1) / l, (k - 1) / k
    intra = g[order].reshape(k, l)
    rails = intra.T.copy()
    rs_in, ag_in = _rings(intra, fl, l - 1), _rings(intra, fl, l - 1)
    if collective == "reduce_scatter":
        return "hierarchical", [rs_in, _rings(rails, fk / l, k - 1)]
    if collective == "all_gather":
        return "hierarchical", [_rings(rails, fk / l, k - 1), ag_in]
    return "hierarchical", [rs_in, _rings(rails, 2 * fk / l, 2 * (k - 1)), ag_in]


def _coarse(cls: str) -> str:
    return cls.split("_")[0].replace("pcie", "nic")


def _phase_time(phase: Phase, topo: Topology, n_groups: int) -> tuple[float, float, str]:
    """(latency_s, s_per_byte, bounding class) of one phase of the representative group: flow by
    flow for a few flows, on arrays for many; the two agree bit for bit (test_topology_symmetry)."""
    if len(phase.src) <= SMALL_PHASE_FLOWS:
        return _phase_time_per_flow(phase, topo, n_groups)
    return _phase_time_arrays(phase, topo, n_groups)


def _phase_time_per_flow(phase: Phase, topo: Topology, n_groups: int) -> tuple[float, float, str]:
    """Each flow routed, loads summed link by link; the fluid run in FluidNet."""
    routes = [(f, topo.route(f.src, f.dst)) for f in phase.flows]
    routes = [(f, r) for f, r in routes if r]
    if not routes:
        return 0.0, 0.0, "none"
    load: dict[int, float] = {}
    for f, r in routes:
        for link in r:
            load[link] = load.get(link, 0.0) + f.bytes
    class_load: dict[str, float] = {}
    for link, b in load.items():
        class_load[topo.cls[link]] = class_load.get(topo.cls[link], 0.0) + b
    cap = {}
    for link, b in load.items():
        c = topo.cls[link]
        mean = n_groups * class_load[c] / topo.links_of_class[c]
        cap[link] = topo.cap_Bps[link] * min(1.0, b / mean) if mean > b else topo.cap_Bps[link]
    bott = max(load, key=lambda x: (load[x] / cap[x], -x))
    if len(routes) > MAX_FLUID_FLOWS:
        t = load[bott] / cap[bott]
    else:
        env = simpy.Environment()
        net = FluidNet(env, cap)
        net.submit_many([(f.bytes, r) for f, r in routes])
        env.run()
        t = env.now
    lat = phase.steps * max(topo.route_latency_s(r) for _, r in routes)
    return lat, t, _coarse(topo.cls[bott])


def _phase_time_arrays(phase: Phase, topo: Topology, n_groups: int) -> tuple[float, float, str]:
    """Vectorized over flows; every sum runs in the order the per-flow loop takes (flows in order,
    a route's hops in order, links in order of first use), so the figures are the same."""
    routes = topo.routes_array(phase.src, phase.dst)
    used = (routes >= 0).any(axis=1)
    if not used.any():
        return 0.0, 0.0, "none"
    routes, fbytes = routes[used], phase.bytes[used]
    flat = routes.ravel()
    hop = flat >= 0
    weights = np.repeat(fbytes, routes.shape[1])[hop]
    flat = flat[hop]
    links, first = np.unique(flat, return_index=True)  # sorted ids
    dense = np.zeros(int(links[-1]) + 1, dtype=np.int64)
    dense[links] = np.arange(links.size)  # link id -> its position in `links`
    load = np.bincount(dense[flat], weights=weights, minlength=links.size)  # per link, in flow order
    cap0, lat, code = topo.link_arrays(links)
    cap = cap0.copy()
    seen = np.argsort(first, kind="stable")  # links in order of first use
    for c in np.unique(code):
        mine = seen[code[seen] == c]
        class_load = float(np.cumsum(load[mine])[-1])  # sequential, in order of first use
        mean = n_groups * class_load / topo.links_of_class[LINK_CLASSES[c]]
        over = mine[mean > load[mine]]
        cap[over] = cap0[over] * np.minimum(1.0, load[over] / mean)
    ratio = load / cap
    top = ratio.max()
    b = int(np.flatnonzero(ratio == top)[0])  # ties: the lowest link id
    if len(routes) > MAX_FLUID_FLOWS:
        t = float(load[b] / cap[b])
    else:  # the fluid run (FluidNet's rule on arrays: batch_finish_s)
        t = batch_finish_s(cap, np.where(routes >= 0, dense[np.maximum(routes, 0)], -1), fbytes)
    hop_lat = np.where(routes >= 0, lat[dense[np.maximum(routes, 0)]], 0.0)
    route_lat = hop_lat[:, 0].copy()
    for h in range(1, routes.shape[1]):  # a route's hops in order, as route_latency_s sums them
        route_lat += hop_lat[:, h]
    return phase.steps * float(route_lat.max()), t, _coarse(LINK_CLASSES[code[b]])


_CACHE: dict[tuple, CollectiveCost] = {}


def _canonical(topo: Topology, group: tuple[int, ...]) -> tuple[int, ...]:
    """The group moved down by whole fabric blocks (Topology.translation_gpus): a translate of a
    group on identical full leaves crosses the same link classes with the same capacities, flow
    for flow, so it costs the same (bit for bit): one pricing per shape, not per placement."""
    block = topo.translation_gpus
    lo = min(group) // block * block if group else 0
    if lo == 0 or max(group) >= topo.full_leaf_gpus:
        return group
    return tuple(r - lo for r in group)


def latency_steps(collective: str, n: int, exponent: float = 1.0) -> float:
    """Latency steps of a collective over n ranks, the unit of a calibrated latency: (n-1)^exponent
    for an all-to-all (peer exchanges) or a ring all-gather / reduce-scatter, twice that for an
    all-reduce (two rings), 1 for a send/recv. exponent 1: the n-1 rounds run in series; below 1
    they partly overlap (calibrated: `ProfileSpec.latency_exponent`)."""
    if collective == "send_recv" or n <= 1:
        return 1.0
    return (2.0 if collective == "all_reduce" else 1.0) * (n - 1) ** exponent


@cache
def straggler_gap(n: int) -> float:
    """E[max of n iid standard normals]: how far, in standard deviations of the ranks' arrival
    times, the last of n ranks arrives after the mean one (0 for n = 1; 0.56 for 2, 1.03 for 4,
    1.42 for 8). A collective completes when its last rank arrives, so its mean rank waits this."""
    if n <= 1:
        return 0.0
    x = np.linspace(-8.0, 8.0, 4001)
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2)))
    return float(np.sum(x * n * pdf * cdf ** (n - 1)) * (x[1] - x[0]))


def straggler_wait_s(skew: float, interval_s: float, n: int) -> float:
    """A layer collective's wait for its stragglers: ranks drift apart while they compute, with a
    spread (standard deviation) of `skew` x the compute since their previous collective
    (`ProfileSpec.sync_skew`), and the mean rank waits for the last of its n peers."""
    return skew * interval_s * straggler_gap(n) if skew > 0 and interval_s > 0 else 0.0


def collective_cost(topo: Topology, collective: str, group: tuple[int, ...], imbalance: float = 1.0,
                    n_groups: int = 1, routing: tuple[int, int, int] | None = None) -> CollectiveCost:
    """Cost of the collective for `group` while `n_groups` groups of its kind run concurrently (cached)."""
    key = (topo, collective, group, imbalance, n_groups, routing)
    cost = _CACHE.get(key)
    if cost is not None:
        return cost
    shape = _canonical(topo, group)
    canon = (topo, collective, shape, imbalance, n_groups, routing)
    cost = _CACHE.get(canon) if shape is not group else None
    if cost is None:
        algo, phases = expand(collective, shape, topo, imbalance, routing)
        lat = spb = 0.0
        worst, cls = -1.0, "none"
        for ph in phases:
            pl, pt, pc = _phase_time(ph, topo, n_groups)
            lat, spb = lat + pl, spb + pt
            if pt > worst:
                worst, cls = pt, pc
        cost = CollectiveCost(lat, spb, cls, algo)
    if len(_CACHE) > 100_000:
        _CACHE.clear()
    _CACHE[key] = _CACHE[canon] = cost
    return cost


def bytes_sent(phases: list[Phase], rank: int) -> float:
    """Bytes (per byte of payload) that `rank` sends over all phases."""
    return float(sum(ph.bytes[ph.src == rank].sum() for ph in phases))
