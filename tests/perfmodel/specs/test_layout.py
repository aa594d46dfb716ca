"""Rank placement is a pure function: every group kind partitions the world, in the plan's order."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perfmodel.specs import ModelSpec, PlanSpec, SpecError
from perfmodel.specs.layout import group_of, plan_layout, rank_group_index, rank_groups

MODEL = ModelSpec(layers=8, hidden=256, heads=8, kv_heads=4, head_dim=32, vocab=512, seq_len=256,
                  moe=dict(experts=8, top_k=2, expert_ffn_hidden=512))


def test_megatron_order_tp_innermost():
    g = rank_groups(PlanSpec(tp=2, sp=2, pp=2, ep=4), 16)
    assert g["tp"][0] == (0, 1)
    assert g["sp"][0] == (0, 2)
    assert g["dp"][0] == (0, 4)
    assert g["pp"][0] == (0, 8)
    assert g["ep"][0] == (0, 1, 2, 3)  # experts fold over the stage's ranks, ascending
    assert g["edp"][0] == (0, 4)
    assert g["dp_sp"][0] == (0, 2, 4, 6)


def test_rank_order_is_respected():
    g = rank_groups(PlanSpec(tp=2, pp=2, rank_order=("pp", "tp", "sp", "dp")), 8)
    assert g["pp"][0] == (0, 1)
    assert g["tp"][0] == (0, 2)


@settings(max_examples=60, deadline=None)
@given(tp=st.sampled_from([1, 2]), sp=st.sampled_from([1, 2, 4]), pp=st.sampled_from([1, 2]),
       dp=st.sampled_from([1, 2, 4]), ep=st.sampled_from([1, 2, 4, 8]), etp=st.sampled_from([1, 2]),
       order=st.permutations(["tp", "sp", "dp", "pp"]))
def test_groups_partition_world(tp, sp, pp, dp, ep, etp, order):
    world = tp * sp * pp * dp
    plan = PlanSpec(tp=tp, sp=sp, pp=pp, ep=ep, etp=etp, rank_order=tuple(order))
    if (dp * tp * sp) % (ep * etp):
        with pytest.raises(SpecError):
            rank_groups(plan, world)
        return
    groups = rank_groups(plan, world)
    sizes = {"tp": tp, "sp": sp, "pp": pp, "dp": dp, "ep": ep, "etp": etp,
             "edp": dp * tp * sp // (ep * etp), "dp_sp": dp * sp}
    for kind, size in sizes.items():
        flat = sorted(r for grp in groups[kind] for r in grp)
        assert flat == list(range(world)), kind
        assert all(len(grp) == size for grp in groups[kind]), kind
        index = rank_group_index(plan, world)[kind]
        assert all(index[r] == group_of(groups, kind, r) for r in range(world)), kind


@pytest.mark.parametrize("plan,msg", [
    (dict(ep=16, global_batch=16), "plan.ep: 16 does not divide model.moe.experts=8"),
    (dict(tp=3), "does not divide the world size"),
    (dict(pp=3), "does not divide the world size"),
    (dict(sp=16, global_batch=16), "does not divide model.heads=8"),
    (dict(global_batch=7), "global_batch: 7 is not a multiple"),
    (dict(dp=3), "plan.dp: 3"),
])
def test_impossible_plans_name_the_constraint(plan, msg):
    with pytest.raises(SpecError, match=msg.replace("*", r"\*").replace(".", r"\.")):
        plan_layout(PlanSpec(**plan), MODEL, 16)


def test_layout_derives_sizes():
    lay = plan_layout(PlanSpec(tp=2, sp=2, ep=8, pp=2, global_batch=32, micro_batch=2), MODEL, 32)
    assert (lay.dp, lay.edp, lay.microbatches, lay.layers_per_stage) == (4, 2, 4, 4)
