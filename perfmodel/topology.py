"""The cluster as a networkx graph: GPUs, NVSwitch, NICs, rail-optimized leaf/spine.

Nodes:  gpu<r>, nvs<d> (the NVSwitch of NVLink domain d), nic<n>.<i> (only when a node
        has fewer NICs than GPUs), leaf<rail>.<k>, spine.
Edges (directed, one per direction) carry a link id; per link: capacity (bytes/s, the
nominal rate x the profile's fabric efficiency), latency (s) and a class:
  nvlink_up / nvlink_down  GPU <-> NVSwitch, the per-GPU per-direction NVLink bandwidth
  pcie_up / pcie_down      GPU <-> shared NIC (unlimited; only with fewer NICs than GPUs)
  nic_up / nic_down        NIC <-> leaf, nic_Gbps / 8
  spine_up / spine_down    leaf <-> spine: the spine layer aggregated into one node
                           (ideal ECMP), capacity = the leaf's downlinks / oversubscription

Routes: inside an NVLink domain gpu -> nvs -> gpu; otherwise gpu -> NIC -> leaf [-> spine
-> leaf] -> NIC -> gpu. Rail-optimized: NIC i of every node hangs off rail i's leaves, so
same-rail traffic stays on one leaf (when both nodes share it) and cross-rail traffic
crosses the spine (documented assumption: no PXN relay over NVLink).
Tiers: 1 = one switch for all NICs; 2 = leaf/spine; 3 = as 2 plus one more hop latency.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from perfmodel.specs import ClusterSpec, ProfileSpec, SpecError

SWITCH_HOP_LATENCY_US = 0.5  # one extra switch traversal (spine / core), public switch specs ~0.3-0.6 us
UNLIMITED_Bps = 1e15
DEFAULT_FABRIC = (5.0, 1.0)  # latency_us, efficiency for a fabric the profile does not list


@dataclass(eq=False)  # hashed by identity: collective costs are cached per topology object
class Topology:
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


def _fabric(profile: ProfileSpec, name: str) -> tuple[float, float]:
    f = profile.fabrics.get(name)  # type: ignore[call-overload]
    return (f.latency_us, f.efficiency) if f is not None else DEFAULT_FABRIC


def build_topology(cluster: ClusterSpec, profile: ProfileSpec) -> Topology:
    n, gpn, net = cluster.nodes, cluster.gpus_per_node, cluster.network
    world = n * gpn
    domain = cluster.intra_node.domain_gpus or gpn
    if world % domain:
        raise SpecError(f"cluster.intra_node.domain_gpus: {domain} does not divide the world size {world}")
    fabric = cluster.intra_node.fabric
    intra_bw = cluster.intra_node.bw_GBps or profile.nvlink_bw_GBps
    if intra_bw <= 0 and domain > 1:
        raise SpecError(f"cluster {cluster.name}: intra_node.bw_GBps is missing and profile "
                        f"{profile.name} has no nvlink_bw_GBps; set one of them (> 0)")
    intra_lat, intra_eff = _fabric(profile, "nvlink" if fabric in ("nvswitch", "nvlink") else fabric)
    inter_name = "ib" if "ib" in profile.fabrics else "ethernet"
    inter_lat, inter_eff = _fabric(profile, inter_name)
    g = nx.DiGraph()
    topo = Topology(g, world, gpn, domain)
    uplink: dict[str, str] = {}
    g.graph["uplink"] = uplink

    def add(u: str, v: str, cap: float, lat_us: float, cls: str) -> None:
        g.add_edge(u, v, id=len(topo.cap_Bps), cls=cls)
        topo.cap_Bps.append(cap)
        topo.latency_s.append(lat_us * 1e-6)
        topo.cls.append(cls)
        topo.links_of_class[cls] = topo.links_of_class.get(cls, 0) + 1

    if domain > 1:
        cap = intra_bw * 1e9 * intra_eff
        for r in range(world):
            add(f"gpu{r}", f"nvs{r // domain}", cap, intra_lat / 2, "nvlink_up")
            add(f"nvs{r // domain}", f"gpu{r}", cap, intra_lat / 2, "nvlink_down")
    if world // domain > 1:
        nic_cap = net.nic_Gbps / 8 * 1e9 * inter_eff
        nics = net.nics_per_node
        if net.tiers == 1:
            per_leaf = n
        elif net.rails:
            per_leaf = net.leaf_ports
        else:
            per_leaf = max(1, net.leaf_ports // nics)
        leaf_down: dict[str, int] = {}
        for node in range(n):
            for i in range(nics):
                rail = i if (net.rails and net.tiers > 1) else 0
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
            hop = SWITCH_HOP_LATENCY_US * (2 if net.tiers == 3 else 1)
            for leaf, ports in sorted(leaf_down.items()):
                cap = ports * nic_cap / net.oversubscription
                add(leaf, "spine", cap, hop / 2, "spine_up")
                add("spine", leaf, cap, hop / 2, "spine_down")
    g.add_nodes_from(f"gpu{r}" for r in range(world))
    return topo


_CACHE: dict[str, Topology] = {}


def topology_for(cluster: ClusterSpec, profile: ProfileSpec) -> Topology:
    """The cluster's topology, built once per (cluster, profile)."""
    key = cluster.model_dump_json() + "|" + profile.model_dump_json()
    topo = _CACHE.get(key)
    if topo is None:
        if len(_CACHE) > 32:
            _CACHE.clear()
        topo = _CACHE[key] = build_topology(cluster, profile)
    return topo
