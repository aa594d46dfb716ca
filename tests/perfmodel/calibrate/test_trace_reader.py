"""The trace reader on real torch.profiler traces of a tiny model, on simulator-style traces and on junk."""

from __future__ import annotations

import json

import pytest

from perfmodel.calibrate.trace_reader import load_events, rank_files, read_trace
from perfmodel.specs import SpecError

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


def test_gpu_trace_kernel_time_and_device_copies_of_spans(tmp_path):
    """GPU traces: op time is the kernels' device time (linked by correlation, through runtime or
    driver launches), and the profiler's gpu_user_annotation copies of the spans (ProfilerStep#N
    included) on the GPU timeline are not a second CPU thread: one step, not two."""
    def x(name, cat, ts, dur, tid=1, **args):
        return {"ph": "X", "name": name, "cat": cat, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}
    ev = [x("ProfilerStep#6", "user_annotation", 0, 1000),
          x("moe.fc1/fwd", "user_annotation", 10, 100),
          x("aten::mm", "cpu_op", 12, 50),
          x("cuLaunchKernelEx", "cuda_driver", 20, 5, correlation=7),
          x("attn.proj/fwd", "user_annotation", 200, 50),
          x("cudaLaunchKernel", "cuda_runtime", 210, 5, correlation=8),
          x("nvjet_gemm", "kernel", 30, 300, tid=7, correlation=7),
          x("elementwise", "kernel", 400, 40, tid=7, correlation=8),
          x("ProfilerStep#6", "gpu_user_annotation", 25, 700, tid=7),
          x("moe.fc1/fwd", "gpu_user_annotation", 30, 300, tid=7)]
    p = tmp_path / "rank0.json"
    p.write_text(json.dumps({"traceEvents": ev}))
    tr = read_trace(p)
    assert tr.device and tr.n_steps == 1
    assert tr.op_us == {"moe.fc1/fwd": 300.0, "attn.proj/fwd": 40.0}
