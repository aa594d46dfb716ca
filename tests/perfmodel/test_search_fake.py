"""A tiny, deterministic stand-in for perfmodel.sim.simulate (fast unit tests of search and
report), and a check that it behaves like the simulator's contract."""

from __future__ import annotations

from perfmodel.search import lower_bound_s
from perfmodel.sim.memory import estimate_memory
from perfmodel.sim.result import SimResult, TraceEvent
from perfmodel.specs import load_spec
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


def test_fake_never_beats_the_bound():
    model, cluster = load_spec("mixtral-8x7b", "model"), load_spec("h100-dgx-8", "cluster")
    plan = load_spec("h100-dgx-8", "cluster") and __import__("perfmodel.specs").specs.PlanSpec(ep=8, global_batch=16)
    r = fake_simulate(model, cluster, plan)
    assert r.step_time_s >= lower_bound_s(model, plan, 8, cluster.profile())


def sim_for_tests():
    """The real simulator once it exists, else the fake (both take the same arguments)."""
    try:
        from perfmodel.sim import simulate
    except ImportError:
        return fake_simulate
    return simulate
