"""A plan laid out on a world of ranks: derived sizes, validity, and the rank groups.

`rank_groups` is the one pure function that says which global ranks form each TP, SP, DP,
PP, EP, ETP and expert-DP group. The runtime builds its process groups from it and the
simulator places collectives on the topology with it, so the two can never disagree.

Attention view:  world = tp x sp x dp x pp, laid out innermost-first by `plan.rank_order`.
Expert view:     inside each pipeline stage, its tp*sp*dp ranks (ascending) are refolded as
                 etp (innermost) x ep x edp, as Megatron-Core's MoE parallel folding does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from perfmodel import pplayout
from perfmodel.specs import ModelSpec, PlanSpec, SpecError

MAX_SCHEDULE_CHUNKS = 1 << 16  # micro-batches x pp x vpp: far beyond real plans, bounded so no input hangs


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    sp: int
    dp: int
    pp: int
    vpp: int
    ep: int
    etp: int
    edp: int
    micro_batch: int
    microbatches: int  # per iteration per data-parallel replica
    layers_per_stage: int  # on the pipeline rank holding the most (uneven layouts)
    stages: pplayout.StageLayout  # the layers of every virtual stage and the rank it runs on

    @property
    def mp(self) -> int:
        """Ranks sharing one attention replica inside a stage (tp x sp)."""
        return self.tp * self.sp


def plan_layout(plan: PlanSpec, model: ModelSpec, world: int) -> Layout:
    """Derive dp/edp/microbatches and check every constraint; raise SpecError naming the one that fails."""
    tp, sp, pp, ep, etp = plan.tp, plan.sp, plan.pp, plan.ep, plan.etp
    if world % (tp * sp * pp):
        raise SpecError(f"plan: tp*sp*pp={tp * sp * pp} does not divide the world size {world}")
    dp = world // (tp * sp * pp)
    if plan.dp is not None and plan.dp != dp:
        raise SpecError(f"plan.dp: {plan.dp} but world {world} / (tp*sp*pp={tp * sp * pp}) = {dp}; drop dp or fix it")
    checks = [
        (model.heads % (tp * sp) == 0, f"plan.tp*sp: {tp * sp} does not divide model.heads={model.heads}"),
        (model.kv_heads % tp == 0 or tp % model.kv_heads == 0,
         f"plan.tp: {tp} and model.kv_heads={model.kv_heads} must divide one another"),
        (model.seq_len % (tp * sp) == 0, f"plan.tp*sp: {tp * sp} does not divide model.seq_len={model.seq_len}"),
        (model.hidden % tp == 0, f"plan.tp: {tp} does not divide model.hidden={model.hidden}"),
        ((dp * tp * sp) % (ep * etp) == 0,
         f"plan.ep*etp: {ep * etp} does not divide the ranks of a pipeline stage (dp*tp*sp={dp * tp * sp})"),
        (plan.global_batch % (plan.micro_batch * dp) == 0,
         f"plan.global_batch: {plan.global_batch} is not a multiple of micro_batch*dp={plan.micro_batch * dp}"),
    ]
    if model.dense_ffn_hidden and model.n_dense_layers:
        checks.append((model.dense_ffn_hidden % tp == 0,
                       f"plan.tp: {tp} does not divide model.dense_ffn_hidden={model.dense_ffn_hidden}"))
    if model.moe:
        checks.append((model.moe.experts % ep == 0, f"plan.ep: {ep} does not divide model.moe.experts={model.moe.experts}"))
        checks.append((model.moe.expert_ffn_hidden % etp == 0,
                       f"plan.etp: {etp} does not divide model.moe.expert_ffn_hidden={model.moe.expert_ffn_hidden}"))
    elif ep > 1 or etp > 1:
        checks.append((False, "plan.ep/etp: the model has no experts (moe:), set ep=etp=1"))
    for ok, msg in checks:
        if not ok:
            raise SpecError(msg)
    microbatches = plan.global_batch // (plan.micro_batch * dp)
    if microbatches * pp * plan.vpp > MAX_SCHEDULE_CHUNKS:  # the pipeline schedule is O(m * pp * vpp)
        raise SpecError(f"plan.global_batch: {microbatches} micro-batches per replica x pp*vpp={pp * plan.vpp} "
                        f"is more than {MAX_SCHEDULE_CHUNKS} scheduled chunks per step; raise micro_batch")
    if plan.schedule == "interleaved" and pp > 1 and microbatches % pp:
        raise SpecError(f"plan.schedule: interleaved needs microbatches ({microbatches}) to be a multiple of pp={pp}")
    if plan.schedule == "dualpipev" and microbatches < 2 * pp:
        raise SpecError(f"plan.schedule: dualpipev needs at least 2*pp={2 * pp} micro-batches per replica, "
                        f"got {microbatches}; raise global_batch or lower micro_batch")
    if plan.vpp > 1 and pp == 1:
        raise SpecError(f"plan.vpp: {plan.vpp} needs pp>1 (virtual stages split pipeline stages)")
    stages = pplayout.resolve(model.layers, plan)  # SpecError for a layout that misses or repeats a layer
    return Layout(world=world, tp=tp, sp=sp, dp=dp, pp=pp, vpp=plan.vpp, ep=ep, etp=etp,
                  edp=dp * tp * sp // (ep * etp), micro_batch=plan.micro_batch,
                  microbatches=microbatches, layers_per_stage=stages.max_layers_per_rank, stages=stages)


def _coords(rank: int, order: tuple[str, ...], sizes: dict[str, int]) -> dict[str, int]:
    out = {}
    for dim in order:
        out[dim] = rank % sizes[dim]
        rank //= sizes[dim]
    return out


def _sharing(coords: list[dict[str, int]], dims: list[str]) -> tuple[tuple[int, ...], ...]:
    """The ranks grouped by their coordinates on `dims` (each group spans the other dimensions)."""
    buckets: dict[tuple[int, ...], list[int]] = {}
    for r, c in enumerate(coords):
        buckets.setdefault(tuple(c[d] for d in dims), []).append(r)
    return tuple(sorted(tuple(b) for b in buckets.values()))


@lru_cache(maxsize=256)
def _groups(world: int, tp: int, sp: int, pp: int, ep: int, etp: int,
            order: tuple[str, ...]) -> dict[str, tuple[tuple[int, ...], ...]]:
    dp = world // (tp * sp * pp)
    sizes = {"tp": tp, "sp": sp, "dp": dp, "pp": pp}
    coords = [_coords(r, order, sizes) for r in range(world)]
    groups: dict[str, tuple[tuple[int, ...], ...]] = {}
    for dim in ("tp", "sp", "dp", "pp"):
        groups[dim] = _sharing(coords, [d for d in order if d != dim])
    # non-expert weights are replicated over dp and sp: their gradients sync over both
    groups["dp_sp"] = _sharing(coords, ["tp", "pp"])
    # the shards of one set of sequences (tp inside sp): per-sequence router statistics sum over them
    groups["tp_sp"] = _sharing(coords, ["dp", "pp"])
    # expert folding: within a stage, ascending ranks -> etp innermost, then ep, then edp
    ep_groups, etp_groups, edp_groups = [], [], []
    for stage in range(pp):
        ranks = [r for r, c in enumerate(coords) if c["pp"] == stage]
        n = len(ranks)
        edp = n // (ep * etp)
        idx = {(e, p, d): ranks[(d * ep + p) * etp + e] for e in range(etp) for p in range(ep) for d in range(edp)}
        etp_groups += [tuple(idx[(e, p, d)] for e in range(etp)) for p in range(ep) for d in range(edp)]
        ep_groups += [tuple(idx[(e, p, d)] for p in range(ep)) for e in range(etp) for d in range(edp)]
        edp_groups += [tuple(idx[(e, p, d)] for d in range(edp)) for e in range(etp) for p in range(ep)]
    groups["ep"] = tuple(sorted(ep_groups))
    groups["etp"] = tuple(sorted(etp_groups))
    groups["edp"] = tuple(sorted(edp_groups))
    return groups


@lru_cache(maxsize=256)
def _index(world: int, tp: int, sp: int, pp: int, ep: int, etp: int,
           order: tuple[str, ...]) -> dict[str, dict[int, tuple[int, ...]]]:
    groups = _groups(world, tp, sp, pp, ep, etp, order)
    return {kind: {r: g for g in gs for r in g} for kind, gs in groups.items()}


def _key(plan: PlanSpec, world: int) -> tuple:
    if world % (plan.tp * plan.sp * plan.pp):
        raise SpecError(f"plan: tp*sp*pp={plan.tp * plan.sp * plan.pp} does not divide the world size {world}")
    dp = world // (plan.tp * plan.sp * plan.pp)
    if (dp * plan.tp * plan.sp) % (plan.ep * plan.etp):
        raise SpecError(f"plan.ep*etp: {plan.ep * plan.etp} does not divide dp*tp*sp={dp * plan.tp * plan.sp}")
    return (world, plan.tp, plan.sp, plan.pp, plan.ep, plan.etp, tuple(plan.rank_order))


def rank_groups(plan: PlanSpec, world: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Every group of each kind (tp, sp, dp, pp, ep, etp, edp, dp_sp, tp_sp) as sorted tuples of global ranks."""
    return _groups(*_key(plan, world))


