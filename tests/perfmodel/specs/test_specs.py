"""Spec loading and validation: good specs pass, each kind of bad input gives one clear SpecError."""

from __future__ import annotations

import pytest

from perfmodel.specs import (
    PRESET_DIR,
    ModelSpec,
    PlanSpec,
    SpecError,
    infer_kind,
    load_spec,
    parse_spec,
    with_overrides,
    yamlsafe,
)
from perfmodel.specs.layout import plan_layout
from perfmodel.specs.validate import validate_file

MODEL = """\
kind: model
name: m
layers: 2
hidden: 64
heads: 4
kv_heads: 4
head_dim: 16
vocab: 100
seq_len: 32
moe: {experts: 24, top_k: 2, expert_ffn_hidden: 64}
"""
PROFILE = """\
kind: profile
peak_tflops: {bf16: 989}
memory_GiB: 80
hbm_bw_GBps: 3350
gemm_efficiency: {max: 0.7}
attention_efficiency: {max: 0.5}
memory_efficiency: {max: 0.8}
fabrics: {nvlink: {latency_us: 3}}
"""


def write(tmp_path, text: str, name: str = "spec.yaml") -> str:
    p = tmp_path / name
    p.write_text(text) if isinstance(text, str) else p.write_bytes(text)
    return str(p)


