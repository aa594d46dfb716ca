import pytest

from perfmodel.sim.topology import build_topology, topology_for
from perfmodel.specs import ClusterSpec, SpecError, load_spec


def _cluster(nodes=4, gpn=8, **net):
    return ClusterSpec(gpu="h100-sxm", nodes=nodes, gpus_per_node=gpn,
                       network=dict(nics_per_node=gpn, nic_Gbps=400, **net))


def _topo(c):
    return build_topology(c, c.profile())


def test_routes_follow_graph_edges_and_classes():
    t = _topo(_cluster(nodes=4, leaf_ports=2))
    for src, dst in [(0, 5), (0, 8), (0, 9), (3, 31), (9, 17)]:
        path = t.path(src, dst)
        assert all(t.graph.has_edge(path[i], path[i + 1]) for i in range(len(path) - 1))
    cls = lambda s, d: [t.cls[i] for i in t.route(s, d)]  # noqa: E731
    assert cls(0, 5) == ["nvlink_up", "nvlink_down"]  # same node: NVSwitch
    assert cls(0, 8) == ["nic_up", "nic_down"]  # same rail, same leaf
    assert cls(0, 9) == ["nic_up", "spine_up", "spine_down", "nic_down"]  # cross-rail: via spine
    assert cls(0, 16) == ["nic_up", "spine_up", "spine_down", "nic_down"]  # same rail, other leaf
    assert t.route(0, 0) == ()


def test_capacities_and_oversubscription():
    p = load_spec("h100-sxm", "profile")
    t = _topo(_cluster(nodes=4, leaf_ports=2, oversubscription=2))
    nv = t.route(0, 1)[0]
    assert t.cap_Bps[nv] == pytest.approx(450e9 * p.fabrics["nvlink"].efficiency)
    up = t.route(0, 16)
    assert t.cap_Bps[up[0]] == pytest.approx(50e9 * p.fabrics["ib"].efficiency)
    assert t.cap_Bps[up[1]] == pytest.approx(2 * 50e9 * p.fabrics["ib"].efficiency / 2)  # 2 ports / 2
    assert t.route_latency_s(t.route(0, 1)) == pytest.approx(p.fabrics["nvlink"].latency_us * 1e-6)
    assert t.links_of_class["nvlink_up"] == 32 and t.links_of_class["nic_up"] == 32


def test_single_node_has_no_network_and_cache_reuses():
    c = _cluster(nodes=1)
    t = topology_for(c, c.profile())
    assert "nic_up" not in t.links_of_class
    assert topology_for(c, c.profile()) is t


def test_fewer_nics_than_gpus_share_a_nic():
    c = ClusterSpec(gpu="h100-sxm", nodes=2, gpus_per_node=8, network=dict(nics_per_node=2))
    t = _topo(c)
    assert [t.cls[i] for i in t.route(0, 8)] == ["pcie_up", "nic_up", "nic_down", "pcie_down"]
    assert t.route(0, 8)[1] == t.route(3, 11)[1]  # GPUs 0..3 share NIC 0


def test_missing_intra_bandwidth_is_a_spec_error():
    cpu = load_spec("cpu", "profile")
    c = ClusterSpec(gpu=cpu, nodes=1, gpus_per_node=4)
    with pytest.raises(SpecError, match="bw_GBps"):
        build_topology(c, cpu)


def test_megascale_cluster_builds():
    c = load_spec("megascale-1440", "cluster")
    t = topology_for(c, c.profile())
    assert t.world == 1440 and t.links_of_class["nic_up"] == 1440
    assert [t.cls[i] for i in t.route(0, 8 * 100)] == ["nic_up", "spine_up", "spine_down", "nic_down"]
