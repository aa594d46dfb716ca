"""The trace reader on real torch.profiler traces of a tiny model, on simulator-style traces and on junk."""

from __future__ import annotations

import json

import pytest

from perfmodel.specs import SpecError
from perfmodel.trace_reader import load_events, rank_files, read_trace

torch = pytest.importorskip("torch")


class _Comm(torch.autograd.Function):
    """Stands in for a collective: its backward is a named span, as a runtime could write it."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        with torch.profiler.record_function("moe.combine_a2a/dgrad"):
            return g * 1.0


def _tiny_trace(path, steps=2, recompute=False):
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(64, 32) * 0.1)
    w2 = torch.nn.Parameter(torch.randn(32, 64) * 0.1)
    x = torch.randn(4, 48, 32, requires_grad=True)

    def ffn(y):
        with record_function("moe.fc1/fwd"):
            h = torch.nn.functional.linear(y, w1)
        with record_function("moe.act/fwd"):
            h = torch.nn.functional.silu(h)
        with record_function("moe.fc2/fwd"):
            return torch.nn.functional.linear(h, w2)

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(steps):
            with record_function(f"ProfilerStep#{i}"):
                with record_function("moe.norm/fwd"):
                    y = torch.nn.functional.rms_norm(x, (32,))
                if recompute:
                    o = torch.utils.checkpoint.checkpoint(ffn, y, use_reentrant=False)
                else:
                    o = ffn(y)
                with record_function("moe.combine_a2a/fwd"):
                    o = _Comm.apply(o)
                with record_function("some.unknown.region"):
                    loss = o.square().mean()
                loss.backward()
    prof.export_chrome_trace(str(path))
    return path


def test_forward_backward_and_wgrad_are_named(tmp_path):
    tr = read_trace(_tiny_trace(tmp_path / "rank0.json"))
    ops = tr.op_seconds_per_step()
    for ev in ("moe.norm/fwd", "moe.fc1/fwd", "moe.fc1/dgrad", "moe.fc1/wgrad", "moe.act/fwd", "moe.act/dgrad",
               "moe.fc2/fwd", "moe.fc2/dgrad", "moe.fc2/wgrad", "moe.combine_a2a/fwd", "moe.combine_a2a/dgrad"):
        assert ops.get(ev, 0) > 0, ev
    assert tr.source == "torch" and len(tr.steps) == 2 and not tr.device
    # exclusive attribution: named time never exceeds the steps' wall time
    assert sum(ops.values()) <= sum(tr.step_times_s()) / 2 * 1.0001
    assert tr.unattributed_us >= 0
    # the backward of the custom Function is named by its own span, not charged to its forward op twice
    counts = tr.counts_per_step()
    assert counts["moe.combine_a2a/dgrad"] == 1 and counts["moe.fc1/fwd"] == 1


def test_recomputed_forward_is_phase_recompute(tmp_path):
    tr = read_trace(_tiny_trace(tmp_path / "rank0.json", recompute=True))
    ops = tr.op_seconds_per_step()
    assert ops.get("moe.fc1/recompute", 0) > 0 and ops.get("moe.fc1/fwd", 0) > 0
    assert ops.get("moe.fc2/wgrad", 0) > 0


def test_simulator_style_trace(tmp_path):
    ev = [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "sim"}},
          {"ph": "X", "name": "moe.fc1/fwd", "pid": 1, "tid": 1, "ts": 0, "dur": 10, "args": {"flops": 1e6}},
          {"ph": "X", "name": "moe.dispatch_a2a/fwd", "pid": 1, "tid": 2, "ts": 5, "dur": 20},
          {"ph": "X", "name": "whatever", "pid": 1, "tid": 1, "ts": 30, "dur": 5},
          {"ph": "i", "name": "marker", "pid": 1, "tid": 1, "ts": 3}]
    p = tmp_path / "sim.json"
    p.write_text(json.dumps({"traceEvents": ev}))
    tr = read_trace(p)
    assert tr.source == "sim" and tr.n_steps == 1
    assert tr.op_us == {"moe.fc1/fwd": 10.0, "moe.dispatch_a2a/fwd": 20.0}
    assert tr.spans[0].args["flops"] == 1e6
    # a bare list of events is a Chrome trace too
    p.write_text(json.dumps(ev))
    assert read_trace(p).op_us["moe.fc1/fwd"] == 10.0


@pytest.mark.parametrize("content", ["", "not json", "{\"a\": 1}", "[1, 2]", "{\"traceEvents\": 3}"])
def test_not_a_trace_is_a_clear_error(tmp_path, content):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(SpecError, match="bad.json: not a Chrome trace"):
        load_events(p)


def test_missing_file_and_empty_dir(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        read_trace(tmp_path / "nope.json")
    with pytest.raises(SpecError, match="no rank<k>.json"):
        rank_files(tmp_path)
