"""Stages built from the shared layout (perfmodel.pplayout): which layers, embedding and head each
pipeline rank holds under loop and V placement, empty stages, and the schedule classes."""

import pytest
import torch

from perfmodel.opnames import GROUP_KINDS
from perfmodel.pplayout import resolve
from perfmodel.specs import ModelSpec, MoESpec, PlanSpec, SpecError
from runtime.groups import Parallel
from runtime.model import Stage, build_stages, check_supported
from runtime.pipeline import SCHEDULE_CLASSES, schedule_class

MODEL = ModelSpec(name="pp-moe", layers=5, hidden=32, heads=2, kv_heads=2, head_dim=16, vocab=64, seq_len=8,
                  moe=MoESpec(experts=4, top_k=2, expert_ffn_hidden=32))


def pp_rank(rank: int, pp: int = 2) -> Parallel:
    """Pipeline rank `rank` of a pp-only job, built without torch.distributed (no collective runs)."""
    return Parallel(rank=rank, world=pp, ranks={k: (rank,) for k in GROUP_KINDS} | {"pp": tuple(range(pp))})


def held(plan: PlanSpec, rank: int) -> list[tuple[int, bool, bool, list[int]]]:
    return [(v, st.first, st.last, [int(i) for i in st.layers]) for v, st in build_stages(MODEL, plan, pp_rank(rank), 0)]


@pytest.mark.parametrize("schedule", ["zero-bubble", "dualpipev"])
def test_v_placement_puts_embedding_and_head_on_rank_0(schedule):
    plan = PlanSpec(pp=2, vpp=2, schedule=schedule)
    assert resolve(MODEL.layers, plan).ranges == ((0, 1), (1, 2), (2, 4), (4, 5))  # balanced: 1+1+2+1
    assert held(plan, 0) == [(0, True, False, [0]), (3, False, True, [4])]
    assert held(plan, 1) == [(1, False, False, [1]), (2, False, False, [2, 3])]


def test_loop_placement_and_default_uneven_split():
    assert held(PlanSpec(pp=2), 0) == [(0, True, False, [0, 1, 2])]
    assert held(PlanSpec(pp=2), 1) == [(1, False, True, [3, 4])]
    plan = PlanSpec(pp=2, vpp=2, schedule="interleaved")
    assert held(plan, 0) == [(0, True, False, [0]), (2, False, False, [2, 3])]
    assert held(plan, 1) == [(1, False, False, [1]), (3, False, True, [4])]


def test_explicit_layouts_with_empty_stages():
    # a Megatron-Core string: the last stage holds only the final norm, head and loss
    plan = PlanSpec(pp=2, vpp=2, schedule="zero-bubble", pp_layout="Et|tt|tt|L")
    assert held(plan, 0) == [(0, True, False, [0]), (3, False, True, [])]
    # an empty first and an empty interior stage: first/last follow the stage index, not layer 0 / the last layer
    plan = PlanSpec(pp=2, vpp=2, schedule="interleaved", pp_layout=[0, 0, 5, 0])
    assert held(plan, 0) == [(0, True, False, []), (2, False, False, [0, 1, 2, 3, 4])]
    assert held(plan, 1) == [(1, False, False, []), (3, False, True, [])]


def test_empty_stages_forward_and_backward():
    par = pp_rank(0)
    plan = PlanSpec(pp=2)
    first, middle, last = (Stage(MODEL, plan, par, 0, 0, 0, first=True, last=False),
                           Stage(MODEL, plan, par, 0, 0, 0, first=False, last=False),
                           Stage(MODEL, plan, par, 5, 5, 0, first=False, last=True))
    h = first(torch.zeros(2, MODEL.seq_len, dtype=torch.long))
    assert h.shape == (2, MODEL.seq_len, MODEL.hidden)
    x = h.detach().requires_grad_()
    y = middle(x)
    assert y is not x and torch.equal(y, x)  # a node of its own in the graph
    logits = last(y)
    assert logits.shape == (2, MODEL.seq_len, MODEL.vocab)
    logits.sum().backward()
    assert x.grad is not None and last.head.grad is not None


def test_schedule_classes_exist():
    assert set(SCHEDULE_CLASSES) == {"1f1b", "interleaved", "zero-bubble", "dualpipev"}
    for name in SCHEDULE_CLASSES:
        assert schedule_class(name).__name__ == SCHEDULE_CLASSES[name]


@pytest.mark.parametrize("schedule", ["zero-bubble", "dualpipev"])
def test_v_schedules_reject_deferred_expert_wgrad(schedule):
    with pytest.raises(SpecError, match="plan.overlap.inter_op"):
        check_supported(PlanSpec(pp=2, vpp=2, schedule=schedule, overlap=dict(inter_op=True)))
    check_supported(PlanSpec(pp=2, vpp=2, schedule=schedule, overlap=dict(intra_op="chunk", chunks=2)))


def test_1f1b_with_fewer_microbatches_than_stages_is_refused_before_launch():
    from perfmodel.specs import PlanSpec, SpecError
    from runtime.model import check_supported

    with pytest.raises(SpecError, match="plan.global_batch: the runtime's 1f1b"):
        check_supported(PlanSpec(pp=4, global_batch=2), microbatches=2)
    check_supported(PlanSpec(pp=4, global_batch=4), microbatches=4)


def test_non_gated_ffn_is_refused():
    # gated_ffn: false (a two-matrix FFN) is priced by the simulator; the runtime builds SwiGLU only
    spec = MODEL.model_copy(update={"gated_ffn": False})
    with pytest.raises(SpecError, match="model.gated_ffn"):
        Stage(spec, PlanSpec(pp=2), pp_rank(0), 0, 2, 0)
