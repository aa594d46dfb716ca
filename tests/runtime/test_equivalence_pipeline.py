"""Pipeline equivalence: uneven stages (perfmodel.specs.pplayout's balanced split and explicit pp_layouts)
under every schedule the runtime runs (1F1B, interleaved, ZB-V zero-bubble, DualPipeV) match one
process on a 5-layer model: step-1 loss, aux loss and synced gradients within rel. 1e-4 (the zero-bubble
schedules split each backward into input and weight passes), the loss over the steps within 1e-3.

One torchrun launch runs every plan against one single-process reference (tests/runtime/equiv_common.py).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from equiv_common import PIPELINE_LAYERS, PIPELINE_PLANS, check_plan, run_plans  # noqa: E402

STEPS = 3  # the optimizer's steps over V-placed stages (embedding and head on one rank); step 1 is the check


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("equiv_pp")
    return out, run_plans(out, list(PIPELINE_PLANS), STEPS, layers=PIPELINE_LAYERS, timeout=280)


@pytest.mark.parametrize("name", list(PIPELINE_PLANS))
def test_pipeline_plan_matches_single_process(runs, name):
    out, ref = runs
    check_plan(out, ref, name)
