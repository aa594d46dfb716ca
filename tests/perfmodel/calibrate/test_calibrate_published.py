"""moeperf calibrate --published: the fit recovers known constants from runs simulated with them,
leave-one-out predicts each held-out run, and the outputs / preset block are written."""

import json
import math

import pytest
import yaml

from perfmodel.calibrate.published import Constants, cases, fit, leave_one_out, predict, summary
from perfmodel.calibrate.published_cli import MARKER, calibrate_published, write_preset
from perfmodel.sim.uncertainty import from_residuals

TRUE = Constants(compute=0.8, compute_fp8=0.95, fabric=0.45, nvlink=0.45, launch_us=4.0)
PLANS = {  # compute only (one GPU), data parallel, network-bound (EP over 2 nodes), pipeline, FP8
    "one-gpu": ({"nodes": 1, "gpus_per_node": 1, "network": {"nics_per_node": 1}}, {"global_batch": 8}),
    "dense-tp1": ({"nodes": 1}, {"tp": 1, "global_batch": 64}),
    "ep16": ({"nodes": 2}, {"ep": 16, "global_batch": 128}),
    "pp2-tp4": ({"nodes": 2}, {"tp": 4, "pp": 2, "global_batch": 64}),
    "fp8-ep8": ({"nodes": 2}, {"ep": 8, "global_batch": 128, "precision": "fp8"}),
}


def _write(folder, measured):
    folder.mkdir(exist_ok=True)
    for name, (cl, plan) in PLANS.items():
        run = {"kind": "published_run", "name": name,
               "source": {"title": "synthetic", "url": "https://example.org", "where": "test",
                          "group": "a" if "ep" in name else "b"},
               "model": "moe-1b", "model_overrides": {"moe": {"experts": 16}},
               "cluster": "h100-dgx-8", "cluster_overrides": cl,
               "plan": {"name": name, **plan}, "precision": plan.get("precision", "bf16"), "system": "test",
               "measured": {"tokens_per_s": measured.get(name, 1.0)}}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(run))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("published")
    _write(folder, {})
    truth = {c.name: predict(c, TRUE) for c in cases(folder)}
    _write(folder, truth)
    return folder


def test_fit_recovers_the_constants_and_loo_predicts_held_out_runs(synthetic):
    cs = cases(synthetic)
    f = fit(cs, {})
    got = f.constants("h100-sxm", {})
    # the simulated step is piecewise linear in the constants (critical paths switch), so the
    # Gauss-Newton fit stops within a fraction of a percent of the runs, a few percent of the constants
    assert got.compute == pytest.approx(TRUE.compute, rel=0.05)
    assert got.fabric == pytest.approx(TRUE.fabric, rel=0.06)
    assert got.compute_fp8 == pytest.approx(TRUE.compute_fp8, rel=0.08)
    assert max(abs(r) for r in f.residuals) < 0.02
    loo, held = leave_one_out(cs, f, {})
    assert len(held) == len(cs)
    by = {c.name: r for c, r in zip(cs, loo, strict=True)}
    assert max(abs(by[n]) for n in ("one-gpu", "dense-tp1", "ep16", "pp2-tp4")) < 0.05
    # the only FP8 run, held out, leaves no FP8 evidence: its constant follows the 16-bit one (the
    # prior), below the true FP8 constant, so the run is under-predicted
    assert by["fp8-ep8"] < -0.05
    s = summary(cs, f, loo)
    assert s["runs"] == 5 and s["groups"] == 2 and s["kendall_tau"] >= 0.6


def test_a_run_off_the_model_shows_in_its_loo_error_and_the_band(tmp_path, synthetic):
    folder = tmp_path / "pub"
    truth = {c.name: c.measured_tokens_per_s for c in cases(synthetic)}
    truth["ep16"] *= 1.3  # this run is 30 % faster than the model can explain
    _write(folder, truth)
    cs = cases(folder)
    f = fit(cs, {})
    loo, _ = leave_one_out(cs, f, {})
    worst = max(range(len(cs)), key=lambda i: abs(loo[i]))
    assert cs[worst].name == "ep16" and loo[worst] < -0.1  # predicted well below the published figure
    unc = from_residuals(loo, "test")
    assert unc.log_halfwidth == pytest.approx(1.6449 * unc.loo_log_rms, rel=1e-3)
    assert unc.n_runs == 5 and unc.loo_log_rms > 0.05


def test_outputs_and_preset_block(tmp_path, synthetic):
    preset = tmp_path / "gpu.yaml"
    preset.write_text("# hand-written\nkind: profile\n" + MARKER + ": old\ngemm_efficiency: {max: 0.1}\n")
    res = calibrate_published(str(synthetic), tmp_path / "out", quiet=True)
    for f in ("fidelity.csv", "calibration.json", "fidelity.png", "h100-sxm.yaml"):
        assert (tmp_path / "out" / f).is_file()
    data = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert data["summary"]["loo_median_error_pct"] == res["summary"]["loo_median_error_pct"] < 3
    prof = yaml.safe_load((tmp_path / "out" / "h100-sxm.yaml").read_text())
    assert prof["calibrated_from"] == sorted(PLANS)
    assert math.isclose(prof["gemm_efficiency"]["max"], 0.770352 * res["constants"]["h100-sxm"]["compute"], rel_tol=1e-4)
    # the written profile loads with its error band (perfmodel.specs.UncertaintySpec validates it)
    from perfmodel.specs import load_spec

    band = load_spec(str(tmp_path / "out" / "h100-sxm.yaml"), "profile").uncertainty
    assert band is not None and band.n_runs == 5 and band.confidence == 0.9
    write_preset(preset, MARKER + ": new\nx: 1\n")
    assert preset.read_text() == "# hand-written\nkind: profile\n" + MARKER + ": new\nx: 1\n"


def test_too_few_runs_is_one_line(tmp_path):
    from perfmodel.specs import SpecError

    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="leave-one-out needs at least 2"):
        calibrate_published(str(tmp_path / "empty"), tmp_path / "o", quiet=True)
