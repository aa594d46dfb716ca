"""precision: fp8 trains like bf16: tiny-moe on byte-level text, same seed and data. On CPU the bf16
plan computes in fp32 and the FP8 GEMMs are emulated (runtime.fp8_linear: operands rounded to e4m3
with the recipe's scales, fp32 GEMMs).

1. 200 steps per plan, each plan in one process (tests/runtime/fp8_train_worker.py: one rank, no
   process group; the three run side by side on the cores): the final loss (mean of the last 10
   steps) of each FP8 recipe is within 2 % of the bf16 plan's. For scale: 128 tokens a step is a
   noisy trajectory, and changing the learning rate by 1e-4 (relative) alone moved the bf16 plan's
   final loss by 0.3-0.9 % (at lr 2e-3 by 1 %: hence 1e-3); the FP8 recipes landed within 0.4 %.
2. One step's gradients, in this process: every parameter's gradient is within the FP8 error bound
   of the fp32 one, and visibly off it (so a plan that silently skipped FP8 fails). The bound:
   - one operand: e4m3 keeps 3 mantissa bits and rounds to nearest, so an element's relative error is
     at most U = 2^-4, uniform within +-half an ulp: RMS at most U / sqrt(3) (relative half-ulps
     range over (2^-5, 2^-4], so U is the upper end);
   - one GEMM: each of the K products carries two independent roundings (x and W, dy and W, dy and x),
     and independent errors add in quadrature, like the products themselves: the result's relative
     error is about sqrt(2) * U / sqrt(3) = 0.82 U (measured on random data: 0.6 U);
   - one gradient: the errors of the FP8 GEMMs on its path are independent too, so they add in
     quadrature: sqrt(n) * 0.82 U for n = 2 * 4 * layers + 1 -- the forward GEMMs between the input
     and the loss (qkv, proj, fc1, fc2 per layer; the shared expert runs beside the routed ones), the
     dgrad GEMMs back to the parameter, and its own wgrad. tiny-moe (4 layers): n = 33, bound 0.29.
   The residual stream dilutes each block's error, so measured errors sit well below (max ~0.10).
   Rounding bounds hold for smooth computations only: top-k routing is not (a token near a tie
   switches experts under FP8 rounding, which moved expert and router gradients by up to 0.30 with
   tiny-moe's top-2). This check therefore routes densely (top_k = experts): same weights, no ties.
   The lower end, U / 16, is far below one rounding: an error under it means FP8 was not applied.
"""

import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import proc_group
import pytest
import torch

from perfmodel.sim.opgraph import FP8_GEMMS
from perfmodel.specs import ModelSpec, PlanSpec, load_spec
from runtime import fp8_linear
from runtime.groups import Parallel
from runtime.model import scale
from runtime.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
STEPS, SEQ_LEN, BATCH, LR = 200, 32, 4, 1e-3  # 128 tokens a step: the optimizer's cost dominates anyway
RECIPES = ("tensorwise", "blockwise")
U = 2.0**-4


def _plan(recipe: str | None) -> dict:
    prec = {"precision": "fp8", "fp8_recipe": recipe} if recipe else {}
    return {"name": recipe or "bf16", "global_batch": BATCH, "micro_batch": BATCH, **prec}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fp8") / "corpus.txt"  # byte-level text: the repository's own sources
    path.write_bytes(b"\n".join(p.read_bytes() for p in sorted((ROOT / "perfmodel").glob("*.py"))))
    return str(path)


@pytest.mark.timeout(300)
def test_fp8_recipes_train_like_bf16(corpus, tmp_path):
    # glibc keeps freed memory in the process: otherwise the optimizer's large per-step temporaries
    # (fp64 norm, flat gradients) fault in fresh pages every step, a fifth of the CPU time on 2 cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "MALLOC_MMAP_THRESHOLD_": str(1 << 28), "MALLOC_TRIM_THRESHOLD_": str(1 << 28)}

    def run(recipe: str | None) -> list[dict]:
        out = tmp_path / f"{recipe}.json"
        cmd = [sys.executable, str(Path(__file__).parent / "fp8_train_worker.py"), str(out), corpus, str(STEPS),
               str(SEQ_LEN), str(LR), json.dumps(_plan(recipe))]
        proc = proc_group.run(cmd, cwd=ROOT, env=env, timeout=280)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(out.read_text())

    with ThreadPoolExecutor(3) as pool:
        ref, *fp8 = pool.map(run, (None, *RECIPES))

    def final(recs: list[dict]) -> float:
        return sum(r["loss"] for r in recs[-10:]) / 10

    assert len(ref) == STEPS and final(ref) < 0.75 * ref[0]["loss"]  # it learned something
    for recipe, recs in zip(RECIPES, fp8, strict=True):
        gap = final(recs) / final(ref) - 1
        print(f"tiny-moe {STEPS} steps: final loss bf16 {final(ref):.4f} fp8 {recipe} {final(recs):.4f} "
              f"({100 * gap:+.2f} %)")
        assert abs(gap) <= 0.02, recipe


@pytest.mark.timeout(120)
def test_one_step_gradients_within_fp8_bound(corpus, tmp_path):
    data = scale(load_spec("tiny-moe", "model"), 1.0, seq_len=SEQ_LEN).model_dump()
    data["moe"]["top_k"] = data["moe"]["experts"]  # dense routing: see the module docstring
    spec = ModelSpec.model_validate(data)
    n = 2 * 4 * spec.layers + 1
    bound = math.sqrt(n) * math.sqrt(2) * U / math.sqrt(3)

    def grads(recipe: str | None) -> dict[str, torch.Tensor]:
        d = tmp_path / str(recipe)
        cfg = TrainConfig(model=spec, plan=PlanSpec(**_plan(recipe)), steps=1, data=[corpus], quiet=True,
                          dump_grads=d)
        train(cfg, Parallel.single(), torch.device("cpu"))
        return {k: g for k, (g, _) in torch.load(d / "rank0.pt").items()}

    ref = grads(None)
    for recipe in RECIPES:
        fp8_linear.CASTS.clear()
        got = grads(recipe)
        # every FP8 GEMM of this model cast its input (no dense layers here: no ffn.*), nothing else did
        ops = {k.split(":")[0] for k in fp8_linear.CASTS if k != "w"}
        assert ops == {op for op in FP8_GEMMS if not op.startswith("ffn.")}, ops
        errs = {k: float((got[k] - w).norm() / w.norm()) for k, w in ref.items()}
        worst = max(errs, key=errs.get)
        print(f"{recipe}: gradient rel. error max {errs[worst]:.3f} ({worst}), min {min(errs.values()):.3f}, "
              f"bound {bound:.3f}")
        for k, e in errs.items():
            assert U / 16 < e < bound, f"{recipe}: gradient of {k}: rel. error {e:.4f} outside ({U / 16}, {bound:.3f})"
