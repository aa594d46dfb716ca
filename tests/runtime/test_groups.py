"""Process groups come from perfmodel.specs.layout.rank_groups; checked without spawning ranks."""

import pytest

from perfmodel.specs import PlanSpec
from perfmodel.specs.layout import rank_groups
from runtime import groups as G
from runtime.groups import Parallel, build_parallel, group_lists


class FakeDist:
    """Records new_group calls in order; returns a token per group."""

    def __init__(self):
        self.calls = []

    def new_group(self, ranks, **kw):
        self.calls.append(tuple(ranks))
        return ("pg", tuple(ranks))


@pytest.fixture
def fake(monkeypatch):
    f = FakeDist()
    monkeypatch.setattr(G, "dist", f)
    return f


@pytest.mark.parametrize("fields", [dict(), dict(ep=4), dict(sp=2, ep=2), dict(ep=2), dict(tp=2), dict(pp=2),
                                    dict(tp=2, sp=2, pp=2, ep=4), dict(sp=2, ep=2, rank_order=("dp", "sp", "tp", "pp"))])
def test_groups_match_layout_and_every_rank_creates_the_same(fake, fields):
    plan = PlanSpec(**fields)
    world = 8
    expected = rank_groups(plan, world)
    seqs = []
    for rank in range(world):
        fake.calls.clear()
        par = build_parallel(plan, world, rank)
        seqs.append(list(fake.calls))
        for kind, groups in expected.items():
            mine = [g for g in groups if rank in g]
            assert par.ranks[kind] == mine[0]
            pg = par.pg(kind)
            assert (pg is None) == (len(mine[0]) == 1)
            if pg is not None:
                assert pg == ("pg", mine[0])
    assert all(s == seqs[0] for s in seqs), "new_group must be called in the same order on every rank"
    assert seqs[0] == [r for _, r in group_lists(plan, world) if len(r) > 1]


def test_token_shard_and_index(fake):
    plan = PlanSpec(tp=2, sp=2)
    par = build_parallel(plan, 8, 3)  # rank_order tp innermost: rank 3 = tp 1, sp 1
    assert par.index("tp") == 1 and par.index("sp") == 1
    assert par.token_shard == (3, 4)


def test_single_process_has_no_groups():
    par = Parallel.single()
    assert all(par.size(k) == 1 and par.pg(k) is None for k in ("tp", "sp", "dp", "pp", "ep", "etp", "edp"))
