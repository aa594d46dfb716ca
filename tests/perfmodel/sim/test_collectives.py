import pytest
import simpy

from perfmodel.sim.collectives import bytes_sent, collective_cost, expand
from perfmodel.sim.fluid import FluidNet
from perfmodel.sim.topology import build_topology
from perfmodel.specs import ClusterSpec


def _topo(nodes=2, gpn=8):
    c = ClusterSpec(gpu="h100-sxm", nodes=nodes, gpus_per_node=gpn, network=dict(nics_per_node=gpn))
    return build_topology(c, c.profile())


def test_single_flow_on_idle_link_is_bytes_over_bw_plus_latency():
    env = simpy.Environment()
    net = FluidNet(env, {"l": 10e9})
    proc = env.process(net.run_job(5e9, ["l"], latency_s=2e-6))
    env.run(proc)
    assert env.now == pytest.approx(0.5 + 2e-6)


def test_two_flows_sharing_a_link_take_twice_as_long():
    env = simpy.Environment()
    net = FluidNet(env, {"l": 10e9})
    a, b = net.submit(5e9, ["l"]), net.submit(5e9, ["l"])
    env.run()
    assert a.done.triggered and b.done.triggered and env.now == pytest.approx(1.0)


def test_max_min_fairness_and_release():
    # a: links x,y ; b: x ; c: y (y has half capacity) -> a limited on y, b takes the rest of x
    env = simpy.Environment()
    net = FluidNet(env, {"x": 2.0, "y": 1.0})
    a, b, c = net.submit(1.0, ["x", "y"]), net.submit(10.0, ["x"]), net.submit(1.0, ["y"])
    assert (a.rate, b.rate, c.rate) == (0.5, 1.5, 0.5)
    env.run()
    # a and c end at t=2; b ran 1.5/s for 2 s (3 units) then 2/s for the remaining 7
    assert env.now == pytest.approx(2 + 7 / 2)


def test_latency_only_job_and_compute_slowdown():
    env = simpy.Environment()
    net = FluidNet(env, {"compute": 1.0, "l": 1.0}, slowdown=1.0, slowed=frozenset({"compute"}))
    c = net.submit(1.0, ["compute"], kind="compute")
    net.submit(0.5, ["l"], kind="comm")  # runs 0.5 s, halves compute meanwhile
    env.run()
    assert c.done.triggered and env.now == pytest.approx(0.5 + 0.75)


def test_single_flow_through_topology_is_bytes_over_bw_plus_latency():
    t = _topo()
    cost = collective_cost(t, "send_recv", (0, 1))
    link = t.route(0, 1)[0]
    assert cost.time_s(1e9) == pytest.approx(1e9 / t.cap_Bps[link] + t.route_latency_s(t.route(0, 1)))
    assert cost.link_class == "nvlink"


@pytest.mark.parametrize("n", [2, 4, 8])
def test_ring_all_reduce_moves_2_n_minus_1_over_n(n):
    t = _topo()
    algo, phases = expand("all_reduce", tuple(range(n)), t)
    assert algo == "ring"
    assert bytes_sent(phases, 0) == pytest.approx(2 * (n - 1) / n)
    _, rs = expand("reduce_scatter", tuple(range(n)), t)
    assert bytes_sent(rs, 1) == pytest.approx((n - 1) / n)
    # on an idle NVSwitch each ring hop is one flow per port: time = bytes / port bandwidth
    c = collective_cost(t, "all_reduce", tuple(range(n)))
    assert c.s_per_byte == pytest.approx(2 * (n - 1) / n / t.cap_Bps[t.route(0, 1)[0]])


