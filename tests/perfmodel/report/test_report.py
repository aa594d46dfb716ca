"""The search report: files exist and parse, are byte-identical across --jobs, and the
`moeperf search` command (default study resolution, bad input -> exit 2)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from fakes import STUDY_YAML, sim_for_tests, tiny_study

from perfmodel import cli
from perfmodel.report import CSV_COLUMNS, write_report
from perfmodel.search import run_search
from perfmodel.search.cli import DEFAULT_STUDY, default_out, load_study, resolve_study, study_variants
from perfmodel.specs import load_spec
from perfmodel.specs.layout import plan_layout

REPO = Path(__file__).resolve().parents[3]
def _report(out: Path, jobs: int) -> Path:
    study = tiny_study()
    res = run_search(study, study_variants(study, "tiny"), jobs=jobs, simulate_fn=sim_for_tests())
    return write_report(res, out, top=5, simulate_fn=sim_for_tests())


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    return _report(tmp_path_factory.mktemp("rep") / "out", jobs=1)


def test_report_files_exist_and_parse(report_dir):
    names = {p.name for p in report_dir.iterdir()}
    assert {"plans.csv", "report.md", "report.html", "best_plan.yaml", "best_timeline.json",
            "throughput_memory.png", "breakdown.png", "layer_gantt.png", "pipeline.png"} <= names
    with open(report_dir / "plans.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {r["status"] for r in rows} >= {"ok", "invalid"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(float(r["tokens_per_s"]) > 0 and float(r["step_time_s"]) > 0 for r in ok)
    assert all(r["reason"] for r in rows if r["status"] == "invalid")
    assert [r["name"] for r in rows if r["fixed"] == "True"] == ["megatron-lm", "megascale-moe"]
    best = min(ok, key=lambda r: int(r["rank"]))
    plan = load_spec(report_dir / "best_plan.yaml", "plan")
    assert plan.name == best["name"]
    model, cluster = load_spec("mixtral-8x7b", "model"), load_spec("h100-dgx-64", "cluster")
    plan_layout(plan, model, cluster.world_size)
    r = sim_for_tests()(model, cluster, plan, cluster.profile())
    assert r.tokens_per_s == pytest.approx(float(best["tokens_per_s"]), rel=1e-5)
    trace = json.loads((report_dir / "best_timeline.json").read_text())
    assert any(e.get("ph") == "X" for e in trace["traceEvents"])
    for png in report_dir.glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png


def test_report_text_has_reference_winner_and_embedded_figures(report_dir):
    md = (report_dir / "report.md").read_text()
    assert "Predicted vs paper" in md and "speedup megascale-moe / megatron-lm" in md
    # the presets carry a +-17 % band: plans within it of the top one tie, and the report says so
    assert "within the model's error of the winner" in md and "## Top 5 plans" in md
    assert ("What made the winner win" in md) != ("What made the top-ranked plan (one of the tied candidates)" in md)
    html = (report_dir / "report.html").read_text()
    pngs = len(list(report_dir.glob("*.png")))
    assert html.count('src="data:image/png;base64,') == pngs
    assert "http" not in html.split("<body>")[0]  # self-contained: nothing fetched


def test_same_search_gives_byte_identical_files_with_jobs_1_and_2(report_dir, tmp_path):
    other = _report(tmp_path / "two", jobs=2)
    for p in sorted(report_dir.iterdir()):
        assert (other / p.name).read_bytes() == p.read_bytes(), p.name


def test_cli_search_writes_the_report_and_json(tmp_path, capsys):
    study = tmp_path / "tiny.yaml"
    study.write_text(STUDY_YAML)
    assert cli.main(["search", str(study), "--jobs", "2", "--quiet", "--json", "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["study"] == "tiny-search" and len(out["top"]) == 3 and out["evaluated"] > 10
    assert Path(out["out"]) == tmp_path / "tiny-search"  # default: beside the study
    assert (tmp_path / "tiny-search" / "report.html").is_file()
    fixed_only = tmp_path / "fixed.yaml"  # no search: block, just the fixed plans (fast)
    fixed_only.write_text(STUDY_YAML.split("search:")[0])
    assert cli.main(["search", str(fixed_only), "--out", str(tmp_path / "o"), "--jobs", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "megascale-moe" in printed


@pytest.mark.parametrize("args", [
    ["no-such-study.yaml"],
    ["{dir}"],
    ["{bad}"],
    ["{impossible}"],
    ["{good}", "--jobs", "0"],
    ["{good}", "--top", "0"],
    ["{good}", "--bogus"],
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args):
    (tmp_path / "bad.yaml").write_text(STUDY_YAML.replace("global_batch: 64", "global_bach: 64"))
    (tmp_path / "impossible.yaml").write_text(STUDY_YAML.replace("{name: megatron-lm, tp: 2,", "{name: megatron-lm, tp: 3,"))
    (tmp_path / "good.yaml").write_text(STUDY_YAML)
    argv = [a.format(dir=tmp_path, bad=tmp_path / "bad.yaml", impossible=tmp_path / "impossible.yaml",
                     good=tmp_path / "good.yaml") for a in args]
    assert cli.main(["search", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeperf: error:") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "tiny-search").exists(), "no partial report on bad input"


def test_default_study_is_package_data_and_the_repo_copy_is_the_same_file(tmp_path, monkeypatch):
    path, packaged = resolve_study(None)
    assert packaged and path.is_file() and path.stem == DEFAULT_STUDY
    assert "perfmodel/presets/studies" in path.as_posix()
    assert (REPO / "studies" / f"{DEFAULT_STUDY}.yaml").samefile(path)
    study, p, pk = load_study(DEFAULT_STUDY)
    assert pk and study.name == DEFAULT_STUDY and study.baseline == "megatron-lm"
    assert {pl.name for pl in study.plans} == {"megascale-moe", "megatron-lm"}
    assert study.reference["speedup"] == pytest.approx(1.88)
    monkeypatch.chdir(tmp_path)
    assert default_out(study, p, pk) == tmp_path / "studies" / DEFAULT_STUDY


def test_every_shipped_study_validates():
    for f in sorted((REPO / "studies").glob("*.yaml")):
        study, path, _ = load_study(str(f))
        assert study_variants(study, str(path), path.parent), f
    for name in (DEFAULT_STUDY, "what-if-network", "mixtral-8x7b-h100-64"):  # the search studies
        study = load_study(str(REPO / "studies" / f"{name}.yaml"))[0]
        assert study.search is not None and study.baseline and len(study.plans) >= 2, name
    what_if = load_study(str(REPO / "studies" / "what-if-network.yaml"))[0]
    assert len(what_if.variants) == 6


def test_a_space_without_any_valid_plan_reports_why_and_leaves_no_stale_best(tmp_path, capsys):
    study = tmp_path / "allbad.yaml"
    study.write_text("kind: study\nname: allbad\nmodel: mixtral-8x7b\ncluster: h100-dgx-64\nglobal_batch: 64\n"
                     "search:\n  ep: [3, 5]\n")
    out = tmp_path / "allbad"
    out.mkdir()
    (out / "best_plan.yaml").write_text("kind: plan\n")  # left by an earlier run
    assert cli.main(["search", str(study), "--quiet"]) == 0
    assert "no plan was simulated successfully" in capsys.readouterr().out
    with open(out / "plans.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["invalid", "invalid"]
    assert all("does not divide" in r["reason"] for r in rows)
    assert not (out / "best_plan.yaml").exists() and (out / "report.md").is_file()