def bad(tmp_path, text, match: str, kind: str | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as exc:
        validate_file(path, kind)
    msg = str(exc.value)
    assert "\n" not in msg and path in msg
    assert match in msg, msg
    return msg


def test_good_specs(tmp_path):
    m = validate_file(write(tmp_path, MODEL))
    assert isinstance(m, ModelSpec) and m.moe.experts == 24
    assert validate_file(write(tmp_path, PROFILE, "p.yaml")).peak_tflops["bf16"] == 989
    plan = validate_file(write(tmp_path, "tp: 2\nep: 4\n", "plan.yaml"))
    assert isinstance(plan, PlanSpec) and plan.tp == 2  # kind inferred from keys


def test_wrong_type(tmp_path):
    bad(tmp_path, MODEL.replace("hidden: 64", "hidden: big"), "model.hidden: Input should be a valid integer")
    bad(tmp_path, MODEL.replace("hidden: 64", "hidden: [64]"), "model.hidden")
    bad(tmp_path, "- 1\n- 2\n", "expected a YAML mapping")


def test_unknown_key_is_an_error(tmp_path):
    bad(tmp_path, MODEL + "hiden: 3\n", "model.hiden: unknown key")
    bad(tmp_path, MODEL.replace("top_k: 2", "top_k: 2, topk: 3"), "model.moe.topk: unknown key")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_inf(tmp_path, value):
    bad(tmp_path, PROFILE.replace("hbm_bw_GBps: 3350", f"hbm_bw_GBps: {value}"), "profile.hbm_bw_GBps")
    bad(tmp_path, PROFILE.replace("bf16: 989", f"bf16: {value}"), "profile.peak_tflops.bf16")


def test_negative_sizes_and_bandwidths(tmp_path):
    bad(tmp_path, PROFILE.replace("hbm_bw_GBps: 3350", "hbm_bw_GBps: -1"), "greater than 0")
    bad(tmp_path, PROFILE.replace("latency_us: 3", "latency_us: -3"), "profile.fabrics.nvlink.latency_us")
    bad(tmp_path, MODEL.replace("layers: 2", "layers: -2"), "model.layers")
    cluster = "kind: cluster\ngpu: h100-sxm\nnodes: 2\ngpus_per_node: 8\nnetwork: {nic_Gbps: -400}\n"
    bad(tmp_path, cluster, "cluster.network.nic_Gbps")


def test_model_constraints(tmp_path):
    bad(tmp_path, MODEL.replace("kv_heads: 4", "kv_heads: 3"), "kv_heads=3 does not divide heads=4")
    bad(tmp_path, MODEL.replace("top_k: 2", "top_k: 25"), "top_k=25 exceeds experts=24")


def test_alias_bomb_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bad(tmp_path, "\n".join(lines) + "\n", "alias bomb")


def test_deep_nesting_refused(tmp_path):
    bad(tmp_path, "a: " + "[" * 200 + "]" * 200 + "\n", "nesting")
    bad(tmp_path, "a:\n" + "".join(" " * (2 * i + 2) + f"k{i}:\n" for i in range(100)), "nesting")


def test_missing_file_directory_and_non_yaml(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        validate_file(str(tmp_path / "nope.yaml"))
    with pytest.raises(SpecError, match="is a directory"):
        validate_file(str(tmp_path))
    bad(tmp_path, "a: [1, 2\n", "not valid YAML")
    bad(tmp_path, b"\x00\xff\xfe\x00", "not a UTF-8 text file")
    bad(tmp_path, "", "empty file")
    bad(tmp_path, "just a string\n", "expected a YAML mapping")


def test_kind_mismatch_and_unknown_kind(tmp_path):
    bad(tmp_path, PROFILE, "is a profile spec, expected a model", kind="model")
    bad(tmp_path, "kind: widget\nx: 1\n", "kind: 'widget' is not one of")
    bad(tmp_path, "colour: blue\n", "cannot tell what this is")


def test_impossible_plan_in_a_study(tmp_path):
    write(tmp_path, MODEL, "model.yaml")
    study = ("kind: study\nmodel: model.yaml\ncluster: h100-dgx-64\n"
             "plans:\n  - {name: ok, ep: 8, global_batch: 64}\n  - {name: bad, ep: 16, global_batch: 64}\n")
    msg = bad(tmp_path, study, "plan.ep: 16 does not divide model.moe.experts=24")
    assert "study.plans[1] (bad)" in msg


def test_study_refs_are_checked(tmp_path):
    bad(tmp_path, "kind: study\nmodel: no-such-model\ncluster: h100-dgx-8\nplans: [{name: a}]\n",
        "study.model: no-such-model: no model preset of that name")
    bad(tmp_path, "kind: study\nmodel: tiny-moe\ncluster: h100-dgx-8\nbaseline: zz\nplans: [{name: a}]\n",
        "baseline 'zz' is not one of the plans")
    bad(tmp_path, "kind: study\nmodel: tiny-moe\ncluster: h100-dgx-8\nplans: [{name: a}]\n"
        "variants: [{name: v, cluster: {nodes: 0}}]\n", "study.variants[0] (v)")
    bad(tmp_path, "kind: cluster\ngpu: no-such-gpu\nnodes: 1\ngpus_per_node: 8\n", "cluster.gpu: no-such-gpu")


def test_good_study_with_relative_ref_and_global_batch(tmp_path):
    write(tmp_path, MODEL, "model.yaml")
    study = ("kind: study\nmodel: model.yaml\ncluster: h100-dgx-8\nglobal_batch: 16\n"
             "plans:\n  - {name: a, ep: 8}\n  - {name: b, ep: 4, micro_batch: 2}\n")
    spec = validate_file(write(tmp_path, study, "s.yaml"))
    assert [p.name for p in spec.plans] == ["a", "b"]


def test_plan_layout_errors():
    m = parse_spec(yamlsafe.loads(MODEL), "model", "m")
    with pytest.raises(SpecError, match=r"plan.ep: 16 does not divide model.moe.experts=24"):
        plan_layout(PlanSpec(ep=16, global_batch=16), m, 16)
    with pytest.raises(SpecError, match="does not divide the world size"):
        plan_layout(PlanSpec(tp=3), m, 16)
    with pytest.raises(SpecError, match="plan.global_batch"):
        plan_layout(PlanSpec(global_batch=3), m, 2)
    lay = plan_layout(PlanSpec(ep=8, global_batch=32, micro_batch=2), m, 16)
    assert (lay.dp, lay.edp, lay.microbatches) == (16, 2, 1)


def test_preset_name_or_path_and_overrides():
    by_name = load_spec("tiny-moe", "model")
    assert load_spec(str(PRESET_DIR / "models" / "tiny-moe.yaml"), "model") == by_name
    with pytest.raises(SpecError, match="no model preset of that name"):
        load_spec("tiny-moee", "model")
    bigger = with_overrides(by_name, {"moe": {"experts": 16}}, "override")
    assert bigger.moe.experts == 16 and bigger.moe.top_k == 2
    with pytest.raises(SpecError, match="override: model.moe.experts"):
        with_overrides(by_name, {"moe": {"experts": -1}}, "override")


def test_overrides_keep_the_subclass():
    from perfmodel.specs import NamedPlan

    p = NamedPlan(name="x", calibrate=True, ep=2)
    q = with_overrides(p, {"global_batch": 16}, "o")
    assert isinstance(q, NamedPlan) and q.calibrate and q.global_batch == 16
    with pytest.raises(SpecError, match="o: plan.global_batch"):
        with_overrides(p, {"global_batch": 0}, "o")


def test_huge_layers_do_not_hang():
    m = ModelSpec(layers=10**9, hidden=8, heads=1, kv_heads=1, head_dim=8, vocab=8, seq_len=8, dense_ffn_hidden=8,
                  moe={"experts": 2, "top_k": 1, "expert_ffn_hidden": 8, "moe_layer_freq": 3})
    assert m.n_moe_layers == -(-10**9 // 3)


def test_infer_kind():
    assert infer_kind({"plans": []}, "x") == "study"
    assert infer_kind({"nodes": 1}, "x") == "cluster"
    assert infer_kind({"peak_tflops": {}}, "x") == "profile"
    assert infer_kind({"layers": 1}, "x") == "model"
    assert infer_kind({"ep": 1}, "x") == "plan"


def test_error_is_one_line_even_for_keys_with_newlines(tmp_path):
    bad(tmp_path, MODEL + '"evil\\nkey": 1\n', "unknown key")
    study = ("kind: study\nmodel: tiny-moe\ncluster: cpu-local-4\nplans: [{name: a}]\n"
             'variants: [{name: v, cluster: {"x\\ny": 1}}]\n')
    bad(tmp_path, study, "unknown key")


def test_group_limited_routing_and_dispatcher_fields():
    import pytest as _pytest

    from perfmodel.specs import MoESpec, PlanSpec, SpecError
    from runtime.model import check_supported

    ok = MoESpec(experts=256, top_k=8, expert_ffn_hidden=2048, expert_groups=8, groups_per_token=4)
    assert ok.groups_per_token == 4
    for bad in ({"expert_groups": 7}, {"expert_groups": 8, "groups_per_token": 9},
                {"expert_groups": 64, "groups_per_token": 1}):  # 1 group of 4 experts < top_k 8
        with _pytest.raises(ValueError):
            MoESpec(experts=256, top_k=8, expert_ffn_hidden=2048, **bad)
    with _pytest.raises(SpecError, match="plan.dispatcher"):
        check_supported(PlanSpec(ep=2, dispatcher="deepep"))
