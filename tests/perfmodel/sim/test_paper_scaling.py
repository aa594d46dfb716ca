"""The strong-scaling study reproduces MegaScale-MoE's Table 3 (arXiv 2505.11432) and its trend:
per-GPU throughput kept from 240 to 1,440 GPUs (paper: MegaScale-MoE 0.86, Megatron-LM 0.82) within
+-0.03, and every figure of the table (tokens/s of both systems and the speedup at every scale)
within +-10 %. Every point of the table is one of the published runs the Hopper presets' production
constants are fitted on (moeperf calibrate --published studies/published: one set of constants per GPU
family, none per scale), so these figures are in-sample; their leave-one-out errors (each point predicted
by constants fitted without it) are printed by benchmarks/fidelity.py (max 7.1 %)."""

import pytest

from perfmodel.search.cli import study_variants
from perfmodel.sim import simulate
from perfmodel.specs import load_spec

STUDY = "studies/megascale-moe-352b-scaling.yaml"
PLANS = ("megascale-moe", "megatron-lm")


@pytest.fixture(scope="module")
def table():
    """(reference, predicted tokens/s per (variant, plan), GPUs per variant, first variant)."""
    st = load_spec(STUDY, "study")
    variants = study_variants(st, STUDY)
    pred, gpus = {}, {}
    for v in variants:
        gpus[v.name] = v.world
        for p in st.plans:
            plan = p.model_copy(update={"global_batch": st.global_batch})
            pred[v.name, p.name] = simulate(v.model, v.cluster, plan, v.profile).tokens_per_s
    return st.reference, pred, gpus, variants[0].name


def _ref(reference, metric, plan, variant, first):
    key = f"{metric}.{plan}" if plan else metric
    return reference[key if variant == first else f"{key}@{variant}"]


@pytest.mark.parametrize("plan,paper_retention", [("megascale-moe", 0.86), ("megatron-lm", 0.82)])
def test_per_gpu_throughput_kept_from_240_to_1440_gpus_within_0_03(table, plan, paper_retention):
    reference, pred, gpus, first = table
    lo, hi = "gpus-240", "gpus-1440"
    per_gpu = lambda tps, v: tps / gpus[v]  # noqa: E731
    paper = per_gpu(_ref(reference, "tokens_per_s", plan, hi, first), hi) / per_gpu(
        _ref(reference, "tokens_per_s", plan, lo, first), lo)
    assert paper == pytest.approx(paper_retention, abs=0.005)
    predicted = per_gpu(pred[hi, plan], hi) / per_gpu(pred[lo, plan], lo)
    assert predicted == pytest.approx(paper, abs=0.03), f"{plan}: predicted {predicted:.3f}, paper {paper:.3f}"


def test_megascale_moe_keeps_more_per_gpu_throughput_than_megatron_lm(table):
    _, pred, gpus, _ = table
    keep = {p: (pred["gpus-1440", p] / gpus["gpus-1440"]) / (pred["gpus-240", p] / gpus["gpus-240"]) for p in PLANS}
    assert keep["megascale-moe"] > keep["megatron-lm"]


VARIANTS = ("gpus-240", "gpus-480", "gpus-720", "gpus-960", "gpus-1440")
# The paper's speedup falls from 1.81 at 240 GPUs to 1.65 at 480, then rises to 1.88: its 240-GPU pair lies
# off each system's own 480..1,440 line (iteration time = a x micro-batches + b within 0.5 %: MegaScale-MoE
# 7 % faster, Megatron-LM 5 % slower). Calibrated on that pair alone, the 480-GPU speedup came out +10.4 %;
# fitted on every published run (the whole table among them), it is within 10 %.
FIGURES = [pytest.param(m, p, v, id=f"{m}.{p or 'ms/mg'}@{v}")
           for v in VARIANTS for m, p in (("tokens_per_s", PLANS[0]), ("tokens_per_s", PLANS[1]), ("speedup", None))]


@pytest.mark.parametrize("metric,plan,variant", FIGURES)
def test_every_table3_figure_within_10_percent(table, metric, plan, variant):
    reference, pred, _, first = table
    paper = _ref(reference, metric, plan, variant, first)
    if metric == "speedup":
        predicted = pred[variant, "megascale-moe"] / pred[variant, "megatron-lm"]
    else:
        predicted = pred[variant, plan]
    assert predicted == pytest.approx(paper, rel=0.10), f"{metric} {plan or ''} @{variant}: {predicted:.4g} vs {paper}"
