"""The plan space of a study's `search:` block: every combination, in a fixed order.

Combinations that differ only in a field with no effect are merged into one candidate
(chunks without intra-op overlap; dispatch/combine precision without expert parallelism);
a combination that is not a plan at all (vpp>1 without pp>1, a rank_order that is not a
permutation) becomes a reason string so the search can report it as invalid.
"""

from __future__ import annotations

import itertools
from typing import Any

from perfmodel.specs import PARALLEL_DIMS, CompressionSpec, OverlapSpec, PlanSpec, SearchSpace, SpecError

SPACE_FIELDS = tuple(SearchSpace.model_fields)


def plan_name(p: PlanSpec) -> str:
    """A short, unique, readable name for a searched plan."""
    ov = p.overlap
    parts = [f"tp{p.tp}sp{p.sp}ep{p.ep}etp{p.etp}pp{p.pp}" + (f"v{p.vpp}" if p.vpp > 1 else ""),
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
    return v


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


def make_plan(v: dict[str, Any], global_batch: int) -> PlanSpec:
    """A plan from one combination. SearchSpace already validated every value; only the
    cross-field rule (rank_order is a permutation) is left, so skip pydantic's per-plan cost."""
    order = tuple(v["rank_order"])
    if sorted(order) != sorted(PARALLEL_DIMS):
        raise SpecError(f"plan.rank_order: must be a permutation of {list(PARALLEL_DIMS)}, got {list(order)}")
    plan = PlanSpec.model_construct(
        tp=v["tp"], sp=v["sp"], ep=v["ep"], etp=v["etp"], pp=v["pp"], vpp=v["vpp"],
        micro_batch=v["micro_batch"], global_batch=global_batch,
        schedule="interleaved" if v["vpp"] > 1 else "1f1b", recompute=v["recompute"],
        overlap=_sub(OverlapSpec, inter_op=v["inter_op"], intra_op=v["intra_op"], chunks=v["chunks"]),
        compression=_sub(CompressionSpec, dispatch=v["dispatch"], combine=v["combine"], grad_sync=v["grad_sync"]),
        distributed_optimizer=v["distributed_optimizer"], rank_order=order)
    object.__setattr__(plan, "name", plan_name(plan))  # frozen model: set the derived name once
    return plan


def enumerate_space(space: SearchSpace, global_batch: int) -> tuple[list[PlanSpec | str], int]:
    """Every distinct combination, in a fixed order: a PlanSpec, or a reason string when the
    combination is not a plan at all. Returns (candidates, merged duplicates)."""
    seen: set[tuple] = set()
    out: list[PlanSpec | str] = []
    merged = 0
    lists = [getattr(space, f) for f in SPACE_FIELDS]
    for combo in itertools.product(*lists):
        v = _canonical(dict(zip(SPACE_FIELDS, combo, strict=True)))
        key = tuple(tuple(x) if isinstance(x, list) else x for x in v.values())
        if key in seen:
            merged += 1
            continue
        seen.add(key)
        if v["vpp"] > 1 and v["pp"] == 1:
            out.append(f"plan.vpp: {v['vpp']} needs pp>1 (interleaving splits pipeline stages)")
            continue
        try:
            out.append(make_plan(v, global_batch))
        except SpecError as exc:
            out.append(str(exc))
    return out, merged


