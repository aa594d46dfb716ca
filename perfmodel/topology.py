"""The cluster's fabric in closed form: GPUs, NVSwitch, NICs, rail-optimized leaf/spine.

Links (directed, one per direction) have integer ids; per link: capacity (bytes/s, the nominal
rate x the profile's fabric efficiency), latency (s) and a class:
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

Symmetry: every node, rail and leaf is alike (only the last leaf of a rail may hold fewer
nodes), so a link's id, class, capacity and a route are arithmetic on GPU indices: nothing is
built per GPU, and a 100k-GPU cluster costs what a 1k-GPU one does. Link ids are laid out
as the reference graph (perfmodel.topology_graph) numbers its edges: NVLink 2r / 2r+1 per GPU r,
then per node its NICs' up/down pairs (and its GPUs' PCIe pairs with shared NICs), then one
up/down pair per leaf in the order of the leaves' names. Tests hold the two equal link by link.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from perfmodel.specs import ClusterSpec, ProfileSpec, SpecError

SWITCH_HOP_LATENCY_US = 0.5  # one extra switch traversal (spine / core), public switch specs ~0.3-0.6 us
UNLIMITED_Bps = 1e15
DEFAULT_FABRIC = (5.0, 1.0)  # latency_us, efficiency for a fabric the profile does not list


def fabric_params(profile: ProfileSpec, name: str) -> tuple[float, float]:
    """(latency_us, efficiency) of a fabric from the profile, or the default."""
    f = profile.fabrics.get(name)  # type: ignore[call-overload]
    return (f.latency_us, f.efficiency) if f is not None else DEFAULT_FABRIC


@dataclass(frozen=True)
class FabricParams:
    """What both fabric builders derive from (cluster, profile), checked once."""
    nodes: int
    gpus_per_node: int
    world: int
    domain: int
    nvlink_Bps: float
    nvlink_latency_us: float
    nic_Bps: float
    nic_latency_us: float
    nics: int
    rails: bool  # NIC i on rail i's leaves (rails and tiers > 1)
    nodes_per_leaf: int
    oversubscription: float
    spine_hop_us: float


def fabric_of(cluster: ClusterSpec, profile: ProfileSpec) -> FabricParams:
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
    intra_lat, intra_eff = fabric_params(profile, "nvlink" if fabric in ("nvswitch", "nvlink") else fabric)
    inter_lat, inter_eff = fabric_params(profile, "ib" if "ib" in profile.fabrics else "ethernet")
    if net.tiers == 1:
        per_leaf = n
    elif net.rails:
        per_leaf = net.leaf_ports
    else:
        per_leaf = max(1, net.leaf_ports // net.nics_per_node)
    return FabricParams(n, gpn, world, domain, intra_bw * 1e9 * intra_eff, intra_lat,
                        net.nic_Gbps / 8 * 1e9 * inter_eff, inter_lat, net.nics_per_node,
                        bool(net.rails and net.tiers > 1), per_leaf, net.oversubscription,
                        SWITCH_HOP_LATENCY_US * (2 if net.tiers == 3 else 1))


LINK_CLASSES = ("nvlink_up", "nvlink_down", "nic_up", "nic_down", "pcie_up", "pcie_down", "spine_up", "spine_down")


class _LinkAttr:
    """A read-only per-link-id sequence computed on demand (topo.cap_Bps[i], .latency_s[i], .cls[i])."""

    def __init__(self, topo: Topology, attr: int) -> None:
        self._topo, self._attr = topo, attr

    def __getitem__(self, link: int) -> Any:
        return self._topo.link_info(link)[self._attr]

    def __len__(self) -> int:
        return self._topo.n_links


@dataclass(eq=False)  # hashed by identity: collective costs are cached per topology object
class Topology:
    fab: FabricParams
    links_of_class: dict[str, int] = field(default_factory=dict)
    _routes: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f = self.fab
        self.world, self.gpus_per_node, self.domain_gpus = f.world, f.gpus_per_node, f.domain
        self.shared_nic = f.nics != f.gpus_per_node
        self.nvlink_base = 0
        self.net_base = 2 * f.world if f.domain > 1 else 0
        self.has_net = f.world // f.domain > 1
        self.node_links = (2 * f.nics + (2 * f.gpus_per_node if self.shared_nic else 0)) if self.has_net else 0
        self.spine_base = self.net_base + f.nodes * self.node_links
        # leaves: (rail, k) -> position in name order (the reference graph sorts the leaves' names)
        rails = f.nics if f.rails else 1
        per_rail = -(-f.nodes // f.nodes_per_leaf)
        names = sorted((f"leaf{r}.{k}", r, k) for r in range(rails) for k in range(per_rail))
        self._leaf_pos = {(r, k): i for i, (_, r, k) in enumerate(names)}
        self._leaf_rk = [(r, k) for _, r, k in names]
        self.has_spine = self.has_net and len(names) > 1
        self.n_links = self.spine_base + (2 * len(names) if self.has_spine else 0)
        counts = self.links_of_class
        if f.domain > 1:
            counts["nvlink_up"] = counts["nvlink_down"] = f.world
        if self.has_net:
            counts["nic_up"] = counts["nic_down"] = f.nodes * f.nics
            if self.shared_nic:
                counts["pcie_up"] = counts["pcie_down"] = f.world
            if self.has_spine:
                counts["spine_up"] = counts["spine_down"] = len(names)
        self._starts = [self.net_base, self.spine_base, self.n_links]
        self.cap_Bps, self.latency_s, self.cls = _LinkAttr(self, 0), _LinkAttr(self, 1), _LinkAttr(self, 2)

    @cached_property
    def translation_gpus(self) -> int:
        """The shift (in GPUs) that maps the fabric onto itself: whole NVLink domains and whole leaves
        of every rail (the world when one leaf holds every node)."""
        f = self.fab
        if not self.has_net:
            return f.domain
        if not self.has_spine:
            return f.world
        return math.lcm(f.domain, f.nodes_per_leaf * f.gpus_per_node)

    @cached_property
    def full_leaf_gpus(self) -> int:
        """GPUs below the first partly filled leaf: translations stay among identical leaves below it."""
        f = self.fab
        return f.world if not self.has_spine else f.nodes // f.nodes_per_leaf * f.nodes_per_leaf * f.gpus_per_node

    # ------------------------------------------------------------ closed-form facts of a GPU
    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def nic_of(self, rank: int) -> tuple[int, int]:
        """(node, NIC index) that carries the GPU's inter-node traffic."""
        node, j = divmod(rank, self.gpus_per_node)
        return node, (j * self.fab.nics // self.gpus_per_node if self.shared_nic else j)

    def leaf_of(self, rank: int) -> tuple[int, int]:
        """(rail, k): the leaf switch the GPU's NIC hangs off."""
        node, i = self.nic_of(rank)
        return (i if self.fab.rails else 0), node // self.fab.nodes_per_leaf

    def leaf_ports(self, rail: int, k: int) -> int:
        """NICs on leaf (rail, k): the last leaf of a rail may hold fewer nodes."""
        f = self.fab
        nodes = min(f.nodes, (k + 1) * f.nodes_per_leaf) - k * f.nodes_per_leaf
        return nodes * (1 if f.rails else f.nics)

    # ------------------------------------------------------------ links
    def link_info(self, link: int) -> tuple[float, float, str]:
        """(capacity B/s, latency s, class) of a link id."""
        f = self.fab
        if not 0 <= link < self.n_links:
            raise IndexError(link)
        up = link % 2 == 0
        region = bisect.bisect_right(self._starts, link)
        if region == 0:
            return f.nvlink_Bps, f.nvlink_latency_us / 2 * 1e-6, "nvlink_up" if up else "nvlink_down"
        if region == 1:
            off = (link - self.net_base) % self.node_links
            if off < 2 * f.nics:
                return f.nic_Bps, f.nic_latency_us / 2 * 1e-6, "nic_up" if up else "nic_down"
            return UNLIMITED_Bps, 0.0, "pcie_up" if up else "pcie_down"
        rail, k = self._leaf_rk[(link - self.spine_base) // 2]
        cap = self.leaf_ports(rail, k) * f.nic_Bps / f.oversubscription
        return cap, f.spine_hop_us / 2 * 1e-6, "spine_up" if up else "spine_down"

    def _nic_link(self, rank: int) -> int:
        node, i = self.nic_of(rank)
        return self.net_base + node * self.node_links + 2 * i

    def _pcie_link(self, rank: int) -> int:
        node, j = divmod(rank, self.gpus_per_node)
        return self.net_base + node * self.node_links + 2 * self.fab.nics + 2 * j

    def _spine_link(self, rank: int) -> int:
        return self.spine_base + 2 * self._leaf_pos[self.leaf_of(rank)]

    def route(self, src: int, dst: int) -> tuple[int, ...]:
        """Link ids from src to dst (cached)."""
        key = (src, dst)
        r = self._routes.get(key)
        if r is None:
            r = self._routes[key] = self._route(src, dst)
        return r

    def _route(self, src: int, dst: int) -> tuple[int, ...]:
        if src == dst:
            return ()
        d = self.domain_gpus
        if src // d == dst // d:
            return (2 * src, 2 * dst + 1)
        up = [self._nic_link(src)]
        down = [self._nic_link(dst) + 1]
        if self.shared_nic:
            up.insert(0, self._pcie_link(src))
            down.append(self._pcie_link(dst) + 1)
        if self.leaf_of(src) != self.leaf_of(dst):
            up += [self._spine_link(src), self._spine_link(dst) + 1]
        return tuple(up + down)

    # ------------------------------------------------------------ vectorized (many flows at once)
    def routes_array(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Routes of many flows as link ids, one row per flow in fixed hop slots [pcie_up | nvlink_up,
        nic_up, spine_up, spine_down, nic_down, pcie_down | nvlink_down], -1 where a hop is absent:
        a row's ids >= 0, in slot order, are `route(src, dst)`."""
        f, gpn, d = self.fab, self.gpus_per_node, self.domain_gpus
        out = np.full((len(src), 6), -1, dtype=np.int64)
        dom_s, dom_d = src // d, dst // d
        same = (dom_s == dom_d) & (src != dst)
        out[same, 0], out[same, 5] = 2 * src[same], 2 * dst[same] + 1
        net = dom_s != dom_d
        if not net.any():
            return out
        s, t = src[net], dst[net]
        node_s, j_s = np.divmod(s, gpn)
        node_d, j_d = np.divmod(t, gpn)
        nic_s = j_s * f.nics // gpn if self.shared_nic else j_s
        nic_d = j_d * f.nics // gpn if self.shared_nic else j_d
        rows = np.flatnonzero(net)
        out[rows, 1] = self.net_base + node_s * self.node_links + 2 * nic_s
        out[rows, 4] = self.net_base + node_d * self.node_links + 2 * nic_d + 1
        if self.shared_nic:
            out[rows, 0] = self.net_base + node_s * self.node_links + 2 * f.nics + 2 * j_s
            out[rows, 5] = self.net_base + node_d * self.node_links + 2 * f.nics + 2 * j_d + 1
        if self.has_spine:
            rail_s = nic_s if f.rails else np.zeros_like(nic_s)
            rail_d = nic_d if f.rails else np.zeros_like(nic_d)
            k_s, k_d = node_s // f.nodes_per_leaf, node_d // f.nodes_per_leaf
            cross = (rail_s != rail_d) | (k_s != k_d)
            table = self._leaf_table
            out[rows[cross], 2] = self.spine_base + 2 * table[rail_s[cross], k_s[cross]]
            out[rows[cross], 3] = self.spine_base + 2 * table[rail_d[cross], k_d[cross]] + 1
        return out

    @cached_property
    def _leaf_table(self) -> np.ndarray:
        rails = max(r for r, _ in self._leaf_rk) + 1
        table = np.zeros((rails, max(k for _, k in self._leaf_rk) + 1), dtype=np.int64)
        for (r, k), pos in self._leaf_pos.items():
            table[r, k] = pos
        return table

    def link_arrays(self, links: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(capacity B/s, latency s, class code: an index into LINK_CLASSES) of many link ids, as
        link_info gives them one by one."""
        f = self.fab
        kind = np.where(links < self.net_base, 0, np.where(links < self.spine_base, 1, 3))
        off = (links - self.net_base) % max(1, self.node_links)
        kind = np.where((kind == 1) & (off >= 2 * f.nics), 2, kind)  # pcie
        code = 2 * kind + links % 2
        cap = np.choose(kind, [f.nvlink_Bps, f.nic_Bps, UNLIMITED_Bps, 0.0]).astype(float)
        lat = np.choose(kind, [f.nvlink_latency_us / 2 * 1e-6, f.nic_latency_us / 2 * 1e-6, 0.0,
                               f.spine_hop_us / 2 * 1e-6]).astype(float)
        spine = kind == 3
        if spine.any():
            rk = np.array(self._leaf_rk, dtype=np.int64)[(links[spine] - self.spine_base) // 2]
            k = rk[:, 1]
            nodes = np.minimum(f.nodes, (k + 1) * f.nodes_per_leaf) - k * f.nodes_per_leaf
            cap[spine] = nodes * (1 if f.rails else f.nics) * f.nic_Bps / f.oversubscription
        return cap, lat, code

    def route_latency_s(self, route: tuple[int, ...]) -> float:
        return sum(self.latency_s[i] for i in route)

    # ------------------------------------------------------------ inspection (reference graph)
    @cached_property
    def _reference(self) -> Any:
        from perfmodel.topology_graph import build_graph_from

        return build_graph_from(self.fab)

    @property
    def graph(self) -> Any:
        """The fabric as a networkx graph (built on first use: O(GPUs); the model never needs it)."""
        return self._reference.graph

    def path(self, src: int, dst: int) -> list[str]:
        return self._reference.path(src, dst)

    def link(self, u: str, v: str) -> int:
        return self._reference.link(u, v)


def build_topology(cluster: ClusterSpec, profile: ProfileSpec) -> Topology:
    return Topology(fabric_of(cluster, profile))


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
