"""One training run in one process (one rank, no process group), for test_fp8_training.py, which
starts one of these per plan so the runs share the cores instead of queueing on one.

Usage: python tests/runtime/fp8_train_worker.py OUT_JSON CORPUS STEPS SEQ_LEN LR PLAN_JSON
Writes the per-step metrics records (runtime.train) as a JSON list.
"""

import json
import sys
from pathlib import Path

import torch

from perfmodel.specs import PlanSpec, load_spec
from runtime.groups import Parallel
from runtime.model import scale
from runtime.train import TrainConfig, train


def main() -> None:
    out, corpus, steps, seq_len, lr, plan = sys.argv[1:7]
    spec = scale(load_spec("tiny-moe", "model"), 1.0, seq_len=int(seq_len))
    cfg = TrainConfig(model=spec, plan=PlanSpec(**json.loads(plan)), steps=int(steps), data=[corpus], lr=float(lr),
                      quiet=True)
    Path(out).write_text(json.dumps(train(cfg, Parallel.single(), torch.device("cpu"))))


if __name__ == "__main__":
    main()
