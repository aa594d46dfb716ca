"""Fuzz every `moeperf` command's arguments in-process: each input works (exit 0) or gives one line
on stderr and exit 2; never a traceback, a hang (60 s guard) or a temp/partial file in --out.

run, compare and search get argv with at least one invalid element (appended last, so argparse
keeps it), and the launch/search entry points are replaced by a trap: reaching one fails the test,
so no fuzzed input starts real work. validate and simulate also get valid inputs (they are fast).
Counts: HYPOTHESIS_PROFILE=big runs 20x the CI examples (figures in docs/reliability.md)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from unittest import mock

import yaml
from cli_harness import SCALE, check
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz_specs import BASES, mutated

CHEAP_CLUSTERS = ["cpu-local-4", "h100-dgx-8", "h100-dgx-64"]
MODELS = ["tiny-moe", "mixtral-8x7b", "deepseek-v3", "qwen3-moe-235b-a22b"]
BAD_TEXT = ["", "\x00\x01\xff", "kind: model\n", "[1, 2", "a: &a [*a]", "- 1\n- 2\n", "kind: plan\ntp: -1\n",
            "kind: plan\nep: 3\n", "kind: plan\nglobal_batch: .nan\n", "kind: study\nplans: 7\n", "{", "!!python/object:os.system x"]
NUMS = ["0", "-1", "1", "2", "nan", "inf", "-inf", "1e3", "99999999999999999999", "0x10", " 3", "", "x", "1.5", "٣"]


class Ws:
    """Materialises file arguments in a per-example temp folder."""

    def __init__(self, root: Path):
        self.root, self.n = root, 0

    def path(self, name: str = "f") -> Path:
        self.n += 1
        return self.root / f"{self.n}-{name}"

    def text(self, text: str | bytes, name: str = "f.yaml") -> str:
        p = self.path(name)
        p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        return str(p)

    def spec(self, data, name: str = "spec.yaml") -> str:
        return self.text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), name)


def file_arg(draw, ws: Ws, kind: str, presets: list[str] = ()) -> str:
    """A file argument: a mutated or valid spec, a preset name, junk, a folder, a missing path."""
    choice = draw(st.sampled_from(["mutated", "valid", "preset", "bad", "bytes", "dir", "missing"]))
    if choice == "mutated" and kind in BASES:
        return ws.spec(draw(mutated(kind)))
    if choice == "valid" and kind in BASES:
        return ws.spec(copy.deepcopy(draw(st.sampled_from(BASES[kind]))))
    if choice == "preset" and presets:
        return draw(st.sampled_from(list(presets)))
    if choice == "bytes":
        return ws.text(draw(st.binary(max_size=64)))
    if choice == "dir":
        d = ws.path("dir")
        d.mkdir()
        return str(d)
    if choice == "missing":
        return str(ws.path("missing.yaml"))
    return ws.text(draw(st.sampled_from(BAD_TEXT)))


def flags(draw, table: dict[str, list[str]]) -> list[str]:
    out: list[str] = []
    for flag in draw(st.lists(st.sampled_from(sorted(table)), max_size=4, unique=True)):
        vals = table[flag]
        out += [flag] if not vals else [flag, draw(st.sampled_from(vals))]
    return out


def run_case(fn):
    with tempfile.TemporaryDirectory(prefix="moeperf-fuzz-") as tmp:
        fn(Ws(Path(tmp)), Path(tmp))


def trap(what: str):
    def boom(*_a, **_k):
        raise AssertionError(f"fuzzed input reached {what}: an invalid input was not caught before real work")
    return boom


EX = lambda n: settings(max_examples=n * SCALE)  # noqa: E731


# ------------------------------------------------------------------------- validate, presets
def _validates(data) -> bool:
    from perfmodel.specs import SpecError
    from perfmodel.specs.validate import validate_file

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "spec.yaml"
        p.write_text(yaml.safe_dump(data, sort_keys=False))
        try:
            validate_file(str(p), None)
            return True
        except SpecError:
            return False


VALID_BASES = {k: [b for b in bases if _validates(copy.deepcopy(b))] for k, bases in BASES.items()}


@EX(150)
@given(st.data())
def test_validate(data):
    def case(ws: Ws, tmp: Path):
        valid = data.draw(st.booleans())  # half the inputs: only valid files (they must pass)
        files = [ws.spec(copy.deepcopy(data.draw(st.sampled_from(VALID_BASES[k])))) if valid else
                 file_arg(data.draw, ws, k, MODELS)
                 for k in data.draw(st.lists(st.sampled_from(sorted(BASES)), min_size=1, max_size=3))]
        extra = flags(data.draw, {"--kind": ["model", "plan", "study", "cluster", "profile", "bogus", ""],
                                  "--json": [], "--bogus": [], "-x": []})
        rc, _, _ = check(["validate", *data.draw(st.permutations(files + extra))] if "--kind" not in extra else
                         ["validate", *extra, *files], tmp)
        assert rc == 0 or not valid or extra, "valid files refused"
    run_case(case)


@EX(60)
@given(st.lists(st.sampled_from(["--json", "--kind", "model", "cluster", "profile", "study", "bogus", "--bogus",
                                 "-h", "x", ""]), max_size=4))
def test_presets(argv):
    run_case(lambda ws, tmp: check(["presets", *argv], tmp))


# ------------------------------------------------------------------------- simulate
VALID_PLANS = [{"kind": "plan", "global_batch": 256, **p} for p in (
    {}, {"ep": 2}, {"tp": 2, "ep": 2}, {"sp": 2, "ep": 2, "micro_batch": 2}, {"pp": 2, "ep": 2},
    {"pp": 2, "vpp": 2, "schedule": "interleaved", "recompute": "full"},
    {"ep": 2, "overlap": {"inter_op": True, "intra_op": "chunk", "chunks": 2}, "compression": {"dispatch": "fp8"}},
    {"sp": 2, "overlap": {"intra_op": "tile", "grad_sync": True}, "compression": {"grad_sync": "bf16"}})]
@EX(150)
@given(st.data())
def test_simulate(data):
    def case(ws: Ws, tmp: Path):
        d = data.draw
        mode = d(st.sampled_from(["valid", "study", "fuzz"]))
        if mode == "valid":  # presets and plans that lay out: must simulate (fits or not), exit 0
            argv = ["simulate", "--model", d(st.sampled_from(MODELS)), "--cluster", d(st.sampled_from(CHEAP_CLUSTERS)),
                    "--plan", ws.spec(d(st.sampled_from(VALID_PLANS)))]
            argv += flags(d, {"--json": [], "--trace": [str(tmp / "out" / "t.json")], "--profile": ["h100-sxm", "h200"]})
            rc, out, _ = check(argv, tmp)
            assert rc == 0 or "plan" in _, _
            return
        if mode == "study":
            argv = ["simulate", file_arg(d, ws, "study")]
            argv += flags(d, {"--json": [], "--trace": [str(tmp / "t.json")], "--model": ["tiny-moe"]})
        else:
            argv = ["simulate", "--model", d(st.sampled_from(MODELS)) if d(st.booleans()) else file_arg(d, ws, "model", MODELS),
                    "--cluster", d(st.sampled_from(CHEAP_CLUSTERS)) if d(st.booleans())
                    else file_arg(d, ws, "cluster", CHEAP_CLUSTERS),
                    "--plan", file_arg(d, ws, "plan")]
            argv += flags(d, {"--json": [], "--trace": [str(tmp / "out" / "t.json"), str(tmp), str(tmp / "t.json")],
                              "--profile": ["h100-sxm", "cpu", "nope", ws.spec(d(mutated("profile")))],
                              "--bogus": [], "-q": []})
            if d(st.booleans()):  # drop one required flag
                i = d(st.sampled_from([1, 3, 5]))
                argv = argv[:i] + argv[i + 2:]
        check(argv, tmp)
    run_case(case)


# ------------------------------------------------------------------------- search (never reaches a search)
STUDY_OK = {"kind": "study", "name": "s", "model": "tiny-moe", "cluster": "cpu-local-4", "global_batch": 8,
            "plans": [{"name": "a", "ep": 4}], "search": {"ep": [1, 2]}}


@EX(120)
@given(st.data())
def test_search_invalid(data):
    def case(ws: Ws, tmp: Path):
        d = data.draw
        out_file = ws.text("not a folder", "file")
        study = d(st.sampled_from([ws.spec(STUDY_OK), file_arg(d, ws, "study"), "megascale-moe-352b"]))
        argv = ["search", study] + flags(d, {"--jobs": NUMS, "--top": NUMS, "--json": [], "--quiet": [],
                                             "--out": [str(tmp / "o"), out_file]})
        bad = d(st.sampled_from([
            ["--jobs", d(st.sampled_from(["0", "-1", "1025", "x", "nan", "99999999999999999999", ""]))],
            ["--top", d(st.sampled_from(["0", "-3", "10001", "1.5", "inf"]))],
            ["--out", out_file], ["--bogus"], ["--jobs"], [file_arg(d, ws, "study")][:0] + ["extra-arg", "more"],
        ]))
        if d(st.booleans()):  # or the study itself is broken
            argv[1] = ws.text(d(st.sampled_from(BAD_TEXT + ["kind: study\nmodel: tiny-moe\n"])))
            bad = []
        with mock.patch("perfmodel.search.run_search", trap("run_search")):
            check(argv + bad, tmp / "o", allow_ok=False)
    run_case(case)


# ------------------------------------------------------------------------- run (never launches)
RUN_BAD = [["--nproc", "0"], ["--nproc", "-4"], ["--nproc", "99999999999999999999"], ["--nproc", "x"],
           ["--steps", "0"], ["--steps", "-1"], ["--steps", "1.5"], ["--lr", "nan"], ["--lr", "inf"], ["--lr", "-1e-3"],
           ["--seed", "-1"], ["--scale", "0"], ["--scale", "nan"], ["--warmup", "-1"], ["--max-restarts", "-2"],
           ["--pg-timeout-s", "nan"], ["--profile-steps", "5:3"], ["--profile-steps", "x"], ["--nnodes", "x"],
           ["--layers", "0"], ["--seq-len", "-8"], ["--ckpt-every", "-1"], ["--bogus"], ["--nproc"], ["positional"],
           ["--resume"], ["--data", "/nonexistent/corpus.txt"], ["--inject-failure"], ["--inject-failure", "a:b"]]


@EX(150)
@given(st.data())
def test_run_invalid(data):
    def case(ws: Ws, tmp: Path):
        d = data.draw
        plan_ok = ws.text("kind: plan\nsp: 2\nep: 2\nglobal_batch: 8\nmicro_batch: 2\n")
        argv = ["run", "--model", d(st.sampled_from(["tiny-moe", file_arg(d, ws, "model", MODELS)])),
                "--plan", d(st.sampled_from([plan_ok, file_arg(d, ws, "plan")])), "--out", str(tmp / "o")]
        argv += flags(d, {"--nproc": ["4", "2", "1"] + NUMS, "--steps": ["3"] + NUMS, "--lr": NUMS, "--seed": NUMS,
                          "--scale": ["0.5"] + NUMS, "--seq-len": ["32"], "--ckpt-every": ["1", "0"]})
        bad = d(st.sampled_from(RUN_BAD + [["--plan", file_arg(d, ws, "plan")][:0] + ["--plan", ws.text(
            d(st.sampled_from(BAD_TEXT)))], ["--model", ws.text(d(st.sampled_from(BAD_TEXT)))],
            ["--out", ws.text("file", "f")], ["--plan", str(tmp)]]))
        with mock.patch("runtime.launch._launch", trap("torchrun")):
            check(argv + bad, allow_ok=False)
        assert not (tmp / "o").exists() or not list((tmp / "o").glob("failures/*"))
    run_case(case)


# ------------------------------------------------------------------------- compare (never runs a plan)
STUDY_CMP = {"kind": "study", "name": "c", "model": "tiny-moe", "cluster": "cpu-local-4", "world_size": 2,
             "global_batch": 4, "plans": [{"name": "dp2", "calibrate": True}, {"name": "ep2", "ep": 2}]}


@EX(120)
@given(st.data())
def test_compare_invalid(data):
    def case(ws: Ws, tmp: Path):
        d = data.draw
        study = d(st.sampled_from([ws.spec(STUDY_CMP), file_arg(d, ws, "study")]))
        argv = ["compare", study, "--out", str(tmp / "o"), "--traces", str(tmp / "traces")]
        argv += flags(d, {"--steps": NUMS, "--profile-steps": ["5:6", "1:1", "0:1", "3:2", "a:b", "1:2:3", ""],
                          "--json": [], "--rerun": [], "--timeline-plan": ["dp2", "nope"], "--repeats": NUMS})
        bad = d(st.sampled_from([["--steps", "0"], ["--steps", "-2"], ["--steps", "x"], ["--steps", "4", "--profile-steps", "5:6"],
                                 ["--profile-steps", "x:y"], ["--profile-steps", "0:0"], ["--timeline-plan", "nope"],
                                 ["--repeats", "0"], ["--repeats", "21"], ["--repeats", "two"],
                                 ["--out", ws.text("file")], ["--traces", ws.text("file")], ["--bogus"],
                                 [], ]))
        if not bad:  # the study is the invalid element
            argv[1] = d(st.sampled_from([ws.text(d(st.sampled_from(BAD_TEXT))), str(tmp / "missing.yaml"), str(tmp),
                                         ws.spec({**STUDY_CMP, "plans": [{"name": "x", "ep": 3, "calibrate": True}]}),
                                         ws.spec({**STUDY_CMP, "plans": [{"name": "x"}]})]))
        with mock.patch("perfmodel.compare.run_plan", trap("run_plan")):
            check(argv + bad, tmp / "o", allow_ok=False)
    run_case(case)
