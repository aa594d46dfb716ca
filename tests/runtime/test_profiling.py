"""runtime/profiling.py: traces of steps A..B with op-graph args, meta.yaml, and the --profile-steps parser."""

from __future__ import annotations

import json

import pytest

from perfmodel.calibrate.trace_reader import read_run
from perfmodel.specs import PlanSpec, SpecError, load_spec

torch = pytest.importorskip("torch")
from runtime.profiling import StepProfiler, parse_steps  # noqa: E402


def test_parse_steps():
    assert parse_steps("3:5") == (3, 5) and parse_steps(None) is None and parse_steps("") is None
    for bad in ("5:3", "0:2", "x", "1:2:3"):
        with pytest.raises(SpecError, match="--profile-steps"):
            parse_steps(bad)
    with pytest.raises(SpecError, match="needs --out"):
        StepProfiler.create("1:2", None, 0, 1)


def test_profiled_steps_write_annotated_trace_and_meta(tmp_path):
    from torch.profiler import record_function

    model, plan = load_spec("tiny-moe", "model"), PlanSpec(ep=2, global_batch=2)
    out = tmp_path / "run-1"
    prof = StepProfiler.create("2:3", out, 0, 2, model, plan, "cpu-local-4")  # rank 0 of 2
    w = torch.nn.Parameter(torch.randn(128, 256) * 0.02)
    x = torch.randn(128, 128)
    for step in range(1, 5):
        prof.begin(step)
        for _ in range(2):  # two "layers"
            with record_function("moe.fc1/fwd"):
                y = x @ w
            with record_function("moe.dispatch_a2a/fwd"):
                y = y * 1.0
            y.sum().backward()
        prof.end(step, 0.01 * step)
    prof.close()
    meta, traces = read_run(out)
    assert meta["world_size"] == 2 and meta["profile_steps"] == [2, 3] and meta["cluster"] == "cpu-local-4"
    assert meta["model"]["name"] == "tiny-moe" and meta["plan"]["global_batch"] == 2
    assert meta["step_times_s"] == [0.04] and meta["profiled_step_times_s"] == [0.02, 0.03]
    assert {"torch", "python", "moeperf"} <= set(meta["versions"]) and meta["host"]
    tr = traces[0]
    assert len(tr.steps) == 2
    ops = tr.op_seconds_per_step()
    assert ops["moe.fc1/fwd"] > 0 and ops["moe.fc1/wgrad"] > 0
    fc1 = [s for s in tr.spans if s.event == "moe.fc1/fwd"]
    assert len(fc1) == 4
    assert fc1[0].args["flops"] > 0 and fc1[0].args["rank"] == 0 and fc1[0].args["shapes"]
    assert [s.args["layer"] for s in fc1[:2]] == [0, 1]  # tiny-moe has 4 MoE layers on this stage
    a2a = next(s for s in tr.spans if s.event == "moe.dispatch_a2a/fwd")
    assert a2a.args["collective"] == "all_to_all" and "bytes_per_rank" in a2a.args
    json.loads((out / "rank0.json").read_text())  # plain JSON, opens in Perfetto
