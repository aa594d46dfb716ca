"""The plan space of a study's `search:` block: every combination, in a fixed order.

Combinations that differ only in a field with no effect are merged into one candidate
(chunks without intra-op overlap; dispatch/combine precision and the dispatcher without expert parallelism; the FP8
recipe of a bf16 plan; a schedule that does not fit the vpp). Where pp*vpp does not divide the
model's layers, every distinct pipeline layout of the balanced split is a candidate (the
embedding and/or the loss counted as a layer on the first/last stage: perfmodel.pplayout);
a combination that is not a plan at all (vpp>1 without pp>1, a rank_order that is not a
permutation) becomes a reason string so the search can report it as invalid.
"""

from __future__ import annotations

import itertools
from typing import Any

from perfmodel.specs import (
    PARALLEL_DIMS,
    CompressionSpec,
    OverlapSpec,
    PipelineLayoutSpec,
    PlanSpec,
    SearchSpace,
    SpecError,
)

SPACE_FIELDS = tuple(SearchSpace.model_fields)


def plan_name(p: PlanSpec) -> str:
    """A short, unique, readable name for a searched plan."""
    ov = p.overlap
    lay = p.pp_layout
    tag = "" if lay is None else "L" + ("e" if lay.account_for_embedding else "") + ("l" if lay.account_for_loss else "")
    sched = {"1f1b": "", "interleaved": "", "zero-bubble": "zbv", "dualpipev": "dpv"}[p.schedule]
    prec = "" if p.precision == "bf16" else {"tensorwise": "_fp8t", "blockwise": "_fp8b"}[p.fp8_recipe]
    prec += "_deepep" if p.dispatcher == "deepep" else ""
    parts = [f"tp{p.tp}sp{p.sp}ep{p.ep}etp{p.etp}pp{p.pp}" + (f"v{p.vpp}" if p.vpp > 1 else "") + sched + tag + prec,
             f"mb{p.micro_batch}", {"none": "rc0", "selective": "rcsel", "full": "rcfull"}[p.recompute],
             ("io" if ov.inter_op else "") + (f"{ov.intra_op}{ov.chunks}" if ov.intra_op != "none" else "")
             or "noov", f"{p.compression.dispatch}-{p.compression.combine}-g{p.compression.grad_sync}",
             "do" if p.distributed_optimizer else "nodo", "".join(d[0] for d in p.rank_order)]
    return "_".join(parts)


def _canonical(values: dict[str, Any]) -> dict[str, Any]:
    v = dict(values)
    if v["intra_op"] == "none":
        v["chunks"] = OVERLAP_DEFAULT_CHUNKS
    if v["ep"] == 1:
        v["dispatch"] = v["combine"] = "bf16"
        v["dispatcher"] = "alltoall"
    if v["precision"] == "bf16":
        v["fp8_recipe"] = "tensorwise"
    if v["vpp"] > 1 and v["pp"] == 1:  # not a plan under any schedule: one reason, not one per schedule
        v["schedule"] = "interleaved"
    return v


def _fits_vpp(schedule: str, vpp: int) -> bool:
    return {"1f1b": vpp == 1, "interleaved": vpp > 1, "zero-bubble": vpp == 2, "dualpipev": vpp == 2}[schedule]


def layouts_for(layers: int | None, pp: int, vpp: int) -> list[PipelineLayoutSpec | None]:
    """None (the even split) where pp*vpp divides the layers; else each distinct balanced layout."""
    if layers is None or pp == 1 or layers % (pp * vpp) == 0:
        return [None]
    from perfmodel.pplayout import default_split

    out: dict[tuple[int, ...], PipelineLayoutSpec] = {}
    for emb, loss in ((False, False), (True, False), (False, True), (True, True)):
        try:
            counts = tuple(default_split(layers, pp * vpp, emb, loss))
        except SpecError:
            continue
        out.setdefault(counts, PipelineLayoutSpec(account_for_embedding=emb, account_for_loss=loss))
    return list(out.values()) or [None]


OVERLAP_DEFAULT_CHUNKS = 4


def space_size(space: SearchSpace) -> int:
    n = 1
    for f in SPACE_FIELDS:
        n *= len(getattr(space, f))
    return n


_SUBSPECS: dict[tuple, Any] = {}


def _sub(cls: type, **kw: Any) -> Any:
    key = (cls.__name__, *sorted(kw.items()))
    if key not in _SUBSPECS:
        _SUBSPECS[key] = cls(**kw)
    return _SUBSPECS[key]


def make_plan(v: dict[str, Any], global_batch: int, layout: PipelineLayoutSpec | None = None) -> PlanSpec:
    """A plan from one combination. SearchSpace already validated every value; only the
    cross-field rule (rank_order is a permutation) is left, so skip pydantic's per-plan cost."""
    order = tuple(v["rank_order"])
    if sorted(order) != sorted(PARALLEL_DIMS):
        raise SpecError(f"plan.rank_order: must be a permutation of {list(PARALLEL_DIMS)}, got {list(order)}")
    plan = PlanSpec.model_construct(
        tp=v["tp"], sp=v["sp"], ep=v["ep"], etp=v["etp"], pp=v["pp"], vpp=v["vpp"],
        micro_batch=v["micro_batch"], global_batch=global_batch,
        schedule=v["schedule"], recompute=v["recompute"], precision=v["precision"], fp8_recipe=v["fp8_recipe"],
        dispatcher=v["dispatcher"], pp_layout=layout,
        overlap=_sub(OverlapSpec, inter_op=v["inter_op"], intra_op=v["intra_op"], chunks=v["chunks"]),
        compression=_sub(CompressionSpec, dispatch=v["dispatch"], combine=v["combine"], grad_sync=v["grad_sync"]),
        distributed_optimizer=v["distributed_optimizer"], rank_order=order)
    object.__setattr__(plan, "name", plan_name(plan))  # frozen model: set the derived name once
    return plan


def enumerate_space(space: SearchSpace, global_batch: int,
                    layers: int | None = None) -> tuple[list[PlanSpec | str], int]:
    """Every distinct combination, in a fixed order: a PlanSpec, or a reason string when the
    combination is not a plan at all. `layers` (the model's) expands the pipeline layouts where
    the stages do not divide them. Returns (candidates, merged duplicates)."""
    seen: set[tuple] = set()
    out: list[PlanSpec | str] = []
    merged = 0
    lists = [getattr(space, f) for f in SPACE_FIELDS]
    for combo in itertools.product(*lists):
        v = _canonical(dict(zip(SPACE_FIELDS, combo, strict=True)))
        key = tuple(tuple(x) if isinstance(x, list) else x for x in v.values())
        if key in seen or not _fits_vpp(v["schedule"], v["vpp"]):
            merged += 1
            continue
        seen.add(key)
        if v["vpp"] > 1 and v["pp"] == 1:
            out.append(f"plan.vpp: {v['vpp']} needs pp>1 (interleaving splits pipeline stages)")
            continue
        for layout in layouts_for(layers, v["pp"], v["vpp"]):
            try:
                out.append(make_plan(v, global_batch, layout))
            except SpecError as exc:
                out.append(str(exc))
    return out, merged


