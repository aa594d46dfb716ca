"""Shared by the equivalence tests and their torchrun worker: the model, the plans compared, one
launch of every plan, and the comparison with the single-process reference."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from perfmodel.specs import ModelSpec, MoESpec, PlanSpec

# tiny-moe's structure (GQA 4:2, 8 experts top-2, one shared expert) at a length that keeps
# 6 plans x 4 ranks on 2 cores fast
MODEL = dict(name="equiv-moe", layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, vocab=256, seq_len=32,
             moe=dict(experts=8, top_k=2, expert_ffn_hidden=64, shared_experts=1))

PLANS = {
    "dp4": dict(),
    "ep4": dict(ep=4),
    "sp2_ep2": dict(sp=2, ep=2),
    "dp2_ep2": dict(ep=2),
    "tp2_dp2": dict(tp=2),
    "pp2_dp2": dict(pp=2),
    # beyond the list: interleaved pipeline, kv heads replicated over tp=4, full recompute
    "pp2_vpp2": dict(pp=2, vpp=2, schedule="interleaved"),
    "tp4_ep2": dict(tp=4, ep=2),
    "sp2_ep2_recompute": dict(sp=2, ep=2, recompute="full"),
    # overlap (runtime/overlap.py) must not change the gradients: async a2a + halves + deferred wgrad,
    # token chunks, both together under sequence parallelism and full recomputation
    "ep4_inter_op": dict(ep=4, overlap=dict(inter_op=True)),
    "ep4_chunk3": dict(ep=4, overlap=dict(intra_op="chunk", chunks=3)),
    "sp2_ep2_inter_chunk_recompute": dict(sp=2, ep=2, recompute="full",
                                          overlap=dict(inter_op=True, intra_op="chunk", chunks=2)),
}

# pipeline layouts and schedules (tests/runtime/test_equivalence_pipeline.py), on a model whose layers
# no pp*vpp divides: the default balanced split (perfmodel/specs/pplayout.py) gives 3+2 over pp=2 and
# 1+1+2+1 over 4 virtual stages; 4 micro-batches per replica (dualpipev needs >= 2*pp)
PIPELINE_LAYERS = 5
PIPELINE_PLANS = {
    "pp2_1f1b_uneven": dict(pp=2),
    "pp2_vpp2_uneven": dict(pp=2, vpp=2, schedule="interleaved"),
    # V placement: rank 0 holds stages 0 (embedding) and 3 (head, loss); split I/W backward
    "pp2_zero_bubble": dict(pp=2, vpp=2, schedule="zero-bubble"),
    "pp2_dualpipev": dict(pp=2, vpp=2, schedule="dualpipev"),
    # the split backward through the MoE dispatcher's all-to-alls (ep over the 2 replicas of a stage)
    "pp2_ep2_zero_bubble": dict(pp=2, vpp=2, ep=2, schedule="zero-bubble"),
    # explicit layouts: a Megatron-Core string whose last stage holds only the loss; a list with an
    # empty interior stage (it passes activations and gradients through) and a head-only last stage
    "pp2_zero_bubble_layout": dict(pp=2, vpp=2, schedule="zero-bubble", pp_layout="Et|tt|tt|L"),
    "pp2_dualpipev_layout_empty": dict(pp=2, vpp=2, schedule="dualpipev", pp_layout=[2, 0, 3, 0]),
}
GLOBAL_BATCH, MICRO_BATCH = 8, 1


def tiny_model(layers: int = MODEL["layers"]) -> ModelSpec:
    return ModelSpec(**{**MODEL, "layers": layers, "moe": MoESpec(**MODEL["moe"])})


def plan_fields(name: str) -> dict:
    extra = PLANS[name] if name in PLANS else PIPELINE_PLANS[name]
    return {"name": name, "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH, **extra}


def run_plans(out: Path, names: list[str], steps: int, layers: int = MODEL["layers"],
              timeout: float = 300) -> list[dict]:
    """The single-process reference (grads in out/ref) and one 4-rank torchrun launch of every plan
    (grads in out/<name>); returns the reference's step records."""
    import proc_group  # tests/ is on sys.path under pytest; the worker never calls this

    from runtime.groups import Parallel
    from runtime.train import TrainConfig, train

    ref = train(TrainConfig(model=tiny_model(layers), plan=PlanSpec(**plan_fields("dp4") | {"name": "ref"}),
                            steps=steps, dump_grads=out / "ref", quiet=True), Parallel.single(), torch.device("cpu"))
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(Path(__file__).parent / "equiv_worker.py"), str(out), str(steps), "--layers", str(layers)]
    cmd += [json.dumps(plan_fields(n)) for n in names]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = proc_group.run(cmd, cwd=root, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ref


def assemble(d: Path) -> dict[str, torch.Tensor]:
    """Full gradients from every rank's (slice, placement) dump."""
    parts: dict[str, list] = {}
    for f in sorted(d.glob("rank*.pt")):
        for name, (g, shard) in torch.load(f).items():
            parts.setdefault(name, []).append((g, shard))
    full = {}
    for name, items in parts.items():
        if items[0][1] is None:
            full[name] = items[0][0]
            for g, _ in items[1:]:  # replicas must agree after the sync
                torch.testing.assert_close(g, items[0][0], rtol=1e-5, atol=1e-7)
            continue
        dim, _, count = items[0][1]
        chunks = {}
        for g, (_, index, _) in items:
            chunks[index] = g
        assert sorted(chunks) == list(range(count)), name
        full[name] = torch.cat([chunks[i] for i in range(count)], dim=dim)
    return full


def check_plan(out: Path, ref: list[dict], name: str) -> float:
    """Step-1 loss, aux loss and synced gradients within rel. 1e-4 of one process, the loss over the
    steps within 1e-3; returns the largest relative gradient error."""
    losses = json.loads((out / name / "losses.json").read_text())
    ref_losses = [r["loss"] for r in ref]
    assert abs(losses[0] - ref_losses[0]) <= 1e-4 * abs(ref_losses[0]), (name, losses[0], ref_losses[0])
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-3, (name, losses, ref_losses)
    aux = json.loads((out / name / "aux.json").read_text())
    assert abs(aux[0] - ref[0]["aux_loss"]) <= 1e-4 * abs(ref[0]["aux_loss"]), (name, aux[0], ref[0]["aux_loss"])
    got, want = assemble(out / name), assemble(out / "ref")
    assert sorted(got) == sorted(want), f"{name}: parameters differ: {sorted(set(got) ^ set(want))}"
    worst = 0.0
    for k, w in want.items():
        err = float((got[k] - w).norm() / w.norm().clamp_min(1e-12))
        assert err <= 1e-4, f"{name}: gradient of {k} differs, rel. error {err:.2e}"
        worst = max(worst, err)
    return worst
