"""`moeperf validate` and `moeperf presets` end to end: in process and as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from perfmodel.cli import main
from perfmodel.specs import PRESET_DIR

ROOT = Path(__file__).resolve().parents[3]
PRESET_FILES = sorted(str(p) for sub in ("clusters", "gpus", "models") for p in (PRESET_DIR / sub).glob("*.yaml"))

BAD = {
    "wrong_type": "kind: plan\ntp: two\n",
    "unknown_key": "kind: plan\ntp: 2\nepp: 4\n",
    "impossible_plan": ("kind: study\nmodel: mixtral-8x7b\ncluster: h100-dgx-64\n"
                        "plans: [{name: p, ep: 16, global_batch: 64}]\n"),
    "non_yaml": "key: [unclosed\n  - : :\n",
    "nan": "kind: cluster\ngpu: h100-sxm\nnodes: 1\ngpus_per_node: 8\nnetwork: {nic_Gbps: .nan}\n",
    "alias_bomb": "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}" if i > 1 else "*a"] * 10) + "]\n" for i in range(1, 8)),
}
EXPECT = {
    "wrong_type": "plan.tp: Input should be a valid integer",
    "unknown_key": "plan.epp: unknown key",
    "impossible_plan": "plan.ep: 16 does not divide model.moe.experts=8",
    "non_yaml": "not valid YAML",
    "nan": "cluster.network.nic_Gbps",
    "alias_bomb": "alias bomb",
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perfmodel.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_all_presets_validate(capsys):
    assert len(PRESET_FILES) == 22
    assert main(["validate", *PRESET_FILES]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(PRESET_FILES) and all(line.startswith("ok ") for line in out)
    assert f"ok {PRESET_DIR / 'clusters' / 'megascale-1440.yaml'} (cluster megascale-1440)" in out


def test_every_packaged_yaml_validates(capsys):
    """`moeperf validate perfmodel/presets/**/*.yaml`, whatever kinds the folder holds."""
    files = sorted(str(p) for p in PRESET_DIR.rglob("*.yaml"))
    assert main(["validate", *files]) == 0, capsys.readouterr().err


def test_validate_json(capsys):
    assert main(["validate", "--json", *PRESET_FILES[:2]]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in rows] == PRESET_FILES[:2] and rows[0]["kind"] == "cluster"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_in_process(tmp_path, capsys, case):
    f = tmp_path / f"{case}.yaml"
    f.write_text(BAD[case])
    assert main(["validate", PRESET_FILES[0], str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and EXPECT[case] in err[0] and str(f) in err[0]


@pytest.mark.parametrize("case", ["impossible_plan", "unknown_key", "non_yaml"])
def test_bad_file_subprocess(tmp_path, case):
    f = tmp_path / f"{case}.yaml"
    f.write_text(BAD[case])
    r = run_cli("validate", str(f))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and EXPECT[case] in lines[0]


@pytest.mark.parametrize("args,match", [
    (["validate", "does/not/exist.yaml"], "no such file"),
    (["validate", "perfmodel/presets"], "is a directory"),
    (["validate"], "required"),
    (["validate", "--kind", "widget", "x.yaml"], "invalid choice"),
    (["validate", "--kind", "model", "perfmodel/presets/gpus/h100-sxm.yaml"], "expected a model"),
])
def test_usage_errors_subprocess(args, match):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0]


def test_binary_file(tmp_path, capsys):
    f = tmp_path / "blob.yaml"
    f.write_bytes(bytes(range(256)))
    assert main(["validate", str(f)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_validate_subprocess_ok():
    r = run_cli("validate", *PRESET_FILES)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.count("\nok ") == len(PRESET_FILES) - 1


def test_presets_listing(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "megascale-moe-352b" in out and "341.3B params" in out and "1440 GPUs" in out
    assert main(["presets", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table) == {"model", "cluster", "profile"}
    models = {r["name"]: r for r in table["model"]}
    assert models["mixtral-8x7b"]["params_active"] == pytest.approx(12.9e9, rel=0.03)
    assert {r["name"]: r["gpus"] for r in table["cluster"]}["h100-dgx-1024"] == 1024
    assert {r["name"]: r["bf16_tflops"] for r in table["profile"]}["h200"] == 989
    assert main(["presets", "--kind", "cluster"]) == 0
    assert "models:" not in capsys.readouterr().out
