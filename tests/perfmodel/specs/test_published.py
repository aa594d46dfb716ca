"""The published-runs dataset (studies/published) and its loader: every run loads and lays out on its
cluster, each kind of figure converts to tokens/s as computed by hand, bad files fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from perfmodel.cli import main
from perfmodel.specs import SpecError, load_spec
from perfmodel.specs.flops import flops_per_token
from perfmodel.specs.published import (
    MEASURED_KINDS,
    load_published,
    measured_tokens_per_s,
    parse_published,
    resolve,
)

ROOT = Path(__file__).resolve().parents[3]
DATASET = ROOT / "studies" / "published"
RUNS = {r.name: r for r in load_published(DATASET)}


def test_dataset_size_and_sources():
    assert len(RUNS) >= 12
    assert len({r.source.group for r in RUNS.values()}) >= 4
    assert list(RUNS) == sorted(RUNS)  # load_published sorts by name
    assert len(list(DATASET.glob("*.yaml"))) == len(RUNS)  # one run per file


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_run_resolves(name):
    run = RUNS[name]
    model, cluster, plan = resolve(run, DATASET)  # lays the plan out on the cluster (SpecError otherwise)
    assert plan.precision == run.precision and plan.global_batch >= 1
    assert run.source.url.startswith("https://") and run.source.where and run.assumptions
    tps = measured_tokens_per_s(run, DATASET)
    # a sane training rate: 10 .. 10,000 tokens/s per GPU
    assert 10 < tps / cluster.world_size < 10_000, (name, tps)


def test_every_kind_of_figure_is_used_or_tested():
    used = {r.measured.figure for r in RUNS.values()}
    assert used | {"tokens_per_s"} == set(MEASURED_KINDS)


def test_step_time_by_hand():
    # MegaScale-MoE Table 3, 1,440 GPUs: 720 sequences x 8,192 tokens / 4.19 s
    run = RUNS["megascale-moe-352b-megascale-moe-1440gpu"]
    assert measured_tokens_per_s(run) == pytest.approx(720 * 8192 / 4.19, rel=1e-12)


def test_gpu_hours_by_hand():
    # DeepSeek-V3: 180K H800 GPU hours per trillion tokens on 2,048 GPUs
    run = RUNS["deepseek-v3-h800-2048gpu"]
    assert measured_tokens_per_s(run) == pytest.approx(1e12 / (180_000 * 3600 / 2048), rel=1e-12)
    assert measured_tokens_per_s(run) == pytest.approx(3_160_494, rel=1e-6)


def test_mfu_by_hand():
    # Qwen2-57B-A14B, Megatron-LM's count: 12 L h^2 [(1 + g/a + s/h) q/h + 1.5 (topk f + shared)/h] + 6 V h
    L, h, s, V = 28, 3584, 4096, 151936
    per_layer = (1 + 4 / 28 + s / h) * (28 * 128 / h) + 1.5 * (8 * 2560 + 20480) / h
    flops = 12 * h * h * (L * per_layer + V / (2 * h))
    assert flops == pytest.approx(8.7120e10, rel=1e-4)
    assert flops_per_token(load_spec("qwen2-57b-a14b", "model"), "megatron-lm") == pytest.approx(flops, rel=1e-12)
    run = RUNS["folding-qwen2-57b-a14b-folding-64gpu"]
    assert measured_tokens_per_s(run) == pytest.approx(0.390 * 989.5e12 * 64 / flops, rel=1e-9)


def test_tflops_by_hand():
    # Mixtral-8x22B folding FP8: 631.7 TFLOP/s per GPU on 128 GPUs, Megatron-LM's count
    L, h, s, V = 56, 6144, 4096, 32768
    flops = 12 * h * h * (L * ((1 + 8 / 48 + s / h) * 1 + 1.5 * 2 * 16384 / h) + V / (2 * h))
    run = RUNS["folding-mixtral-8x22b-folding-fp8-128gpu"]
    assert measured_tokens_per_s(run) == pytest.approx(631.7e12 * 128 / flops, rel=1e-9)


def test_palm_convention_by_hand():
    # Llama 3 405B: 6N (N without the input embedding) + 12 L H Q T
    L, h, H, Q, kv, f, V, T = 126, 16384, 128, 128, 8, 53248, 128256, 8192
    layer = h * (H * Q + 2 * kv * Q) + H * Q * h + h + 3 * h * f + h  # qkv, out, 2 norms, SwiGLU
    n = L * layer + V * h + h  # + output projection + final norm (input embedding excluded)
    expected = 6 * n + 12 * L * H * Q * T
    assert flops_per_token(load_spec("llama3-405b", "model"), "palm") == pytest.approx(expected, rel=1e-12)


def test_six_n_and_non_gated_ffn():
    ds = load_spec("deepseek-v3", "model")
    assert flops_per_token(ds, "6n-active") == pytest.approx(6 * 37e9, rel=0.03)
    # a non-gated FFN counts 2 matrices (Megatron's gated multiplier 1): Nemotron-4 340B per token
    nem = load_spec("nemotron-4-340b", "model")
    L, h, s, V = 96, 18432, 4096, 256000
    expected = 12 * h * h * (L * ((1 + 8 / 96 + s / h) * (96 * 192 / h) + 73728 / h) + V / (2 * h))
    assert flops_per_token(nem, "megatron-lm") == pytest.approx(expected, rel=1e-12)
    assert nem.dense_layer_params - nem.attn_params - h == 2 * h * 73728


def test_tokens_per_s_figure_passes_through():
    data = _valid()
    data["measured"] = {"tokens_per_s": 12345.0}
    assert measured_tokens_per_s(parse_published(data, "x.yaml")) == 12345.0


def _valid() -> dict:
    return {"kind": "published_run", "name": "t", "system": "megatron-lm", "precision": "bf16",
            "source": {"title": "T", "url": "https://x", "where": "Table 1", "group": "g"},
            "model": "mixtral-8x7b", "cluster": "h100-dgx-64",
            "plan": {"tp": 2, "ep": 8, "pp": 4, "global_batch": 256},
            "measured": {"step_time_s": 2.0}, "assumptions": ["none"]}


@pytest.mark.parametrize("change,field", [
    ({"measured": {}}, "published_run.measured: give exactly one of"),
    ({"measured": {"step_time_s": 1.0, "mfu": 0.4}}, "published_run.measured: give exactly one of"),
    ({"measured": {"mfu": 0.4, "peak_tflops": 989}}, "published_run.measured: mfu needs flop_convention"),
    ({"measured": {"mfu": 0.4, "flop_convention": "megatron-lm"}}, "peak_tflops"),
    ({"measured": {"tflops_per_gpu": 400, "flop_convention": "guess"}}, "published_run.measured.flop_convention"),
    ({"precision": "fp8"}, "published_run: precision 'fp8' differs from plan.precision"),
    ({"source": {"title": "T"}}, "published_run.source.url"),
    ({"measurd": {}}, "published_run.measurd: unknown key"),
])
def test_bad_file_one_line(tmp_path, change, field):
    import yaml

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**_valid(), **change}))
    with pytest.raises(SpecError) as err:
        load_published(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "bad.yaml") in msg and field in msg, msg


def test_impossible_plan_names_the_field():
    data = _valid()
    data["plan"] = {"tp": 2, "ep": 16, "pp": 4, "global_batch": 256}
    with pytest.raises(SpecError, match="plan.ep"):
        resolve(parse_published(data, "x.yaml"))


def test_validate_cli(tmp_path, capsys):
    import yaml

    assert main(["validate", str(DATASET / "deepseek-v3-h800-2048gpu.yaml")]) == 0
    assert "published_run" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**_valid(), "measured": {}}))
    assert main(["validate", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "measured" in lines[0]
