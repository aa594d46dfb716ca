"""torch.profiler around training steps A..B: one Chrome trace per rank plus meta.yaml.

    prof = StepProfiler.create("3:5", out / "traces" / run_id, rank, world, model, plan, cluster)
    for step in ...:
        prof.begin(step)
        ...                       # ops run inside record_function("moe.fc1/fwd") etc.
        prof.end(step, seconds)
    prof.close()

Writes `rank<k>.json` (what torch.profiler exports, each `op/phase` span annotated with the op
graph's `op, phase, rank, layer, microbatch, flops, bytes`, plus `collective, group,
bytes_per_rank` for communication and the matmul `shapes` seen inside GEMMs) and, on rank 0,
`meta.yaml` (model, plan, cluster, world size, versions, host, the profiled steps and the
wall time of every step, profiled or not). Files are written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import tempfile
from collections import defaultdict
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.profiler import ProfilerActivity, profile, record_function

from perfmodel import atomic
from perfmodel.specs import ModelSpec, PlanSpec, SpecError
from perfmodel.specs.opnames import split_event_name

STEP_PREFIX = "ProfilerStep#"


def parse_steps(arg: str | None) -> tuple[int, int] | None:
    """'A:B' (inclusive, 1-based steps) -> (A, B); None/'' -> None."""
    if not arg:
        return None
    try:
        a, b = (int(x) for x in arg.split(":"))
    except ValueError:
        raise SpecError(f"--profile-steps: expected A:B (e.g. 3:5), got {arg!r}") from None
    if a < 1 or b < a:
        raise SpecError(f"--profile-steps: need 1 <= A <= B, got {arg!r}")
    return a, b


def versions() -> dict[str, str]:
    from perfmodel import __version__

    return {"moeperf": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
            "platform": platform.platform()}


class StepProfiler:
    def __init__(self, steps: tuple[int, int] | None, out_dir: Path | None, rank: int, world: int,
                 model: ModelSpec | None = None, plan: PlanSpec | None = None, cluster: Any = None,
                 extra: dict[str, Any] | None = None):
        self.steps, self.out_dir, self.rank, self.world = steps, out_dir, rank, world
        self.model, self.plan, self.cluster, self.extra = model, plan, cluster, dict(extra or {})
        self.prof: profile | None = None
        self.scope: AbstractContextManager | None = None
        self.times: dict[int, float] = {}

    @classmethod
    def create(cls, arg: str | None, out_dir: Path | None, rank: int, world: int, model: ModelSpec | None = None,
               plan: PlanSpec | None = None, cluster: Any = None, **extra: Any) -> StepProfiler:
        steps = parse_steps(arg)
        if steps and out_dir is None:
            raise SpecError("--profile-steps needs --out (traces go to <out>/traces/<run-id>/)")
        return cls(steps, out_dir, rank, world, model, plan, cluster, extra)

    def active(self, step: int) -> bool:
        return self.steps is not None and self.steps[0] <= step <= self.steps[1]

    def begin(self, step: int) -> None:
        if not self.active(step):
            return
        if self.prof is None:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts, record_shapes=True)
            self.prof.start()
        self.scope = record_function(f"{STEP_PREFIX}{step}")
        self.scope.__enter__()

    def end(self, step: int, seconds: float | None = None) -> None:
        if seconds is not None:
            self.times[step] = float(seconds)
        if self.scope is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.scope.__exit__(None, None, None)
            self.scope = None
        if self.prof is not None and self.steps and step >= self.steps[1]:
            self._export()

    def close(self) -> None:
        if self.prof is not None:
            self._export()
        if self.rank == 0 and self.steps and self.out_dir is not None:
            self.write_meta()

    # ----------------------------------------------------------------- output
    def _export(self) -> None:
        prof, self.prof = self.prof, None
        assert prof is not None and self.out_dir is not None
        prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".rank{self.rank}.", suffix=".json", dir=self.out_dir)
        os.close(fd)
        try:
            prof.export_chrome_trace(tmp)
            data = json.loads(Path(tmp).read_text())
        finally:
            Path(tmp).unlink(missing_ok=True)
        annotate(data, self.rank, self.world, self.model, self.plan)
        data["moeperf_run"] = {  # checked against meta.yaml by perfmodel.calibrate.trace_reader.read_run
            "model": self.model.model_dump(mode="json") if self.model is not None else None,
            "plan": self.plan.model_dump(mode="json") if self.plan is not None else None,
            "world_size": self.world, "rank": self.rank}
        atomic.write_text(self.out_dir / f"rank{self.rank}.json", json.dumps(data, separators=(",", ":")))

    def write_meta(self) -> Path:
        assert self.out_dir is not None and self.steps is not None
        a, b = self.steps
        model = self.model.model_dump(mode="json") if self.model is not None else None
        plan = self.plan.model_dump(mode="json") if self.plan is not None else None
        cluster = self.cluster.model_dump(mode="json") if hasattr(self.cluster, "model_dump") else self.cluster
        times = sorted(self.times.items())
        meta = {
            "run_id": self.out_dir.name, "model": model, "plan": plan, "cluster": cluster, "world_size": self.world,
            "profile_steps": [a, b], "host": socket.gethostname(), "versions": versions(),
            "torch_threads": torch.get_num_threads(), "argv": list(sys.argv),
            # wall time of the unprofiled steps after the first three (warm-up), and of the profiled ones
            "step_times_s": [round(t, 6) for s, t in times if not (a <= s <= b) and s > 3],
            "profiled_step_times_s": [round(t, 6) for s, t in times if a <= s <= b],
            **self.extra,
        }
        return atomic.write_text(self.out_dir / "meta.yaml", yaml.safe_dump(meta, sort_keys=False, width=110))


def _op_table(rank: int, world: int, model: ModelSpec, plan: PlanSpec) -> tuple[dict[str, Any], dict[str, int]]:
    from perfmodel.calibrate.data import stage_of, stage_ops
    from perfmodel.sim.opgraph import OpGraph

    graph = OpGraph(model, plan, world)
    stage = stage_of(plan, world, rank)
    ops = {ev: op for ev, (op, _n) in stage_ops(graph, stage).items()}
    kinds = graph.stage_layer_kinds(stage)
    per_layer = {ev: kinds.count(kind) for kind, layer in graph.layers.items() for ev in
                 (o.event for o in layer.ops)}
    return ops, per_layer


def annotate(data: dict[str, Any], rank: int, world: int, model: ModelSpec | None, plan: PlanSpec | None) -> None:
    """Add op-graph args (flops, bytes, collective payloads, layer/microbatch, matmul shapes) to op spans."""
    from perfmodel.calibrate.trace_reader import MATMULS, _forest, _walk

    events = data.get("traceEvents", [])
    ops: dict[str, Any] = {}
    per_layer: dict[str, int] = {}
    if model is not None and plan is not None:
        try:
            ops, per_layer = _op_table(rank, world, model, plan)
        except SpecError:
            ops = {}
    threads: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
            threads[(e.get("pid"), e.get("tid"))].append(e)
    for evs in threads.values():
        seen: dict[str, int] = defaultdict(int)
        for n in _walk(_forest(evs)):
            if n.name.startswith(STEP_PREFIX):
                seen.clear()
                continue
            parsed = split_event_name(n.name)
            if parsed is None:
                continue
            args = n.ev.setdefault("args", {})
            k = seen[n.name]
            seen[n.name] += 1
            nl = per_layer.get(n.name, 0)
            args.update(op=parsed[0], phase=parsed[1], rank=rank)
            if nl:
                args.update(layer=k % nl, microbatch=k // nl)
            op = ops.get(n.name)
            if op is not None:
                args.update(kind=op.kind, flops=op.flops, bytes=op.bytes)
                if op.kind == "comm":
                    args.update(collective=op.collective, group=op.group, group_size=op.group_size,
                                bytes_per_rank=op.bytes_per_rank)
            shapes = [(c.ev.get("args") or {}).get("Input Dims") for c in _walk(n.children) if c.name in MATMULS]
            if shapes:
                args["shapes"] = shapes[:16]
