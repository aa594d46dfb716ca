"""The study spec: a model, a cluster, fixed plans, a search space, variants, references."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from perfmodel.specs.base import PosInt, Strict
from perfmodel.specs.cluster import ClusterSpec
from perfmodel.specs.model import ModelSpec
from perfmodel.specs.plan import PlanSpec
from perfmodel.specs.profile import ProfileSpec


class SearchSpace(Strict):
    """Candidate values per plan field; every combination is a candidate plan."""

    tp: list[PosInt] = [1]
    sp: list[PosInt] = [1]
    ep: list[PosInt] = [1]
    etp: list[PosInt] = [1]
    pp: list[PosInt] = [1]
    vpp: list[PosInt] = [1]
    micro_batch: list[PosInt] = [1]
    recompute: list[Literal["none", "selective", "full"]] = ["none"]
    inter_op: list[bool] = [False]
    intra_op: list[Literal["none", "chunk", "tile"]] = ["none"]
    chunks: list[Annotated[int, Field(ge=1, le=256)]] = [4]
    dispatch: list[Literal["bf16", "fp8"]] = ["bf16"]
    combine: list[Literal["bf16", "fp8"]] = ["bf16"]
    grad_sync: list[Literal["fp32", "bf16"]] = ["fp32"]
    distributed_optimizer: list[bool] = [True]
    rank_order: list[tuple[Literal["tp", "sp", "dp", "pp"], ...]] = [("tp", "sp", "dp", "pp")]
    # a schedule is a candidate only with a vpp it fits: 1f1b vpp=1, interleaved vpp>1, the V-shape
    # schedules (zero-bubble, dualpipev) vpp=2; other pairings are dropped as no-effect duplicates
    schedule: list[Literal["1f1b", "interleaved", "zero-bubble", "dualpipev"]] = ["1f1b", "interleaved"]
    precision: list[Literal["bf16", "fp8"]] = ["bf16"]
    fp8_recipe: list[Literal["tensorwise", "blockwise"]] = ["tensorwise"]  # only with precision fp8
    dispatcher: list[Literal["alltoall", "deepep"]] = ["alltoall"]  # only with ep > 1


class NamedPlan(PlanSpec):
    calibrate: bool = False  # compare: fit the profile on this plan's traces


class Variant(Strict):
    """A what-if: deep-merged overrides of the study's cluster (and/or model)."""

    name: str
    cluster: dict[str, Any] = {}
    model: dict[str, Any] = {}


class StudySpec(Strict):
    kind: Literal["study"] = "study"
    name: str = "study"
    description: str = ""
    model: str | ModelSpec
    cluster: str | ClusterSpec
    profile: str | ProfileSpec | None = None  # default: the cluster's GPU preset
    global_batch: PosInt | None = None  # overrides every plan's global_batch
    baseline: str | None = None  # name of a fixed plan
    plans: list[NamedPlan] = []
    search: SearchSpace | None = None
    variants: list[Variant] = []
    reference: dict[str, float] = {}  # published figures, e.g. tokens_per_s.<plan>, speedup
    world_size: PosInt | None = None  # runtime studies: ranks to launch (default the cluster's)

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        names = [p.name for p in self.plans]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"plan names must be unique, repeated: {sorted(dup)}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the plans {names}")
        if not self.plans and self.search is None:
            raise ValueError("a study needs plans: or search:")
        return self
