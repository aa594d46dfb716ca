"""The symmetric fast path equals the general construction.

Fast path: the closed-form fabric (perfmodel.sim.topology), the closed-form group of a rank
(layout.group_of_rank), collectives priced on flow arrays, one pricing per translate of a group.
General path: the networkx graph (perfmodel.sim.topology_graph), every group enumerated
(layout.rank_groups), each flow routed and summed one by one (the per-flow pricing below, as
collectives.py did it before it was vectorized). They must agree bit for bit.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from perfmodel.sim import collectives, engine, simulate
from perfmodel.sim.topology import LINK_CLASSES, build_topology
from perfmodel.sim.topology_graph import build_graph_topology
from perfmodel.specs import ClusterSpec, PlanSpec, SpecError, layout, load_spec


def _cluster(nodes: int, gpn: int, nics: int, rails: bool, tiers: int, leaf_ports: int, domain: int | None,
             oversub: float) -> ClusterSpec:
    return ClusterSpec(gpu="h800", nodes=nodes, gpus_per_node=gpn,
                       intra_node=dict(domain_gpus=domain) if domain else {},
                       network=dict(nics_per_node=nics, nic_Gbps=400, rails=rails, tiers=tiers,
                                    leaf_ports=leaf_ports, oversubscription=oversub))


CLUSTERS = [  # multi-leaf, partly filled last leaves, shared NICs, NVLink domains across nodes
    _cluster(5, 4, 4, True, 2, 2, None, 1),
    _cluster(6, 4, 2, False, 3, 4, None, 2),
    _cluster(4, 8, 8, True, 3, 3, None, 2),
    _cluster(6, 4, 4, True, 2, 2, 8, 1),
    _cluster(3, 8, 8, True, 1, 64, None, 1),
    _cluster(9, 2, 5, True, 3, 3, 6, 3),  # more NICs than GPUs, a domain of 3 nodes
]


@pytest.mark.parametrize("c", CLUSTERS, ids=range(len(CLUSTERS)))
def test_closed_form_fabric_equals_the_graph_link_by_link(c):
    t, g = build_topology(c, c.profile()), build_graph_topology(c, c.profile())
    assert t.n_links == len(g.cap_Bps) and t.links_of_class == g.links_of_class
    for i in range(t.n_links):
        assert (t.cap_Bps[i], t.latency_s[i], t.cls[i]) == (g.cap_Bps[i], g.latency_s[i], g.cls[i])
    cap, lat, code = t.link_arrays(np.arange(t.n_links))
    assert cap.tolist() == g.cap_Bps and lat.tolist() == g.latency_s and [LINK_CLASSES[x] for x in code] == g.cls
    pairs = list(itertools.product(range(t.world), repeat=2))
    for a, b in pairs:
        assert t.route(a, b) == g.route(a, b)
    src, dst = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    rows = t.routes_array(src, dst)
    assert [tuple(int(x) for x in r if x >= 0) for r in rows] == [g.route(a, b) for a, b in pairs]


def _per_flow_phase_time(phase, topo, n_groups):
    """The per-flow pricing (reference): each flow routed, loads summed link by link in a dict."""
    return collectives._phase_time_per_flow(phase, topo, n_groups)


def _general_path(monkeypatch):
    """Swap the simulator onto the general path (graph fabric, enumerated groups, per-flow pricing)."""
    graphs: dict = {}

    def graph_topology(cluster, profile):
        key = cluster.model_dump_json() + profile.model_dump_json()
        return graphs.setdefault(key, build_graph_topology(cluster, profile))

    def enumerated_group(self, kind, stage):
        return layout.rank_group_index(self.plan, self.world)[kind][self.reps[stage]]

    monkeypatch.setattr(engine, "topology_for", graph_topology)
    monkeypatch.setattr(engine._Ctx, "group", enumerated_group)
    monkeypatch.setattr(engine._Ctx, "n_groups", lambda self, kind: len(layout.rank_groups(self.plan, self.world)[kind]))
    monkeypatch.setattr(collectives, "_phase_time", _per_flow_phase_time)  # on the graph fabric
    monkeypatch.setattr(collectives, "_canonical", lambda topo, group: group)


def _random_plans(world: int, rng: random.Random, k: int) -> list[PlanSpec]:
    out = []
    grid = list(itertools.product((1, 2), (1, 2, 4), (1, 2, 3, 4), (1, 2, 4, 8), (1, 2)))
    rng.shuffle(grid)
    for tp, sp, pp, ep, etp in grid:
        if world % (tp * sp * pp) or (world // pp) % (ep * etp):
            continue
        dp = world // (tp * sp * pp)
        order = tuple(rng.sample(["tp", "sp", "dp", "pp"], 4))
        out.append(PlanSpec(name=f"p{len(out)}", tp=tp, sp=sp, pp=pp, ep=ep, etp=etp, global_batch=dp * 2 * pp,
                            rank_order=order, overlap=dict(inter_op=True, grad_sync=rng.random() < 0.5),
                            dispatcher=rng.choice(["alltoall", "deepep"]) if ep > 1 else "alltoall"))
        if len(out) == k:
            break
    return out


@pytest.mark.parametrize("small", [0, collectives.SMALL_PHASE_FLOWS])
def test_fast_path_equals_the_general_path_on_random_plans(monkeypatch, small):
    monkeypatch.setattr(collectives, "SMALL_PHASE_FLOWS", small)  # 0: every phase on arrays
    model = load_spec("megascale-moe-352b", "model")
    rng = random.Random(18)
    cases = [(c, p) for c in CLUSTERS[:4] for p in _random_plans(c.world_size, rng, 2)]
    fast = {}
    for c, p in cases:
        try:
            fast[(id(c), p.name)] = simulate(model, c, p).to_json()
        except SpecError:
            fast[(id(c), p.name)] = None
    assert sum(v is not None for v in fast.values()) >= 6
    engine._RUNS.clear()
    collectives._CACHE.clear()
    _general_path(monkeypatch)
    for c, p in cases:
        if fast[(id(c), p.name)] is not None:
            assert simulate(model, c, p).to_json() == fast[(id(c), p.name)], (c, p)


def test_a_translated_group_costs_the_same_and_large_phases_match_per_flow():
    c = _cluster(16, 8, 8, True, 3, 2, None, 2)  # 8 leaves per rail, 16 GPUs per leaf block
    t, g = build_topology(c, c.profile()), build_graph_topology(c, c.profile())
    assert t.translation_gpus == 16 and t.full_leaf_gpus == 128
    group = tuple(range(3, 67, 4))  # straddles leaf blocks
    moved = tuple(r + 32 for r in group)
    for coll in ("all_reduce", "reduce_scatter", "all_to_all", "send_recv"):
        a = collectives.collective_cost(t, coll, group, 1.5, 8)
        assert collectives.collective_cost(t, coll, moved, 1.5, 8) is a  # one pricing for both
        _, phases = collectives.expand(coll, moved, t, 1.5)
        ref = [_per_flow_phase_time(ph, g, 8) for ph in phases]
        assert [collectives._phase_time_arrays(ph, t, 8) for ph in phases] == ref
        assert sum(x[1] for x in ref) == a.s_per_byte and sum(x[0] for x in ref) == a.latency_s
    # above MAX_FLUID_FLOWS the phase is priced on its busiest link: the array path matches per flow
    big = tuple(range(128))
    _, (ph,) = collectives.expand("all_to_all", big, t)
    assert len(ph.src) > collectives.MAX_FLUID_FLOWS
    assert collectives._phase_time(ph, t, 1) == _per_flow_phase_time(ph, g, 1)


def test_a_92k_gpu_simulation_builds_nothing_per_gpu():
    from perfmodel.sim.topology import topology_for
    from perfmodel.specs import with_overrides

    model = load_spec("megascale-moe-352b", "model")
    cluster = with_overrides(load_spec("megascale-1440", "cluster"), {"nodes": 11520}, "test")
    plan = PlanSpec(name="big", sp=8, ep=8, pp=6, global_batch=92160, recompute="selective",
                    overlap=dict(inter_op=True, intra_op="tile", chunks=4, grad_sync=True))
    before = layout._groups.cache_info().currsize
    res = simulate(model, cluster, plan)
    assert res.step_time_s > 0 and res.details["grad_sync"]["reduce_s"] > 0
    assert layout._groups.cache_info().currsize == before  # no group of the world was enumerated
    topo = topology_for(cluster, cluster.profile())
    assert topo.world == 92160 and "_reference" not in topo.__dict__  # no graph was built
    assert len(topo._routes) < 1000  # routes of the representatives' flows only, on arrays
