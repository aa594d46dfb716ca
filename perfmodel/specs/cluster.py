"""The cluster spec: GPUs per node, intra-node fabric, network (NICs, rails, fat-tree tiers)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from perfmodel.specs.base import PosFloat, PosInt, Strict
from perfmodel.specs.profile import ProfileSpec


class IntraNodeSpec(Strict):
    fabric: Literal["nvswitch", "nvlink", "pcie", "loopback"] = "nvswitch"
    bw_GBps: PosFloat | None = None  # per GPU per direction; default: the GPU profile's nvlink_bw_GBps
    domain_gpus: PosInt | None = None  # GPUs sharing one NVLink domain (NVL72: 72); default gpus_per_node


class NetworkSpec(Strict):
    nics_per_node: PosInt = 8
    nic_Gbps: PosFloat = 400.0
    rails: bool = True  # rail-optimized: NIC i of every node on the same leaf group
    tiers: Annotated[int, Field(ge=1, le=3)] = 2
    oversubscription: Annotated[float, Field(ge=1, le=64, allow_inf_nan=False)] = 1.0
    leaf_ports: PosInt = 64  # downlinks per leaf switch


class ClusterSpec(Strict):
    kind: Literal["cluster"] = "cluster"
    name: str = "cluster"
    source: str = ""
    gpu: str | ProfileSpec  # preset name, path, or inline profile
    nodes: PosInt
    gpus_per_node: PosInt
    intra_node: IntraNodeSpec = IntraNodeSpec()
    network: NetworkSpec = NetworkSpec()

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def profile(self) -> ProfileSpec:
        from perfmodel.specs import load_spec  # the loader needs every spec class: imported when called

        return self.gpu if isinstance(self.gpu, ProfileSpec) else load_spec(self.gpu, "profile")
