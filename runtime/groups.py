"""Process groups for a plan, built from `perfmodel.specs.layout.rank_groups` (the one pure function
that says which ranks form each group; the simulator places its collectives with it too).

`Parallel` is what the model and the optimizer see: for each group kind (tp, sp, dp, pp, ep,
etp, edp) this rank's torch ProcessGroup (None when the group is just this rank, so every
collective on it is skipped) plus its size and this rank's index in it. A single-process run
uses `Parallel.single()`, which needs no torch.distributed at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from perfmodel.specs import PlanSpec
from perfmodel.specs.layout import group_of, rank_groups
from perfmodel.specs.opnames import GROUP_KINDS


@dataclass
class Parallel:
    rank: int = 0
    world: int = 1
    ranks: dict[str, tuple[int, ...]] = field(default_factory=dict)  # kind -> this rank's group
    pgs: dict[str, object] = field(default_factory=dict)  # kind -> ProcessGroup (only groups of size > 1)

    @staticmethod
    def single() -> Parallel:
        return Parallel(ranks={k: (0,) for k in GROUP_KINDS})

    def size(self, kind: str) -> int:
        return len(self.ranks[kind])

    def index(self, kind: str) -> int:
        """This rank's position in its `kind` group (group tuples are ascending, so this is the coordinate)."""
        return self.ranks[kind].index(self.rank)

    def pg(self, kind: str):
        return self.pgs.get(kind)

    def peer(self, kind: str, index: int) -> int:
        """Global rank at position `index` of this rank's `kind` group."""
        return self.ranks[kind][index]

    @property
    def token_shard(self) -> tuple[int, int]:
        """(index, count) of this rank's slice of each sequence: tp inside sp, as the
        attention all-gathers tp first (Megatron sequence parallel) then all-to-alls over sp."""
        return self.index("sp") * self.size("tp") + self.index("tp"), self.size("sp") * self.size("tp")


def group_lists(plan: PlanSpec, world: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every (kind, ranks) group in the order every rank must create it (new_group is collective)."""
    groups = rank_groups(plan, world)
    return [(kind, ranks) for kind in GROUP_KINDS for ranks in groups[kind]]


def build_parallel(plan: PlanSpec, world: int, rank: int, timeout=None) -> Parallel:
    """Create the process groups of `plan`; must be called by every rank with the same plan.

    Every rank calls new_group for every group (even those it is not in) in one fixed order,
    as torch.distributed requires; groups of one rank are not created because nothing is sent.
    Identical rank tuples of different kinds (e.g. ep == dp) still get their own group so the
    collectives of one kind never interleave with another's on the same communicator.
    """
    groups = rank_groups(plan, world)
    par = Parallel(rank=rank, world=world, ranks={k: group_of(groups, k, rank) for k in GROUP_KINDS})
    kwargs = {"timeout": timeout} if timeout is not None else {}
    for kind, ranks in group_lists(plan, world):
        if len(ranks) == 1:
            continue
        pg = dist.new_group(list(ranks), **kwargs)
        if rank in ranks:
            par.pgs[kind] = pg
    return par
