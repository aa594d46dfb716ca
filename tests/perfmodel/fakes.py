"""Shared test helpers for the perfmodel tests (this folder is on sys.path through its conftest.py):
a tiny deterministic stand-in for perfmodel.sim.simulate, a small study, synthetic calibration samples."""

from __future__ import annotations

import yaml

from perfmodel.calibrate.data import Sample
from perfmodel.search import lower_bound_s
from perfmodel.sim.hardware import Hardware
from perfmodel.sim.memory import estimate_memory
from perfmodel.sim.opgraph import Op
from perfmodel.sim.result import SimResult, TraceEvent
from perfmodel.specs import StudySpec
from perfmodel.specs.layout import plan_layout


def fake_simulate(model, cluster, plan, profile=None, *, trace=False):
    prof = profile or cluster.profile()
    world = cluster.world_size
    lay = plan_layout(plan, model, world)
    compute = lower_bound_s(model, plan, world, prof) * 1.25
    comm = 0.003 * (plan.tp - 1) + 0.002 * plan.sp + 0.004 * plan.ep
    comm *= 0.5 if plan.overlap.inter_op else 1.0
    comm *= 0.6 if plan.overlap.intra_op == "tile" else 1.0
    comm *= 0.8 if plan.compression.dispatch == "fp8" else 1.0
    bubble = compute * (plan.pp - 1) / (lay.microbatches * plan.vpp)
    grad = 0.01 * (1.0 if plan.compression.grad_sync == "fp32" else 0.6)
    opt = 0.002 * (0.5 if plan.distributed_optimizer else 1.0) + 0.0001 * plan.micro_batch
    step = compute + comm * lay.microbatches + bubble + grad + opt
    mem = estimate_memory(model, plan, world, prof)
    timeline = []
    if trace:
        t = 0.0
        for mb in range(2):
            for layer in range(2):
                for name, track, dur in (("attn.qkv/fwd", "stage0/compute", 1e-3), ("moe.dispatch_a2a/fwd",
                                         "stage0/comm.ep", 5e-4), ("moe.fc1/fwd", "stage0/compute", 2e-3),
                                         ("moe.fc1/dgrad", "stage0/compute", 2e-3),
                                         ("moe.fc1/wgrad", "stage0/compute", 2e-3)):
                    timeline.append(TraceEvent(name, track, t, dur, {"layer": layer, "microbatch": mb}))
                    t += dur
    return SimResult(step_time_s=step, tokens_per_s=plan.global_batch * model.seq_len / step,
                     mfu=0.4 * compute / step,
                     breakdown={"compute_s": compute, "exposed_comm_s": comm * lay.microbatches,
                                "bubble_s": bubble, "grad_sync_s": grad, "optimizer_s": opt},
                     memory_GiB={"total": mem.total_GiB, "capacity": mem.capacity_GiB}, fits=mem.fits,
                     name=plan.name, details={"layer_ops": {"moe.fc1/fwd": 2e-3, "attn.qkv/fwd": 1e-3}},
                     timeline=timeline)


def sim_for_tests():
    """The real simulator once it exists, else the fake (both take the same arguments)."""
    try:
        from perfmodel.sim import simulate
    except ImportError:
        return fake_simulate
    return simulate


STUDY_YAML = """\
kind: study
name: tiny-search
model: mixtral-8x7b
cluster: h100-dgx-64
global_batch: 64
baseline: megatron-lm
plans:
  - {name: megatron-lm, tp: 2, ep: 8, pp: 2}
  - name: megascale-moe
    sp: 2
    ep: 8
    pp: 2
    overlap: {inter_op: true, intra_op: tile}
    compression: {dispatch: fp8, grad_sync: bf16}
reference: {tokens_per_s.megascale-moe: 400000, speedup: 1.5}
search:
  tp: [1, 2]
  sp: [1, 2]
  ep: [3, 8]
  pp: [2, 4]
  inter_op: [false, true]
  intra_op: [none, tile]
  dispatch: [fp8]
"""


def tiny_study() -> StudySpec:
    return StudySpec.model_validate(yaml.safe_load(STUDY_YAML))


def calibration_samples(truth, base):
    hw = Hardware.of(truth)
    out = []
    for i, m in enumerate([64, 128, 256, 512, 1024]):
        g = Op("moe.fc1", "fwd", "gemm", flops=2.0 * m * 256 * 128, bytes=1.0, dtype="bf16", shape=(1, m, 256, 128))
        mem = Op("moe.act", "fwd", "memory", bytes=m * 4096.0)
        for op, kind in ((g, "gemm"), (mem, "memory")):
            out.append(Sample("r", "p", 0, op.event, kind, op.dtype, op.flops, op.bytes, hw.compute_s(op), 1.0))
        nbytes = 2.0**(12 + i)
        out.append(Sample("r", "p", 0, "moe.dispatch_a2a/fwd", "comm", "bf16", 0.0, nbytes,
                          40e-6 + nbytes / 2e9, 1.0, "all_to_all", "ep", 4))
    return out
