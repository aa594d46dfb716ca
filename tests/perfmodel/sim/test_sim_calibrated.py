"""A calibrated profile's per-collective alpha-beta fits price the collectives they measured."""

import pytest

from perfmodel.sim import simulate
from perfmodel.specs import CollectiveFit, PlanSpec, load_spec


def test_collective_fit_replaces_topology_estimate():
    model, cluster = load_spec("tiny-moe", "model"), load_spec("cpu-local-4", "cluster")
    plan = PlanSpec(ep=4, global_batch=8)
    base = cluster.profile()
    prof = base.model_copy(update={"collectives": {"all_to_all.ep": CollectiveFit(latency_us=1000.0, bw_GBps=0.01)}})
    plain = simulate(model, cluster, plan, base).details["layer_ops"]
    calib = simulate(model, cluster, plan, prof).details["layer_ops"]
    from perfmodel.sim.opgraph import OpGraph

    op = next(o for o in OpGraph(model, plan, 4).layers["moe"].ops if o.event == "moe.dispatch_a2a/fwd")
    expect = 1e-3 * 3 + op.bytes_per_rank * op.imbalance / 0.01e9  # latency per step; 3 peer exchanges
    assert calib["moe.dispatch_a2a/fwd"] == pytest.approx(expect, rel=1e-6)
    assert plain["moe.dispatch_a2a/fwd"] != pytest.approx(expect, rel=0.1)
