"""The fake simulator (fakes.py) behaves like the simulator's contract: never faster than the bound."""

from __future__ import annotations

from fakes import fake_simulate

from perfmodel.search import lower_bound_s
from perfmodel.specs import load_spec


def test_fake_never_beats_the_bound():
    model, cluster = load_spec("mixtral-8x7b", "model"), load_spec("h100-dgx-8", "cluster")
    plan = load_spec("h100-dgx-8", "cluster") and __import__("perfmodel.specs").specs.PlanSpec(ep=8, global_batch=16)
    r = fake_simulate(model, cluster, plan)
    assert r.step_time_s >= lower_bound_s(model, plan, 8, cluster.profile())
