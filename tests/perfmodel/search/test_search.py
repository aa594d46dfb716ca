"""Plan search: enumeration, pruning that never loses a top-10 plan, the true optimum on a
small space, determinism across --jobs."""

from __future__ import annotations

import pytest
from fakes import fake_simulate, sim_for_tests

from perfmodel.search import enumerate_space, lower_bound_s, run_search
from perfmodel.search.cli import study_variants
from perfmodel.specs import SearchSpace, SpecError, StudySpec, load_spec
from perfmodel.specs.layout import plan_layout


def small_study(**search) -> StudySpec:
    space = {"tp": [1, 2], "sp": [1, 4], "ep": [3, 4, 8], "pp": [2, 4], "vpp": [1], "micro_batch": [1],
             "recompute": ["none", "full"], "inter_op": [False, True], "intra_op": ["none", "tile"],
             "dispatch": ["fp8"], **search}
    return StudySpec(name="small", model="mixtral-8x7b", cluster="h100-dgx-64", global_batch=64,
                     baseline="base", plans=[{"name": "base", "tp": 2, "ep": 8, "pp": 2}], search=space)


@pytest.fixture(scope="module")
def variants():
    return study_variants(small_study(), "small")


@pytest.fixture(scope="module")
def searched(variants):
    return run_search(small_study(), variants, jobs=1, simulate_fn=sim_for_tests())


def test_enumeration_merges_no_effect_fields_and_explains_non_plans():
    space = SearchSpace(ep=[1, 8], vpp=[1, 2], pp=[1, 2], intra_op=["none", "tile"], chunks=[2, 4],
                        dispatch=["bf16", "fp8"])
    cands, merged = enumerate_space(space, 16)
    plans = [c for c in cands if not isinstance(c, str)]
    assert len({p.name for p in plans}) == len(plans), "names are unique"
    assert all(p.overlap.chunks == 4 for p in plans if p.overlap.intra_op == "none")
    assert all(p.compression.dispatch == "bf16" for p in plans if p.ep == 1)
    assert all(p.schedule == "interleaved" for p in plans if p.vpp > 1)
    assert merged > 0 and len(cands) + merged == 2 ** 7  # x2: schedule [1f1b, interleaved]
    assert any("vpp" in c for c in cands if isinstance(c, str))


def test_every_candidate_has_a_status_and_invalid_ones_a_reason(searched):
    assert searched.evaluated >= 20
    statuses = {r.status for r in searched.rows}
    assert statuses <= {"ok", "no-fit", "invalid", "pruned: memory", "pruned: bound", "error"}
    assert "invalid" in statuses
    for r in searched.rows:
        if r.status != "ok":
            assert r.reason, r
    assert any("does not divide" in r.reason for r in searched.rows if r.status == "invalid")


def test_bound_is_a_floor_on_the_simulated_step(searched, variants):
    v = variants[0]
    for r in searched.rows:
        if r.metrics:
            assert lower_bound_s(v.model, r.plan, v.world, v.profile) <= r.step_time_s * (1 + 1e-9), r.plan.name


def test_search_finds_the_true_optimum_of_an_exhaustive_evaluation(searched, variants):
    v, sim = variants[0], sim_for_tests()
    cands, _ = enumerate_space(small_study().search, 64)
    best = None
    for p in cands:
        if isinstance(p, str):
            continue
        try:
            plan_layout(p, v.model, v.world)
        except SpecError:
            continue
        r = sim(v.model, v.cluster, p, v.profile)
        if r.fits and (best is None or r.tokens_per_s > best[0]):
            best = (r.tokens_per_s, p.name)
    assert best is not None
    top = searched.ranked()[0]
    assert top.tokens_per_s == pytest.approx(best[0], rel=1e-12)


def test_pruning_never_removes_a_top10_plan(variants):
    study = small_study()
    pruned = run_search(study, variants, jobs=1, simulate_fn=sim_for_tests(), keep_top=10)
    full = run_search(study, variants, jobs=1, simulate_fn=sim_for_tests(), memory_fn=None, prune=False)
    assert full.evaluated > pruned.evaluated or not any(r.status.startswith("pruned") for r in pruned.rows)
    top_full = [(r.plan.name, r.tokens_per_s) for r in full.ranked()[:10]]
    top_pruned = [(r.plan.name, r.tokens_per_s) for r in pruned.ranked()[:10]]
    assert top_full == top_pruned


def tight_simulate(model, cluster, plan, profile=None, *, trace=False):
    """A simulator whose step is just above the compute floor, so the bound bites."""
    r = fake_simulate(model, cluster, plan, profile)
    r.step_time_s = lower_bound_s(model, plan, cluster.world_size, profile) * (1.02 + 0.001 * plan.tp)
    r.tokens_per_s = plan.global_batch * model.seq_len / r.step_time_s
    return r


def test_bound_pruning_kicks_in_and_is_explained():
    study = small_study(recompute=["none", "full"], inter_op=[True])
    vs = study_variants(study, "small")
    res = run_search(study, vs, jobs=1, simulate_fn=tight_simulate, keep_top=2, batch=4)
    pruned = [r for r in res.rows if r.status == "pruned: bound"]
    assert pruned and all("compute floor" in r.reason for r in pruned)
    full = run_search(study, vs, jobs=1, simulate_fn=tight_simulate, prune=False)
    assert [r.plan.name for r in res.ranked()[:2]] == [r.plan.name for r in full.ranked()[:2]]


def test_jobs_do_not_change_the_outcome(variants):
    study = small_study(recompute=["none"], vpp=[1, 2])
    one = run_search(study, variants, jobs=1, simulate_fn=sim_for_tests())
    two = run_search(study, variants, jobs=2, simulate_fn=sim_for_tests())
    assert [(r.index, r.status, r.reason, r.metrics) for r in one.rows] == \
        [(r.index, r.status, r.reason, r.metrics) for r in two.rows]


def test_variants_override_the_cluster():
    study = StudySpec(name="v", model="mixtral-8x7b", cluster="h100-dgx-8", global_batch=16,
                      plans=[{"name": "a", "ep": 8}],
                      variants=[{"name": "slow", "cluster": {"network": {"nic_Gbps": 100}}},
                                {"name": "big", "cluster": {"nodes": 2}}])
    vs = study_variants(study, "v")
    assert [v.name for v in vs] == ["slow", "big"]
    assert vs[0].cluster.network.nic_Gbps == 100 and vs[1].world == 16
    res = run_search(study, vs, jobs=1, simulate_fn=fake_simulate)
    assert [r.variant for r in res.rows] == ["slow", "big"]


def test_default_study_space_is_large_and_mostly_valid():
    study, path = load_spec("perfmodel/presets/studies/megascale-moe-352b.yaml", "study"), None
    cands, _ = enumerate_space(study.search, study.global_batch)
    assert len(cands) >= 1000
    assert path is None


def flaky_simulate(model, cluster, plan, profile=None, *, trace=False):
    if plan.tp == 2 and not plan.name.startswith("base"):
        raise ZeroDivisionError("boom")
    return fake_simulate(model, cluster, plan, profile, trace=trace)


def test_a_simulator_failure_marks_the_plan_and_the_search_goes_on(variants):
    res = run_search(small_study(), variants, jobs=2, simulate_fn=flaky_simulate)
    errs = [r for r in res.rows if r.status == "error"]
    assert errs and all(r.plan.tp == 2 and "ZeroDivisionError: boom" in r.reason for r in errs)
    assert res.ranked() and all(r.plan.tp == 1 or r.fixed for r in res.ranked())
