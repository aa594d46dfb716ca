import json

from perfmodel.cli import main


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_simulate_plan_json_and_trace(tmp_path, capsys):
    plan = _write(tmp_path, "p.yaml", "kind: plan\nname: p\nep: 4\nglobal_batch: 8\n")
    tr = tmp_path / "t.json"
    args = ["simulate", "--model", "tiny-moe", "--cluster", "cpu-local-4", "--plan", plan, "--json"]
    assert main(args + ["--trace", str(tr)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "p" and out["step_time_s"] > 0 and "breakdown" in out
    first = tr.read_bytes()
    assert main(args + ["--trace", str(tr)]) == 0
    assert json.loads(capsys.readouterr().out) == out and tr.read_bytes() == first
    assert main(args[:-1]) == 0 and "tokens/s" in capsys.readouterr().out


def test_simulate_study(tmp_path, capsys):
    _write(tmp_path, "m.yaml", "kind: model\nlayers: 2\nhidden: 64\nheads: 4\nkv_heads: 2\nhead_dim: 16\n"
           "vocab: 64\nseq_len: 64\nmoe: {experts: 4, top_k: 2, expert_ffn_hidden: 64}\n")
    study = _write(tmp_path, "s.yaml", "kind: study\nmodel: m.yaml\ncluster: cpu-local-4\nglobal_batch: 8\n"
                   "plans:\n  - {name: a, ep: 4}\n  - {name: b, ep: 2, global_batch: 4}\n")
    assert main(["simulate", study, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out] == ["a", "b"] and out[1]["plan"]["global_batch"] == 8


def test_bad_input_exits_2(tmp_path, capsys):
    plan = _write(tmp_path, "p.yaml", "kind: plan\nep: 4\nglobal_batch: 8\n")
    assert main(["simulate", "--model", "no-such-model", "--cluster", "cpu-local-4", "--plan", plan]) == 2
    assert "no-such-model" in capsys.readouterr().err
    misfit = _write(tmp_path, "q.yaml", "kind: plan\ntp: 3\nglobal_batch: 8\n")
    assert main(["simulate", "--model", "tiny-moe", "--cluster", "cpu-local-4", "--plan", misfit]) == 2
    assert "tp" in capsys.readouterr().err
    neg = _write(tmp_path, "c.yaml", "kind: cluster\ngpu: h100-sxm\nnodes: 2\ngpus_per_node: 8\n"
                 "network: {nic_Gbps: -400}\n")
    assert main(["simulate", "--model", "tiny-moe", "--cluster", neg, "--plan", plan]) == 2
    assert "nic_Gbps" in capsys.readouterr().err
    assert main(["simulate", "--model", "tiny-moe"]) == 2
    assert main(["simulate", plan, "--model", "tiny-moe"]) == 2
