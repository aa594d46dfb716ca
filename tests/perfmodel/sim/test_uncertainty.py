"""Error bands (perfmodel/sim/uncertainty.py): band math, formatting, ties, the `uncertainty` profile
block, and the band in simulate --json, plans.csv, the search report and compare's own band."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math

import pytest
import yaml
from fakes import fake_simulate

from perfmodel.cli import main as cli
from perfmodel.compare import held_out_band
from perfmodel.compare.out import report_md
from perfmodel.report import CSV_COLUMNS, plans_csv, summary_json
from perfmodel.report.doc import Doc, fill_sections
from perfmodel.search import run_search
from perfmodel.search.cli import study_variants
from perfmodel.sim.uncertainty import (
    NO_BAND,
    band,
    fmt_tokens,
    from_residuals,
    halfwidth_pct,
    log_halfwidth,
    tie_set,
    z_for,
)
from perfmodel.specs import SpecError, StudySpec, UncertaintySpec, load_spec, parse_spec, with_overrides

UNC = {"confidence": 0.9, "loo_log_rms": 0.071, "log_halfwidth": 0.117, "n_runs": 16, "method": "test"}


def test_band_math():
    assert z_for(0.9) == pytest.approx(1.6449, abs=1e-4) and z_for(0.95) == pytest.approx(1.95996, abs=1e-4)
    unc = UncertaintySpec(**UNC)
    w = 1.6448536 * 0.071
    assert log_halfwidth(unc) == pytest.approx(w, rel=1e-6)
    low, high = band(1.78e6, unc)
    assert low == pytest.approx(1.78e6 * math.exp(-w)) and high == pytest.approx(1.78e6 * math.exp(w))
    assert math.log(high / 1.78e6) == pytest.approx(-math.log(low / 1.78e6))  # symmetric in log space
    assert halfwidth_pct(unc) == pytest.approx(100 * (math.exp(w) - 1))
    assert band(1e6, None) == (None, None)
    with pytest.raises(ValueError):
        z_for(1.0)


def test_formatting():
    unc = UncertaintySpec(**UNC)
    assert fmt_tokens(1.78e6, unc) == "1.78 M ± 12 %"
    assert fmt_tokens(1.78e6) == "1.78 M" and fmt_tokens(56002.7) == "56.0 k" and fmt_tokens(950.4) == "950"
    assert fmt_tokens(1.405e6) == "1.41 M" and fmt_tokens(123456.0) == "123 k" and fmt_tokens(1.2345e9) == "1,234 M"
    small = UncertaintySpec(confidence=0.9, loo_log_rms=0.036, n_runs=5)
    assert fmt_tokens(2e6, small) == "2.00 M ± 6 %"


def test_tie_set_is_the_winners_band():
    unc = UncertaintySpec(**UNC)
    w = log_halfwidth(unc)
    preds = [100.0, 100.0 * math.exp(-w) + 1e-9, 100.0 * math.exp(-w) - 1e-6, 100.0 * math.exp(-1.5 * w)]
    ties = tie_set(preds, unc, tokens=lambda x: x)
    assert ties == preds[:2]  # within w of the winner; a plan only inside 2w does not tie
    assert tie_set(preds, None, tokens=lambda x: x) == [100.0] and tie_set([], unc) == []


def test_the_profile_block_is_validated_naming_the_field():
    prof = load_spec("cpu", "profile")
    assert prof.uncertainty is None
    ok = with_overrides(prof, {"uncertainty": UNC}, "t")
    assert ok.uncertainty.n_runs == 16
    assert with_overrides(prof, {"uncertainty": {**UNC, "log_halfwidth": None}}, "t").uncertainty.log_halfwidth is None
    data = prof.model_dump(mode="json")
    for bad, field in (({"log_halfwidth": 0.2}, "log_halfwidth"), ({"n_runs": 1}, "n_runs"),
                       ({"confidence": 1.0}, "confidence"), ({"loo_log_rms": -0.1}, "loo_log_rms"),
                       ({"bogus": 1}, "bogus")):
        with pytest.raises(SpecError) as exc:
            parse_spec({**data, "uncertainty": {**UNC, **bad}}, "profile", "p.yaml")
        msg = str(exc.value)
        assert "profile.uncertainty" in msg and field in msg and "\n" not in msg, msg


def test_simulate_json_has_null_band_without_and_the_band_with_a_calibrated_profile(tmp_path, capsys):
    plan = tmp_path / "p.yaml"
    plan.write_text("kind: plan\nname: p\nep: 4\nglobal_batch: 8\n")
    args = ["simulate", "--model", "tiny-moe", "--cluster", "cpu-local-4", "--plan", str(plan)]
    assert cli(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens_per_s_low"] is None and out["tokens_per_s_high"] is None
    prof = with_overrides(load_spec("cpu", "profile"), {"uncertainty": UNC}, "t")
    (tmp_path / "prof.yaml").write_text(yaml.safe_dump(prof.model_dump(mode="json", exclude_none=True)))
    assert cli(args + ["--profile", str(tmp_path / "prof.yaml"), "--json"]) == 0
    banded = json.loads(capsys.readouterr().out)
    w = log_halfwidth(prof.uncertainty)
    assert banded["tokens_per_s"] == out["tokens_per_s"]
    assert banded["tokens_per_s_low"] == pytest.approx(out["tokens_per_s"] * math.exp(-w), rel=1e-8)
    assert banded["tokens_per_s_high"] == pytest.approx(out["tokens_per_s"] * math.exp(w), rel=1e-8)
    assert cli(args + ["--profile", str(tmp_path / "prof.yaml")]) == 0
    table = capsys.readouterr().out
    assert "± 12 %" in table and "at 90 % confidence" in table
    assert cli(args) == 0 and NO_BAND in capsys.readouterr().out


STUDY = """\
kind: study
name: tie-study
model: mixtral-8x7b
cluster: h100-dgx-64
global_batch: 64
plans:
  - {name: a, tp: 2, ep: 8, pp: 2}
  - {name: b, ep: 8, pp: 2}
  - {name: c, ep: 8, pp: 4}
  - {name: d, tp: 2, ep: 8, pp: 4}
  - {name: e, sp: 2, ep: 8, pp: 2, overlap: {inter_op: true}}
