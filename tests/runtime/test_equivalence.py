"""Parallel equivalence: every plan on 4 CPU ranks matches one process (same seed, global batch).

Step-1 loss and synced gradients within rel. 1e-4; the loss over 10 steps within 1e-3.
All plans run in one torchrun launch (tests/runtime/equiv_worker.py) to keep the suite fast.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from equiv_common import PLANS, check_plan, run_plans  # noqa: E402

STEPS = 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("equiv")
    return out, run_plans(out, list(PLANS), STEPS, timeout=300)  # 12 plans; slow when the suite shares the cores


@pytest.mark.parametrize("name", list(PLANS))
def test_plan_matches_single_process(runs, name):
    out, ref = runs
    check_plan(out, ref, name)
