"""The plan spec, the contract between simulator and runtime: parallelism, schedule, layout,
precision, dispatcher, overlap, compression."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from perfmodel.specs.base import NonNegInt, PosInt, SpecError, Strict
from perfmodel.specs.profile import ProfileSpec


class OverlapSpec(Strict):
    inter_op: bool = False  # reorder independent ops so comm hides under compute; dgrad/wgrad split
    intra_op: Literal["none", "chunk", "tile"] = "none"
    chunks: Annotated[int, Field(ge=1, le=256)] = 4  # token chunks (chunk) or tiles in flight (tile)
    grad_sync: bool = True  # DP gradient sync overlapped with backward


class CompressionSpec(Strict):
    dispatch: Literal["bf16", "fp8"] = "bf16"
    combine: Literal["bf16", "fp8"] = "bf16"
    grad_sync: Literal["fp32", "bf16"] = "fp32"


PARALLEL_DIMS = ("tp", "sp", "dp", "pp")
SCHEDULES = ("1f1b", "interleaved", "zero-bubble", "dualpipev")


class PipelineLayoutSpec(Strict):
    """Layers per virtual pipeline stage (perfmodel/specs/pplayout.py resolves and checks it).

    `stages`: decoder layers of each virtual stage in pipeline order (pp*vpp entries); omitted:
    the default split, where the two flags count the embedding / the loss as one layer's worth of
    work on the first / last stage (Megatron-Core's account_for_*_in_pipeline_split). A plan may
    also give a Megatron-Core `--pipeline-model-parallel-layout` string or a plain list of counts.
    """

    stages: tuple[NonNegInt, ...] | None = None
    account_for_embedding: bool = False
    account_for_loss: bool = False


class PlanSpec(Strict):
    kind: Literal["plan"] = "plan"
    name: str = "plan"
    tp: PosInt = 1
    sp: PosInt = 1
    ep: PosInt = 1
    etp: PosInt = 1
    pp: PosInt = 1
    vpp: PosInt = 1
    dp: PosInt | None = None  # derived from the world size if omitted
    micro_batch: PosInt = 1  # sequences per micro-batch per data-parallel replica
    global_batch: PosInt = 8  # sequences per iteration
    # 1f1b (vpp=1), interleaved (vpp>1), zero-bubble (ZB-V) and dualpipev: V-shape, vpp=2
    schedule: Literal["1f1b", "interleaved", "zero-bubble", "dualpipev"] = "1f1b"
    pp_layout: PipelineLayoutSpec | None = None  # default: even split, else balanced (pplayout.py)
    # fp8: the linear layers of attention, experts and dense FFNs run FP8 GEMMs (fwd, dgrad, wgrad)
    precision: Literal["bf16", "fp8"] = "bf16"
    # token dispatcher of expert parallelism: alltoall sends every (token, expert) copy to its GPU
    # (Megatron-Core's alltoall dispatcher); deepep sends a token once per destination node over the
    # network, to the GPU of the same local index, which forwards it over NVLink (DeepEP, DeepSeek-V3
    # s.3.2.2; Megatron-Core's flex dispatcher); simulator only
    dispatcher: Literal["alltoall", "deepep"] = "alltoall"
    # tensorwise: per-tensor current scaling (Transformer Engine's default); blockwise: DeepSeek-V3's
    # 1x128 activation tiles and 128x128 weight blocks
    fp8_recipe: Literal["tensorwise", "blockwise"] = "tensorwise"
    recompute: Literal["none", "selective", "full"] = "none"
    overlap: OverlapSpec = OverlapSpec()
    compression: CompressionSpec = CompressionSpec()
    distributed_optimizer: bool = True
    # innermost first: Megatron's order puts tp (then sp) on neighbouring ranks of one node
    rank_order: tuple[Literal["tp", "sp", "dp", "pp"], ...] = ("tp", "sp", "dp", "pp")
    kernels: Literal["torch", "triton"] = "torch"  # runtime only

    @model_validator(mode="after")
    def _check(self) -> PlanSpec:
        if sorted(self.rank_order) != sorted(PARALLEL_DIMS):
            raise ValueError(f"rank_order must be a permutation of {list(PARALLEL_DIMS)}")
        if self.schedule == "1f1b" and self.vpp != 1:
            raise ValueError(f"vpp={self.vpp} needs schedule: interleaved (1f1b runs one stage per rank)")
        if self.schedule == "interleaved" and self.vpp == 1 and self.pp > 1:
            raise ValueError("schedule: interleaved needs vpp>1 (virtual stages per rank); use 1f1b for vpp=1")
        if self.schedule in ("zero-bubble", "dualpipev") and self.vpp != 2:
            raise ValueError(f"schedule: {self.schedule} is a V-shape schedule and needs vpp=2 (two stages per "
                             f"rank), got vpp={self.vpp}")
        return self

    @field_validator("pp_layout", mode="before")
    @classmethod
    def _layout(cls, v: Any) -> Any:
        if isinstance(v, str):
            from perfmodel.specs.pplayout import parse_megatron

            return parse_megatron(v)
        if isinstance(v, (list, tuple)):
            return {"stages": v}
        return v




def check_precision(plan: PlanSpec, profile: ProfileSpec) -> None:
    """An FP8 plan needs a profile with an fp8 peak (SpecError naming the field otherwise)."""
    if plan.precision == "fp8" and "fp8" not in profile.peak_tflops:
        raise SpecError(f"plan.precision: fp8 needs an fp8 peak, but profile {profile.name} has no "
                        f"peak_tflops.fp8; add it or use precision: bf16")
