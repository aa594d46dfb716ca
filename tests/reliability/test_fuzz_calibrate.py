"""Fuzz `moeperf calibrate` inputs: a real recorded run (rank traces + meta.yaml, made in-process with
runtime.profiling) corrupted every way (truncated or binary JSON, wrong schema, junk event fields,
meta.yaml of the wrong kind or with junk model/plan/world_size), plus bad flags. Each case writes a
profile (exit 0) or gives one line and exit 2; never a traceback or a partial profile file."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from cli_harness import SCALE, check
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz_specs import junk, mutated

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from torch.profiler import record_function

    from perfmodel.specs import PlanSpec, load_spec
    from runtime.profiling import StepProfiler

    out = tmp_path_factory.mktemp("traces") / "run-1"
    for rank in (0, 1):  # two ranks of an ep=2 plan, op spans of several sizes
        prof = StepProfiler.create("2:3", out, rank, 2, load_spec("tiny-moe", "model"), PlanSpec(ep=2, global_batch=2),
                                   "cpu-local-4")
        for step in range(1, 5):
            prof.begin(step)
            for n in (64, 128, 256):
                w = torch.nn.Parameter(torch.randn(n, n) * 0.02)
                with record_function("moe.fc1/fwd"):
                    y = torch.randn(n, n) @ w
                with record_function("moe.dispatch_a2a/fwd"):
                    y = y * 1.0
                with record_function("moe.permute/fwd"):
                    y = y + 1.0
                y.sum().backward()
            prof.end(step, 0.01 * step)
        prof.close()
    return out


def _mutate_json(draw, text: str) -> bytes:
    how = draw(st.sampled_from(["truncate", "binary", "schema", "event", "events-type", "empty"]))
    if how == "truncate":
        return text.encode()[: draw(st.integers(0, len(text) - 1))]
    if how == "binary":
        return draw(st.binary(min_size=1, max_size=200))
    if how == "empty":
        return b""
    data = json.loads(text)
    if how == "schema":
        return json.dumps(draw(junk)).encode()
    if how == "events-type":
        data["traceEvents"] = draw(junk)
        return json.dumps(data).encode()
    evs = data["traceEvents"]
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(evs) - 1))
        if isinstance(evs[i], dict) and evs[i] and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(evs[i]) + ["ts", "dur", "ph", "args", "name", "pid", "tid"]))
            evs[i][key] = draw(junk)
        else:
            evs[i] = draw(junk)
    return json.dumps(data).encode()


def _mutate_meta(draw, meta: dict) -> bytes:
    how = draw(st.sampled_from(["field", "model", "plan", "drop", "text"]))
    meta = copy.deepcopy(meta)
    if how == "field":
        meta[draw(st.sampled_from(["model", "plan", "cluster", "world_size", "profile_steps", "step_times_s"]))] = draw(junk)
    elif how in ("model", "plan"):
        meta[how] = draw(mutated(how))
    elif how == "drop":
        meta.pop(draw(st.sampled_from(sorted(meta))), None)
    else:
        return draw(st.sampled_from([b"", b"\xff\xfe", b"- 1\n", b"a: [", b"world_size: 2\n"]))
    return yaml.safe_dump(meta).encode()


@settings(max_examples=100 * SCALE)
@given(st.data())
def test_calibrate_fuzzed_traces(run_dir, data):
    d = data.draw
    with tempfile.TemporaryDirectory(prefix="moeperf-fuzz-") as tmp:
        tmp = Path(tmp)
        run = tmp / "run"
        shutil.copytree(run_dir, run)
        target = d(st.sampled_from(["rank0.json", "rank1.json", "meta.yaml", "both", "none"]))
        if target in ("rank0.json", "rank1.json", "both"):
            name = "rank0.json" if target == "both" else target
            (run / name).write_bytes(_mutate_json(d, (run_dir / name).read_text()))
        if target in ("meta.yaml", "both"):
            (run / "meta.yaml").write_bytes(_mutate_meta(d, yaml.safe_load((run_dir / "meta.yaml").read_text())))
        out = tmp / "prof" / "profile.yaml"
        argv = ["calibrate", str(run), "--out", d(st.sampled_from([str(out), str(out), str(tmp)]))]
        argv += d(st.sampled_from([["--no-figures"], ["--no-figures", "--json"], ["--no-figures", "--base", "h100-sxm"],
                                   ["--no-figures", "--base", "nope"], ["--no-figures", "--bogus"],
                                   ["--no-figures", str(tmp / "missing")], ["--no-figures", str(tmp)]]))
        rc, _, _ = check(argv, tmp / "prof")
        if rc == 0 and argv[3] == str(out):
            yaml.safe_load(out.read_text())  # a whole profile
        if target == "none" and "--bogus" not in argv and "nope" not in argv and str(tmp / "missing") not in argv \
                and argv[3] == str(out) and argv[-1] != str(tmp):
            assert rc == 0, "the untouched run must calibrate"


def test_calibrate_bad_input_as_subprocess(run_dir, tmp_path):
    """A handful through the real entry point (python -m perfmodel.cli): exit 2, one line, no traceback."""
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    (bad / "rank1.json").write_bytes(b"\x00\xff{")
    cases = [["calibrate", str(bad), "--out", str(tmp_path / "p.yaml")],
             ["simulate", "--model", "tiny-moe", "--cluster", "cpu-local-4", "--plan", str(bad / "rank1.json")],
             ["search", str(bad / "meta.yaml"), "--jobs", "0"], ["validate", str(bad)], ["frobnicate"]]
    for argv in cases:
        proc = subprocess.run([sys.executable, "-m", "perfmodel.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (argv, proc.stderr)
    assert not (tmp_path / "p.yaml").exists()
