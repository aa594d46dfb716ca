"""The reference fabric: the cluster as a networkx graph (GPUs, NVSwitch, NICs, rail-optimized leaf/spine).

perfmodel.sim.topology computes the same links (same ids, capacities, latencies, classes) and routes in
closed form from a GPU's index; this graph is the general construction it is tested against
(tests/perfmodel/sim/test_topology_symmetry.py) and what `Topology.graph` shows for inspection.

Nodes:  gpu<r>, nvs<d> (the NVSwitch of NVLink domain d), nic<n>.<i> (only when a node
        has fewer NICs than GPUs), leaf<rail>.<k>, spine. Edges carry the link id; link classes,
        routes and tiers as perfmodel.sim.topology documents them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from perfmodel.sim.topology import FabricParams, UNLIMITED_Bps, fabric_of
from perfmodel.specs import ClusterSpec, ProfileSpec


@dataclass(eq=False)  # hashed by identity: collective costs are cached per topology object
class GraphTopology:
    graph: nx.DiGraph
    world: int
    gpus_per_node: int
    domain_gpus: int
    cap_Bps: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    cls: list[str] = field(default_factory=list)
    links_of_class: dict[str, int] = field(default_factory=dict)
    _routes: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)

    def link(self, u: str, v: str) -> int:
        return self.graph.edges[u, v]["id"]

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def path(self, src: int, dst: int) -> list[str]:
        """Graph nodes from GPU src to GPU dst along the route."""
        if src == dst:
            return [f"gpu{src}"]
        g = self.graph
        if src // self.domain_gpus == dst // self.domain_gpus:
            return [f"gpu{src}", f"nvs{src // self.domain_gpus}", f"gpu{dst}"]
        up = [f"gpu{src}"]
        while not up[-1].startswith("leaf"):
            up.append(g.graph["uplink"][up[-1]])
        down = [f"gpu{dst}"]
        while not down[-1].startswith("leaf"):
            down.append(g.graph["uplink"][down[-1]])
        if up[-1] == down[-1]:
            return up + down[-2::-1]
        return up + ["spine"] + down[::-1]

    def route(self, src: int, dst: int) -> tuple[int, ...]:
        """Link ids from src to dst (cached)."""
        key = (src, dst)
        r = self._routes.get(key)
        if r is None:
            p = self.path(src, dst)
            r = self._routes[key] = tuple(self.link(p[i], p[i + 1]) for i in range(len(p) - 1))
        return r

    def route_latency_s(self, route: tuple[int, ...]) -> float:
        return sum(self.latency_s[i] for i in route)


def build_graph_topology(cluster: ClusterSpec, profile: ProfileSpec) -> GraphTopology:
    return build_graph_from(fabric_of(cluster, profile))


def build_graph_from(fab: FabricParams) -> GraphTopology:
    n, gpn, world, domain = fab.nodes, fab.gpus_per_node, fab.world, fab.domain
    g = nx.DiGraph()
    topo = GraphTopology(g, world, gpn, domain)
    uplink: dict[str, str] = {}
    g.graph["uplink"] = uplink

    def add(u: str, v: str, cap: float, lat_us: float, cls: str) -> None:
        g.add_edge(u, v, id=len(topo.cap_Bps), cls=cls)
        topo.cap_Bps.append(cap)
        topo.latency_s.append(lat_us * 1e-6)
        topo.cls.append(cls)
        topo.links_of_class[cls] = topo.links_of_class.get(cls, 0) + 1

    if domain > 1:
        cap, intra_lat = fab.nvlink_Bps, fab.nvlink_latency_us
        for r in range(world):
            add(f"gpu{r}", f"nvs{r // domain}", cap, intra_lat / 2, "nvlink_up")
            add(f"nvs{r // domain}", f"gpu{r}", cap, intra_lat / 2, "nvlink_down")
    if world // domain > 1:
        nic_cap, inter_lat, nics, per_leaf = fab.nic_Bps, fab.nic_latency_us, fab.nics, fab.nodes_per_leaf
        leaf_down: dict[str, int] = {}
        for node in range(n):
            for i in range(nics):
                rail = i if fab.rails else 0
                leaf = f"leaf{rail}.{node // per_leaf}"
                nic = f"gpu{node * gpn + i}" if nics == gpn else f"nic{node}.{i}"
                add(nic, leaf, nic_cap, inter_lat / 2, "nic_up")
                add(leaf, nic, nic_cap, inter_lat / 2, "nic_down")
                uplink[nic] = leaf
                leaf_down[leaf] = leaf_down.get(leaf, 0) + 1
            if nics != gpn:
                for j in range(gpn):
                    gpu, nic = f"gpu{node * gpn + j}", f"nic{node}.{j * nics // gpn}"
                    add(gpu, nic, UNLIMITED_Bps, 0.0, "pcie_up")
                    add(nic, gpu, UNLIMITED_Bps, 0.0, "pcie_down")
                    uplink[gpu] = nic
        if len(leaf_down) > 1:
            hop = fab.spine_hop_us
            for leaf, ports in sorted(leaf_down.items()):
                cap = ports * nic_cap / fab.oversubscription
                add(leaf, "spine", cap, hop / 2, "spine_up")
                add("spine", leaf, cap, hop / 2, "spine_down")
    g.add_nodes_from(f"gpu{r}" for r in range(world))
    return topo
