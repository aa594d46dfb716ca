"""Fuzz: mutate valid specs every way a user (or a hostile file) might; parsing either succeeds
or raises SpecError with a one-line message. No other exception may ever escape."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from cli_harness import SCALE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perfmodel.sim.memory import estimate_memory
from perfmodel.specs import (
    PRESET_DIR,
    ClusterSpec,
    ModelSpec,
    PlanSpec,
    SpecError,
    StudySpec,
    load_spec,
    parse_spec,
    yamlsafe,
)
from perfmodel.specs.validate import check_study, cluster_profile, one_line

FUZZ = settings(max_examples=200 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BASES: dict[str, list[dict[str, Any]]] = {"model": [], "cluster": [], "profile": []}
for sub, kind in (("models", "model"), ("clusters", "cluster"), ("gpus", "profile")):
    for p in sorted((PRESET_DIR / sub).glob("*.yaml")):
        BASES[kind].append(yamlsafe.load_file(p))
BASES["plan"] = [
    {"kind": "plan", "sp": 2, "ep": 4, "pp": 2, "vpp": 2, "schedule": "interleaved", "global_batch": 16,
     "recompute": "selective", "overlap": {"inter_op": True, "intra_op": "tile", "chunks": 4},
     "compression": {"dispatch": "fp8", "grad_sync": "bf16"}, "rank_order": ["sp", "tp", "dp", "pp"]},
    {"tp": 2, "ep": 2, "micro_batch": 2, "global_batch": 8, "distributed_optimizer": False},
    {"kind": "plan", "pp": 2, "vpp": 2, "schedule": "dualpipev", "precision": "fp8", "fp8_recipe": "blockwise",
     "pp_layout": "Et|t|t|tL", "global_batch": 16},
    {"pp": 2, "schedule": "1f1b", "pp_layout": {"stages": [3, 1], "account_for_loss": True}, "global_batch": 4},
]
BASES["study"] = [
    {"kind": "study", "name": "s", "model": "tiny-moe", "cluster": "cpu-local-4", "global_batch": 8,
     "baseline": "a", "plans": [{"name": "a", "ep": 4}, {"name": "b", "sp": 2, "ep": 2, "calibrate": True}],
     "search": {"ep": [1, 2, 4], "recompute": ["none", "full"]},
     "variants": [{"name": "fast", "cluster": {"intra_node": {"bw_GBps": 50}}}],
     "reference": {"tokens_per_s.a": 1000.0}},
    {"kind": "study", "model": "mixtral-8x7b", "cluster": {"kind": "cluster", "gpu": "h100-sxm", "nodes": 2,
                                                            "gpus_per_node": 8}, "plans": [{"name": "p", "ep": 8}]},
]
KINDS = sorted(BASES)

leaf = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 10**9, 10**9 + 1, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0, 1e308, 5e-324]),
    st.text(max_size=12), st.sampled_from(["bf16", "fp8", "1f1b", "h100-sxm", "tiny-moe", "nvlink", "", "model",
                                           "dualpipev", "zero-bubble", "blockwise", "Et|tL", "(t|)*2", "t*99"]),
)
junk = st.recursive(leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                 st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                    max_leaves=12)
key = st.one_of(st.text(max_size=10), st.sampled_from(["kind", "name", "moe", "experts", "gpu", "plans", "tp",
                                                       "ep", "max", "half_work", "nvlink", "fabric", "network"]),
                st.integers(-3, 3), st.booleans())


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _parent(root: Any, path: tuple) -> Any:
    for p in path[:-1]:
        root = root[p]
    return root


@st.composite
def mutated(draw, kind: str) -> Any:
    data = copy.deepcopy(draw(st.sampled_from(BASES[kind])))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "drop", "add", "wrap", "negate"]))
        if not path:
            if op == "replace":
                data = draw(junk)
            continue
        parent, last = _parent(data, path), path[-1]
        if op == "replace":
            parent[last] = draw(junk)
        elif op == "drop":
            del parent[last]
        elif op == "add":
            target = parent[last]
            if isinstance(target, dict):
                target[draw(key)] = draw(junk)
            elif isinstance(target, list):
                target.append(draw(junk))
            else:
                parent[last] = [target, draw(junk)]
        elif op == "wrap":
            parent[last] = {"value": parent[last]} if draw(st.booleans()) else [parent[last]]
        elif isinstance(parent[last], (int, float)) and not isinstance(parent[last], bool):
            parent[last] = draw(st.sampled_from([-parent[last], parent[last] * 10**12, float("nan"), 0]))
        if not isinstance(data, (dict, list)):
            break
    return data


def check(data: Any, kind: str | None) -> None:
    """Parse and follow the spec as far as the tools would; only SpecError may come out."""
    try:
        spec = parse_spec(data, kind, "fuzz.yaml")
        if isinstance(spec, ClusterSpec):
            cluster_profile(spec, "fuzz.yaml")
        elif isinstance(spec, StudySpec):
            check_study(spec, "fuzz.yaml")
        elif isinstance(spec, ModelSpec):
            assert spec.params_total >= spec.params_active > 0
            if spec.layers <= 4096:
                estimate_memory(spec, PlanSpec(global_batch=1), 1, PROFILE)
        elif isinstance(spec, PlanSpec):
            estimate_memory(TINY, spec, 4, PROFILE)
    except SpecError as exc:
        msg = one_line(str(exc))
        assert msg and msg.startswith(("fuzz.yaml", "plan")), msg


TINY = load_spec("tiny-moe", "model")
PROFILE = load_spec("cpu", "profile")


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_mutated_dicts(kind, data):
    spec = data.draw(mutated(kind))
    check(spec, None)
    check(spec, kind)


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_mutated_yaml_text(kind, data):
    """Round trip through YAML text, with random edits of the text itself."""
    text = yaml.safe_dump(data.draw(mutated(kind)), sort_keys=False)
    if data.draw(st.booleans()) and text:
        i = data.draw(st.integers(0, len(text)))
        text = text[:i] + data.draw(st.sampled_from(["&a ", "*a", ": ", "\n- ", "{", "[", "!!python/object:os.system ",
                                                     "\t", "\x00", "? ", "|", "'", '"', "!!binary x", "\ufeff"])) + text[i:]
    try:
        loaded = yamlsafe.loads(text, "fuzz.yaml")
    except yamlsafe.YamlError as exc:
        assert str(exc).startswith("fuzz.yaml")
        return
    check(loaded, None)


@settings(max_examples=60 * SCALE, deadline=None)
@given(st.integers(2, 12), st.integers(2, 12))
def test_nesting_and_aliases_bounded(depth, fan):
    nested = "a: " + "[" * (depth * 8) + "]" * (depth * 8)
    aliases = "x0: &x0 [1, 2]\n" + "".join(
        f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * fan) + "]\n" for i in range(1, depth))
    for text in (nested, aliases):
        try:
            check(yamlsafe.loads(text, "fuzz.yaml"), None)
        except yamlsafe.YamlError as exc:
            assert "refused" in str(exc)
