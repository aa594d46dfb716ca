"""The overlapped DP gradient sync runs per model chunk under the pipeline's cool-down (MegaScale,
arXiv 2402.15627 s.3.2): with one chunk per rank it is the last backward's bucket overlap it always
was; with interleaving only the last chunk's reduction (and the first chunk's gather) stay exposed."""

from types import SimpleNamespace

import pytest

from perfmodel.sim import simulate
from perfmodel.sim.engine import _overlapped_sync
from perfmodel.sim.pipeline import run_pipeline
from perfmodel.specs import load_spec, with_overrides
from perfmodel.specs.pplayout import StageLayout


def _layout(pp: int, vpp: int, layers: int) -> StageLayout:
    n = pp * vpp
    return StageLayout(pp, vpp, "loop", tuple((v * layers, (v + 1) * layers) for v in range(n)))


def test_pipeline_reports_when_each_chunk_is_ready_and_first_needed():
    pp, m, f, b = 4, 8, 1.0, 2.0
    one = run_pipeline([f] * pp, [b] * pp, m)
    # 1F1B: a stage's gradients are final with its last backward, its first forward starts after the fill
    assert one.grads_ready_s == pytest.approx(one.finish_s)
    assert one.first_fwd_s == pytest.approx([v * f for v in range(pp)])
    inter = run_pipeline([f] * pp, [b] * pp, m, vpp=2)
    # interleaved: rank 0 holds virtual stages 0 and pp; the second chunk is done well before the first
    assert inter.grads_ready_s[0] == pytest.approx(inter.finish_s[0])
    assert inter.grads_ready_s[pp] < inter.grads_ready_s[0] - pp * b / 2 + 1e-9
    assert inter.first_fwd_s[pp] >= pp * f / 2 - 1e-9


def test_one_chunk_per_rank_keeps_the_last_backward_closed_form():
    st = _layout(pp=2, vpp=1, layers=4)
    pipe = SimpleNamespace(grads_ready_s=[10.0, 8.0], first_fwd_s=[0.0, 0.5])
    F, B = [0.5, 0.5], [1.0, 1.0]
    for red, gat in ((3.0, 2.0), (0.4, 0.3)):  # sync longer / shorter than one backward
        exp_r, delay = _overlapped_sync([(0, red, gat)], pipe, 10.0, F, B, st)
        assert exp_r == pytest.approx(max(red / 4, red - B[0]))
        assert delay == pytest.approx(max(gat / 4, gat - F[0]))


def test_interleaving_hides_the_earlier_chunks_sync_in_the_cool_down():
    st = _layout(pp=2, vpp=2, layers=2)  # rank 0 holds virtual stages 0 and 2
    pipe = SimpleNamespace(grads_ready_s=[10.0, 0.0, 7.0, 0.0], first_fwd_s=[0.0, 0.0, 4.0, 0.0])
    F, B = [0.5] * 4, [1.0] * 4
    exp_r, delay = _overlapped_sync([(0, 1.5, 1.0), (2, 1.5, 1.0)], pipe, 10.0, F, B, st)
    # chunk 2 reduces in 6..7.5 under the cool-down; chunk 0 starts in its last backward (9) and its
    # last bucket (1.5 / 2 layers) ends at 10.75
    assert exp_r == pytest.approx(0.75)
    assert delay == pytest.approx(0.5)  # chunk 0's gather (1.0) minus its first forward (0.5); chunk 2's is hidden
    # the same 3 s of reduction on one chunk would leave 2 s exposed
    one, _ = _overlapped_sync([(0, 3.0, 2.0)], pipe, 10.0, F, B, _layout(pp=2, vpp=1, layers=4))
    assert one == pytest.approx(2.0)


def test_interleaved_megascale_plan_exposes_about_half_the_sync_of_1f1b():
    st = load_spec("studies/megascale-moe-352b-scaling.yaml", "study")
    model = load_spec(st.model, "model")
    cluster = with_overrides(load_spec(st.cluster, "cluster"), {"nodes": 180}, "1,440 GPUs")
    plan = next(p for p in st.plans if p.name == "megascale-moe").model_copy(update={"global_batch": 720})
    inter = simulate(model, cluster, plan)
    flat = simulate(model, cluster, plan.model_copy(update={"schedule": "1f1b", "vpp": 1}))
    assert inter.details["grad_sync"]["reduce_s"] == pytest.approx(flat.details["grad_sync"]["reduce_s"], rel=0.05)
    assert 0.3 < inter.breakdown["grad_sync_s"] / flat.breakdown["grad_sync_s"] < 0.65
    assert inter.breakdown["bubble_s"] < 0.6 * flat.breakdown["bubble_s"]