"""


def _search(unc: dict | None):
    study = StudySpec.model_validate(yaml.safe_load(STUDY))
    # explicit either way: the Hopper presets carry a band once calibrated (calibrate --published)
    # (the preset's own block is dropped first: a deep merge would keep its log_halfwidth)
    bare = [(v, v.profile.model_copy(update={"uncertainty": None})) for v in study_variants(study, "tie")]
    variants = [dataclasses.replace(v, profile=with_overrides(p, {"uncertainty": unc}, "t") if unc else p)
                for v, p in bare]
    return run_search(study, variants, jobs=1, simulate_fn=fake_simulate, memory_fn=None)


def _md(result) -> str:
    ranked = result.ranked()
    doc = Doc("t")
    fill_sections(doc, result, ranked[0], {}, [], 5, result.variants[0])
    return doc.markdown()


@pytest.fixture(scope="module")
def plain():
    return _search(None)


def test_search_outputs_without_a_band(plain, tmp_path):
    rows = list(csv.DictReader(io.StringIO(plans_csv(plain))))
    assert tuple(rows[0]) == CSV_COLUMNS and "tokens_per_s_low" in CSV_COLUMNS and "tokens_per_s_high" in CSV_COLUMNS
    assert all(r["tokens_per_s_low"] == "" and r["tokens_per_s_high"] == "" for r in rows)
    js = summary_json(plain, tmp_path, 5)
    assert js["uncertainty"] is None and js["within_error_of_winner"] is None
    assert all(r["tokens_per_s_low"] is None and r["tokens_per_s_high"] is None for r in js["top"])
    md = _md(plain)
    assert NO_BAND in md and "±" not in md and "equally good" not in md


def test_search_outputs_with_a_band_list_the_ties(plain, tmp_path):
    ranked = plain.ranked()
    assert len(ranked) == 5
    tps = [r.tokens_per_s for r in ranked]
    # a band wide enough to tie the top three plans and not the fourth
    w = (math.log(tps[0] / tps[2]) + math.log(tps[0] / tps[3])) / 2
    assert w > 0 and tps[2] < tps[0]
    rms = w / z_for(0.9)
    result = _search({"confidence": 0.9, "loo_log_rms": rms, "n_runs": 12, "method": "test runs"})
    rows = list(csv.DictReader(io.StringIO(plans_csv(result))))
    for r in rows:
        low, high = float(r["tokens_per_s_low"]), float(r["tokens_per_s_high"])
        assert low < float(r["tokens_per_s"]) < high
        assert math.log(high / low) == pytest.approx(2 * w, rel=1e-4)
    js = summary_json(result, tmp_path, 5)
    names = [r.plan.name for r in ranked]
    assert js["within_error_of_winner"] == names[:3] and js["uncertainty"]["n_runs"] == 12
    assert js["top"][0]["tokens_per_s_low"] == pytest.approx(tps[0] * math.exp(-w))
    md = _md(result)
    pct = f"{100 * math.expm1(w):.0f} %"
    assert f"**3 plans within the model's error of the winner (±{pct} at 90 %): equally good candidates.**" in md
    assert "the winner:" not in md
    listed = [ln for ln in md.splitlines() if ln.startswith("- `") and "MFU" in ln]
    assert [ln.split("`")[1] for ln in listed] == names[:3]
    assert f"± {pct}" in md.split("## Top 5 plans")[1]  # table figures carry the band
    # a band narrower than the gap to the runner-up: one winner, called so
    narrow = _search({"confidence": 0.9, "loo_log_rms": math.log(tps[0] / tps[1]) / 3 / z_for(0.9), "n_runs": 3})
    md = _md(narrow)
    assert f"`{names[0]}` (" in md and "is the winner: every other plan is predicted slower" in md
    assert summary_json(narrow, tmp_path, 5)["within_error_of_winner"] == names[:1]


def test_compare_gives_its_own_band_from_held_out_residuals():
    rows = [{"plan": "c1", "held_out": False, "predicted_s": 1.0, "measured_s": 1.5},  # calibration: not used
            {"plan": "h1", "held_out": True, "predicted_s": 1.0, "measured_s": 1.1},
            {"plan": "h2", "held_out": True, "predicted_s": 1.0, "measured_s": 0.95}]
    unc, note = held_out_band(rows, "st")
    res = [math.log(1.1), math.log(0.95)]
    rms = math.sqrt(sum(r * r for r in res) / 2)
    assert unc is not None and unc.n_runs == 2 and unc.loo_log_rms == pytest.approx(rms, rel=1e-3)
    assert unc.confidence == 0.9 and unc.method == "held-out plans of moeperf compare st"
    assert unc.log_halfwidth == pytest.approx(z_for(0.9) * rms, rel=1e-3) and "2 runs" in note
    one, why = held_out_band(rows[:2], "st")
    assert one is None and "1 held-out plan" in why and "needs >= 2" in why
    assert from_residuals([0.1], "m") is None
    # the band travels into the written profile and the compare report
    prof = with_overrides(load_spec("cpu", "profile"), {"uncertainty": unc.model_dump()}, "t")
    assert prof.uncertainty == unc
    for r in rows:
        r.update(error_pct=0.0, predicted_tokens_per_s=1000.0 / r["predicted_s"],
                 measured_tokens_per_s=1000.0 / r["measured_s"])
    md = report_md(rows, [], {"study": "st", "calibrated_on": ["c1"], "profile": "p", "world_size": 2,
                              "median_error_pct": 1.0, "max_error_pct": 2.0, "kendall_tau": 1.0,
                              "kendall_tau_all": 1.0, "band": note,
                              "uncertainty": {**unc.model_dump(), "halfwidth_pct": halfwidth_pct(unc)}})
    assert note in md and f"| 1.00 k ± {100 * math.expm1(log_halfwidth(unc)):.0f} % |" in md


def test_banded_report_with_variants_draws_error_bars_and_is_byte_stable(tmp_path):
    from perfmodel.report import write_report

    text = STUDY + "variants:\n  - {name: n8, cluster: {nodes: 8}}\n  - {name: n16, cluster: {nodes: 16}}\n"
    study = StudySpec.model_validate(yaml.safe_load(text))
    variants = [dataclasses.replace(v, profile=with_overrides(v.profile, {"uncertainty": UNC}, "t"))
                for v in study_variants(study, "tie")]
    outs = []
    for k in range(2):
        res = run_search(study, variants, jobs=1, simulate_fn=fake_simulate, memory_fn=None)
        outs.append(write_report(res, tmp_path / f"r{k}", top=3, simulate_fn=fake_simulate))
    names = {p.name for p in outs[0].iterdir()}
    assert {"throughput_memory.png", "variants.png", "scaling.png", "report.md"} <= names
    for p in sorted(outs[0].iterdir()):
        assert (outs[1] / p.name).read_bytes() == p.read_bytes(), p.name
    md = (outs[0] / "report.md").read_text()
    assert "plans within error of its best" in md and "± 12 %" in md
    assert "within the model's error of the winner" in md or "is the winner" in md


def test_search_cli_names_the_candidates(tmp_path, capsys):
    prof = with_overrides(load_spec("h100-sxm", "profile"), {"uncertainty": UNC}, "t")
    (tmp_path / "prof.yaml").write_text(yaml.safe_dump(prof.model_dump(mode="json", exclude_none=True)))
    (tmp_path / "s.yaml").write_text(STUDY.replace("global_batch: 64", "global_batch: 64\nprofile: prof.yaml"))
    args = ["search", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o"), "--jobs", "1", "--quiet"]
    assert cli(args + ["--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    ties = js["within_error_of_winner"]
    assert ties and ties[0] == js["top"][0]["name"] and js["uncertainty"]["halfwidth_pct"] == pytest.approx(12.39, abs=0.01)
    floor = js["top"][0]["tokens_per_s"] * math.exp(-log_halfwidth(prof.uncertainty))
    assert ties == [r["name"] for r in js["top"] if r["tokens_per_s"] >= floor]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "± 12 %" in printed
    assert (f"candidates: {', '.join(ties)}" in printed) if len(ties) > 1 else "is the winner" in printed


def test_a_fit_does_not_inherit_its_base_profiles_band():
    from fakes import calibration_samples as _samples

    from perfmodel.calibrate import fit_profile

    base = with_overrides(load_spec("cpu", "profile"), {"uncertainty": UNC}, "t")
    prof, _ = fit_profile(_samples(load_spec("cpu", "profile"), base), base, ["runA"], link_bw_GBps=5.0)
    assert prof.uncertainty is None


def test_compare_reads_traces_recorded_before_newer_model_fields(tmp_path):
    """traces/h100-1gpu/ predate model.gated_ffn and moe.expert_groups: the recorded model reads with
    their defaults (what the run used), so `moeperf compare studies/h100-1gpu.yaml` can give its band;
    a real difference is still refused, naming the field."""
    import shutil
    from pathlib import Path

    from perfmodel.compare import check_recorded, plan_of, study_specs

    repo = Path(__file__).resolve().parents[3]
    study = load_spec(str(repo / "studies" / "h100-1gpu.yaml"), "study")
    model, _cluster, world = study_specs(study)
    plan = plan_of(study, study.plans[0])
    run = repo / "traces" / "h100-1gpu" / plan.name
    assert "gated_ffn" not in (run / "meta.yaml").read_text()
    check_recorded(run, model, plan, world)
    other = tmp_path / plan.name
    other.mkdir()
    shutil.copy(run / "meta.yaml", other / "meta.yaml")
    with pytest.raises(SpecError, match=r"model\.layers"):
        check_recorded(other, with_overrides(model, {"layers": 5}, "t"), plan, world)
