"""Pipeline layouts (perfmodel.specs.pplayout) and schedules (perfmodel.sim.pipeline): closed forms,
uneven stages priced per stage, and the bad-input rules."""

from __future__ import annotations

import pytest

from perfmodel.sim import simulate
from perfmodel.sim.memory import estimate_stages, stage_layers
from perfmodel.sim.pipeline import rank_orders, run_schedule
from perfmodel.specs import ClusterSpec, ModelSpec, PlanSpec, SpecError, load_spec, parse_spec
from perfmodel.specs.layout import plan_layout
from perfmodel.specs.pplayout import StageLayout, balanced_split, parse_megatron, resolve


def _v(pp: int) -> StageLayout:
    return StageLayout(pp, 2, "v", tuple((v, v + 1) for v in range(2 * pp)))


def _loop(pp: int, vpp: int) -> StageLayout:
    return StageLayout(pp, vpp, "loop", tuple((v, v + 1) for v in range(pp * vpp)))


# ------------------------------------------------------------------ closed forms (uniform stages, no p2p)
@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (8, 16)])
def test_1f1b_bubble_is_pp_minus_1_stage_times(pp, m):
    F, B, W = 1.0, 1.5, 0.5
    run = run_schedule(_loop(pp, 1), "1f1b", m, [F] * pp, [B + W] * pp, [W] * pp)
    assert run.step_s - m * (F + B + W) == pytest.approx((pp - 1) * (F + B + W))


@pytest.mark.parametrize("pp,m,vpp", [(2, 4, 2), (4, 8, 2), (4, 8, 4)])
def test_interleaved_bubble_shrinks_by_vpp(pp, m, vpp):
    n = pp * vpp
    F, BW = 1.0 / vpp, 2.0 / vpp  # a rank's stage split into vpp chunks
    run = run_schedule(_loop(pp, vpp), "interleaved", m, [F] * n, [BW] * n)
    assert run.step_s - m * 3.0 == pytest.approx((pp - 1) * 3.0 / vpp)


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_zero_bubble_v_leaves_only_the_first_forward_stagger(pp, m):
    """ZB-V with T_F = T_B = T_W: zero bubble in the steady state (Qi et al., arXiv 2401.10241 s.6);
    what is left is the warm-up stagger of the first forward down the ranks, (pp-1) T_F."""
    T = 1.0
    run = run_schedule(_v(pp), "zero-bubble", m, [T] * (2 * pp), [2 * T] * (2 * pp), [T] * (2 * pp))
    assert run.step_s - m * 2 * 3 * T == pytest.approx((pp - 1) * T)
    # and well under 1F1B on the same pp ranks, with the same work per rank: (pp-1) * 2 chunks * 3T
    assert run.step_s - m * 6 * T < (pp - 1) * 6 * T


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_dualpipev_bubble_matches_deepseek_closed_form(pp, m):
    """DeepSeek-V3 Table 2 / DualPipe README: (PP/2 - 1)(F&B + B - 3W), PP = 2*pp stages of DualPipeV's
    pp ranks; with F = B_input = W and F&B = F + B the schedule meets it exactly."""
    F, Bin, W = 1.0, 1.0, 1.0
    B = Bin + W
    run = run_schedule(_v(pp), "dualpipev", m, [F] * (2 * pp), [B] * (2 * pp), [W] * (2 * pp))
    assert run.step_s - max(run.busy_s) == pytest.approx((pp - 1) * ((F + B) + B - 3 * W))


def test_dualpipev_overlap_shortens_the_step():
    pp, m = 4, 8
    plain = run_schedule(_v(pp), "dualpipev", m, [1.0] * 8, [2.0] * 8, [1.0] * 8)
    fast = run_schedule(_v(pp), "dualpipev", m, [1.0] * 8, [2.0] * 8, [1.0] * 8, fb_s=lambda f, b: 2.0)
    assert fast.step_s < plain.step_s


@pytest.mark.parametrize("schedule,vpp", [("1f1b", 1), ("interleaved", 2), ("zero-bubble", 2), ("dualpipev", 2)])
def test_every_rank_runs_every_microbatch_of_its_stages_once(schedule, vpp):
    pp, m = 4, 8
    layout = _v(pp) if vpp == 2 and schedule in ("zero-bubble", "dualpipev") else _loop(pp, vpp)
    for r, order in enumerate(rank_orders(schedule, pp, m, vpp)):
        fwd = sorted((a[1], a[2]) for a in order if a[0] == "F") + sorted((a[1], a[2]) for a in order if a[0] == "FB")
        bwd = [(a[1], a[2]) for a in order if a[0] in ("B", "BW")] + [(a[3], a[4]) for a in order if a[0] == "FB"]
        mine = layout.stages_of(r)
        assert sorted(fwd) == sorted((v, mb) for v in mine for mb in range(m))
        assert sorted(bwd) == sorted((v, mb) for v in mine for mb in range(m))