def test_hierarchical_and_all_to_all_split():
    t = _topo(nodes=2)
    algo, phases = expand("reduce_scatter", tuple(range(16)), t)
    assert algo == "hierarchical" and len(phases) == 2
    # NVLink reduce-scatter over 8, then the rail ring over 2 nodes on 1/8 of the data
    assert bytes_sent(phases, 0) == pytest.approx(7 / 8 + 1 / 2 / 8)
    algo, (ph,) = expand("all_to_all", tuple(range(16)), t, imbalance=2.0)
    assert algo == "pairwise" and len(ph.flows) == 16 * 15
    assert bytes_sent([ph], 0) == pytest.approx(2 * 15 / 16)  # the hot rank
    assert bytes_sent([ph], 1) == pytest.approx(14 / 16 + 2 / 16)
    inter = [f for f in ph.flows if f.src // 8 != f.dst // 8]
    assert len(inter) == 2 * 8 * 8
    # the inter-node half bounds the all-to-all: NICs are slower than NVLink
    assert collective_cost(t, "all_to_all", tuple(range(16))).link_class == "nic"


def test_concurrent_groups_share_the_spine():
    c = ClusterSpec(gpu="h100-sxm", nodes=4, gpus_per_node=1,
                    network=dict(nics_per_node=1, rails=False, leaf_ports=2, oversubscription=2))
    t = build_topology(c, c.profile())
    alone = collective_cost(t, "send_recv", (0, 2), n_groups=1)
    # 4 concurrent pairs (every node sends to the other leaf): 2 flows per 2:1-oversubscribed uplink
    four = collective_cost(t, "send_recv", (0, 2), n_groups=4)
    assert alone.link_class == "nic" and four.link_class == "spine"
    assert four.s_per_byte == pytest.approx(2 * alone.s_per_byte)


def test_distinct_nodes_per_token():
    from perfmodel.sim.collectives import distinct_nodes_per_token

    assert distinct_nodes_per_token(1, 8) == pytest.approx(1.0)
    assert distinct_nodes_per_token(8, 8) == pytest.approx(8 * (1 - (7 / 8) ** 8))  # 5.25 of 8 nodes
    # DeepSeek-V3: 8 groups (a node each), a token's experts from its best 4: at most 4 nodes
    assert distinct_nodes_per_token(8, 8, 8, 4) == pytest.approx(4 * (1 - 0.75 ** 8))
    assert distinct_nodes_per_token(8, 8, 8, 4) <= 4
    # 4 groups over 8 nodes: a group spans 2 nodes, 2 groups -> 4 eligible nodes
    assert distinct_nodes_per_token(6, 8, 4, 2) == pytest.approx(4 * (1 - 0.75 ** 6))


def test_deepep_sends_each_token_once_per_node_over_the_network():
    t = _topo(nodes=4)
    g = tuple(range(32))
    routing = (8, 4, 2)  # top-8 from 2 of 4 groups: each group is one node here
    algo, (ph,) = expand("all_to_all", g, t, routing=routing)
    assert algo == "deepep"
    inter = sum(f.bytes for f in ph.flows if f.src == 5 and f.src // 8 != f.dst // 8)
    intra = sum(f.bytes for f in ph.flows if f.src == 5 and f.src // 8 == f.dst // 8)
    # expected remote nodes per token / top_k of the payload crosses the network, all to rank 5's rail peers
    remote = 2 * (1 - 0.5 ** 8) * 3 / 4
    assert inter == pytest.approx(remote / 8)
    assert {f.dst % 8 for f in ph.flows if f.src == 5 and f.src // 8 != f.dst // 8} == {5}
    assert intra == pytest.approx(7 / 8)
    flat = collective_cost(t, "all_to_all", g)
    dedup = collective_cost(t, "all_to_all", g, routing=routing)
    assert dedup.s_per_byte < 0.5 * flat.s_per_byte  # 1.1 vs 6 of 8 copies per token on the NICs
    # without group-limited routing the network still carries one copy per node, not per expert
    assert collective_cost(t, "all_to_all", g, routing=(8, 1, 0)).s_per_byte < flat.s_per_byte
    # a group inside one node has nothing to deduplicate: the plain pairwise exchange
    assert expand("all_to_all", tuple(range(8)), t, routing=routing)[0] == "pairwise"
