"""The default study reproduces MegaScale-MoE's headline (arXiv 2505.11432 Table 3, 1,440 GPUs)
within +-10 %. The Hopper presets' production constants are fitted on 25 published runs, these among
them (moeperf calibrate --published studies/published), so the figures are in-sample: a change to the
simulator or the op graph that moves them is caught here (regenerate the presets with
`moeperf calibrate --published studies/published --write-presets`)."""

import pytest

from perfmodel.sim import simulate
from perfmodel.specs import load_spec


@pytest.fixture(scope="module")
def predicted():
    st = load_spec("studies/megascale-moe-352b.yaml", "study")
    model, cluster = load_spec(st.model, "model"), load_spec(st.cluster, "cluster")
    out = {}
    for p in st.plans:
        out[p.name] = simulate(model, cluster, p.model_copy(update={"global_batch": st.global_batch})).tokens_per_s
    return st.reference, out


def test_headline_throughputs_within_10_percent(predicted):
    ref, pred = predicted
    for plan in ("megascale-moe", "megatron-lm"):
        assert pred[plan] == pytest.approx(ref[f"tokens_per_s.{plan}"], rel=0.10), plan


def test_speedup_over_megatron_within_10_percent(predicted):
    ref, pred = predicted
    assert pred["megascale-moe"] / pred["megatron-lm"] == pytest.approx(ref["speedup"], rel=0.10)