def rank_group_index(plan: PlanSpec, world: int) -> dict[str, dict[int, tuple[int, ...]]]:
    """kind -> rank -> the group of that kind holding the rank (O(1) lookups for the simulator)."""
    return _index(*_key(plan, world))


_ATTENTION_DIMS = {"tp": ("tp",), "sp": ("sp",), "dp": ("dp",), "pp": ("pp",), "dp_sp": ("dp", "sp"),
                   "tp_sp": ("tp", "sp")}


@lru_cache(maxsize=4096)
def _group_closed_form(world: int, tp: int, sp: int, pp: int, ep: int, etp: int, order: tuple[str, ...],
                       kind: str, rank: int) -> tuple[int, ...]:
    """One rank's group from its coordinates (no enumeration of the world: O(group size))."""
    sizes = {"tp": tp, "sp": sp, "dp": world // (tp * sp * pp), "pp": pp}
    stride, s = {}, 1
    for d in order:
        stride[d], s = s, s * sizes[d]
    coord = {d: rank // stride[d] % sizes[d] for d in order}
    if kind in _ATTENTION_DIMS:
        vary = _ATTENTION_DIMS[kind]
        out = np.array([rank - sum(coord[d] * stride[d] for d in vary)], dtype=np.int64)
        for d in vary:
            out = np.add.outer(out, np.arange(sizes[d], dtype=np.int64) * stride[d]).ravel()
        return tuple(np.sort(out).tolist())
    # expert folding (as _groups): a stage's ranks in ascending order are position q = (d*ep + p)*etp + e
    inner = [d for d in order if d != "pp"]
    pstride, s = {}, 1
    for d in inner:
        pstride[d], s = s, s * sizes[d]
    q = sum(coord[d] * pstride[d] for d in inner)
    e, p, dd = q % etp, q // etp % ep, q // (etp * ep)
    if kind == "etp":
        pos = (dd * ep + p) * etp + np.arange(etp)
    elif kind == "ep":
        pos = (dd * ep + np.arange(ep)) * etp + e
    elif kind == "edp":
        pos = (np.arange(s // (ep * etp)) * ep + p) * etp + e
    else:
        raise KeyError(f"unknown group kind {kind!r}")
    ranks = np.full(pos.shape, coord["pp"] * stride["pp"], dtype=np.int64)
    for d in inner:  # position -> coordinates -> global rank (ascending with the position)
        ranks += pos // pstride[d] % sizes[d] * stride[d]
    return tuple(ranks.tolist())


def group_of_rank(plan: PlanSpec, world: int, kind: str, rank: int) -> tuple[int, ...]:
    """The `kind` group holding `rank`, as rank_groups lists it (sorted), in closed form: the simulator
    needs only its representative ranks' groups, so it never enumerates a 100k-rank world."""
    return _group_closed_form(*_key(plan, world), kind, rank)


def group_count(plan: PlanSpec, world: int, kind: str) -> int:
    """How many groups of `kind` there are: every kind partitions the world into equal groups."""
    return world // len(group_of_rank(plan, world, kind, 0))


def group_of(groups: dict[str, tuple[tuple[int, ...], ...]], kind: str, rank: int) -> tuple[int, ...]:
    for g in groups[kind]:
        if rank in g:
            return g
    raise KeyError(f"rank {rank} not in any {kind} group")
