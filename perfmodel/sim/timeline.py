"""The simulated timeline (TraceEvents) of one iteration, for `--trace`.

Tracks: stage<s>/pipeline (forward/backward chunks per micro-batch), stage0/compute and
stage0/comm.<group> (one MoE/dense layer of micro-batch 0, forward and backward, op by op),
link/<class> (the link class each collective of that layer is bound by), stage<s>/comm.dp
(gradient sync) and stage<s>/compute (optimizer step).
"""

from __future__ import annotations

from typing import Any

from perfmodel.sim.layer import LayerRun
from perfmodel.sim.pipeline import PipelineRun
from perfmodel.sim.result import TraceEvent


def build_timeline(pipe: PipelineRun, runs: tuple[LayerRun, LayerRun], syncs: list[tuple[float, float, float, float]],
                   totals: list[float], ctx: Any, graph: Any) -> list[TraceEvent]:
    out = [TraceEvent(f"pipeline.{sp.kind}", f"stage{sp.stage}/pipeline", sp.start_s, sp.end_s - sp.start_s,
                      {"stage": sp.stage, "microbatch": sp.microbatch, "chunk": sp.chunk})
           for sp in pipe.spans]
    rank = ctx.reps[0]
    for kind, run in zip(("fwd", "bwd"), runs, strict=True):
        first = next((sp for sp in pipe.spans if sp.stage == 0 and sp.kind == kind and sp.microbatch == 0), None)
        if first is None:  # DualPipeV runs micro-batch 0's backward overlapped with a forward (fwd+bwd)
            first = next(sp for sp in pipe.spans if sp.stage == 0 and kind in sp.kind)
        for s in run.spans:
            args = {"layer": 0, "microbatch": 0, "rank": rank, "piece": s.label,
                    "bytes": s.op.bytes * s.frac, "flops": s.op.flops * s.frac}
            start, dur = first.start_s + s.start_s, s.end_s - s.start_s
            out.append(TraceEvent(s.op.event, f"stage0/{s.stream}", start, dur, args))
            if s.op.kind == "comm":
                cls = ctx.cost(s.op).link_class
                out.append(TraceEvent(s.op.event, f"link/{cls}", start, dur, args))
    for st, (red, gat, exposed, opt) in enumerate(syncs):
        end = totals[st] - opt
        if red + gat > 0:
            out.append(TraceEvent("dp.grad_sync", f"stage{st}/comm.dp", max(0.0, end - red - gat), red + gat,
                                  {"stage": st, "exposed_s": exposed}))
        out.append(TraceEvent("optim.step", f"stage{st}/compute", end, opt, {"stage": st}))
    return out
