"""A study whose variants differ in GPU count gets scaling.png: tokens/s per GPU against GPU count,
each fixed plan predicted and, where the reference gives it, the paper's."""

from __future__ import annotations

import yaml

from perfmodel.report import write_report
from perfmodel.report.figures import scaling_chart
from perfmodel.search import run_search
from perfmodel.search.cli import study_variants
from perfmodel.specs import StudySpec

STUDY = """\
kind: study
name: tiny-scaling
model: mixtral-8x7b
cluster: h100-dgx-64
global_batch: 64
baseline: megatron-lm
plans:
  - {name: megatron-lm, tp: 2, ep: 8, pp: 2}
  - {name: megascale-moe, sp: 2, ep: 8, pp: 2, overlap: {inter_op: true, intra_op: tile}}
variants:
  - {name: gpus-32, cluster: {nodes: 4}}
  - {name: gpus-64, cluster: {nodes: 8}}
reference:
  tokens_per_s.megascale-moe: 150000
  tokens_per_s.megascale-moe@gpus-64: 280000
  tokens_per_s.megatron-lm@gpus-64: 200000
"""


def _result(text: str):
    study = StudySpec.model_validate(yaml.safe_load(text))
    return run_search(study, study_variants(study, "tiny"), jobs=1)


def test_scaling_figure_for_variants_of_different_gpu_counts(tmp_path):
    out = write_report(_result(STUDY), tmp_path / "rep", top=3)
    png = (out / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (out / "report.md").read_text()
    assert "scaling.png" in md and "Tokens/s per GPU against GPU count" in md


def test_no_scaling_figure_when_the_gpu_count_does_not_change(tmp_path):
    same = STUDY.replace("{nodes: 4}", "{nic_Gbps: 200}").replace("{nodes: 8}", "{nic_Gbps: 400}")
    same = same.replace("cluster: {nic_Gbps", "cluster: {network: {nic_Gbps").replace("00}}", "00}}}")
    assert not scaling_chart(_result(same), tmp_path / "scaling.png")
    assert not (tmp_path / "scaling.png").exists()