# ------------------------------------------------------------------ layouts
def test_default_split_even_when_it_divides_balanced_otherwise():
    assert [hi - lo for lo, hi in resolve(8, PlanSpec(pp=4)).ranges] == [2, 2, 2, 2]
    counts = [hi - lo for lo, hi in resolve(61, PlanSpec(pp=8, vpp=4, schedule="interleaved")).ranges]
    assert sum(counts) == 61 and max(counts) - min(counts) == 1
    assert counts[0] == counts[-1] == min(counts)  # remainder on interior stages, not on the ends
    assert balanced_split(5, 2) == [3, 2]


def test_accounting_for_embedding_and_loss_moves_a_layer_off_the_ends():
    plan = PlanSpec(pp=4, pp_layout={"account_for_embedding": True, "account_for_loss": True})
    counts = [hi - lo for lo, hi in resolve(14, plan).ranges]
    assert counts == [3, 4, 4, 3]


def test_megatron_layout_string():
    spec = parse_megatron("Et*3|(tt|)*29,t|tL")
    assert spec.stages == (3,) + (2,) * 29 + (1, 1)
    p = PlanSpec(pp=16, vpp=2, schedule="interleaved", pp_layout="Et*3|(tt|)*27,t|t|t|tL")
    assert sum(p.pp_layout.stages) == 61 and len(p.pp_layout.stages) == 32


def test_v_placement_puts_first_and_last_stage_on_rank_0():
    lay = resolve(10, PlanSpec(pp=2, vpp=2, schedule="dualpipev"))
    assert lay.stages_of(0) == [0, 3] and lay.stages_of(1) == [1, 2]
    assert lay.rank_of(3) == 0


def test_deepseek_v3_on_pp8_vpp4_is_priced_with_uneven_stages():
    model = load_spec("deepseek-v3", "model")
    cluster = load_spec("h100-dgx-1024", "cluster")
    plan = PlanSpec(ep=64, pp=8, vpp=4, schedule="interleaved", global_batch=1024)
    r = simulate(model, cluster, plan)
    per = r.details["pipeline"]["layers_per_stage"]
    assert sum(per) == 61 and len(per) == 32 and len(set(per)) == 2
    assert r.tokens_per_s > 0
    mem = estimate_stages(model, plan, cluster.world_size, cluster.profile())
    assert len({round(e.total_GiB, 6) for e in mem}) > 1  # per-stage memory differs; the worst is reported
    assert sum(sum(stage_layers(model, plan, s)) for s in range(8)) == 61


def test_a_stage_with_more_layers_paces_the_pipeline():
    model = ModelSpec(layers=6, hidden=256, heads=8, kv_heads=8, head_dim=32, vocab=64, seq_len=256,
                      dense_ffn_hidden=512)
    cluster = ClusterSpec(gpu="h100-sxm", nodes=1, gpus_per_node=2)
    even = simulate(model, cluster, PlanSpec(pp=2, global_batch=8, pp_layout=[3, 3]))
    skewed = simulate(model, cluster, PlanSpec(pp=2, global_batch=8, pp_layout=[5, 1]))
    f = skewed.details["pipeline"]["stage_fwd_s"]
    assert f[0] > 2.5 * f[1] and skewed.step_time_s > even.step_time_s  # (f[1] holds the head)


# ------------------------------------------------------------------ bad input: one line naming the field
@pytest.mark.parametrize("plan,msg", [
    (dict(pp=2, pp_layout=[3, 2]), "misses 1 layer"),
    (dict(pp=2, pp_layout=[3, 4]), "repeats 1 layer"),
    (dict(pp=2, pp_layout=[6]), "1 stages given"),
    (dict(pp=2, pp_layout="Ettt|tmL"), "MTP"),
    (dict(pp=2, pp_layout="tE|tL"), "E (the embedding) may only open the first stage"),
])
def test_bad_layouts_name_the_field(plan, msg):
    model = ModelSpec(layers=6, hidden=64, heads=4, kv_heads=4, head_dim=16, vocab=64, seq_len=64,
                      dense_ffn_hidden=128)
    with pytest.raises(SpecError, match="plan.pp_layout") as exc:
        plan_layout(parse_spec({"kind": "plan", "global_batch": 8, **plan}, "plan", "p.yaml"), model, 2)
    assert msg in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("plan,msg", [
    (dict(pp=2, vpp=1, schedule="zero-bubble"), "needs vpp=2"),
    (dict(pp=2, vpp=1, schedule="dualpipev"), "needs vpp=2"),
    (dict(pp=2, vpp=2, schedule="1f1b"), "needs schedule: interleaved"),
    (dict(pp=2, vpp=1, schedule="interleaved"), "needs vpp>1"),
])
def test_schedule_vpp_mismatch_is_refused(plan, msg):
    with pytest.raises(ValueError, match=msg):
        PlanSpec(**plan)
