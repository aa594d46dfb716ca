"""Read Chrome trace JSON (torch.profiler's, CPU and CUDA, and the simulator's own) into op times.

Every event is mapped to an op-graph event name `op/phase` (opnames.OP_NAMES) or to nothing:

* `record_function("moe.fc1/fwd")` spans (and the simulator's spans) name themselves. A `/fwd`
  span that runs inside an autograd backward is a recomputation (`/recompute`).
* Autograd backward nodes (`autograd::engine::evaluate_function: MmBackward0`) carry the
  `Sequence number` of the forward aten op that created them; the backward time is charged to
  the op-graph op whose span enclosed that forward op, as `/dgrad`. For GEMM ops the matmuls
  inside the node are split: the one that contracts over the forward's token dimension (rows
  of the forward input) computes the weight gradient (`/wgrad`), the other the input gradient.
* Time is attributed by exclusive (self) time: an event's time goes to its own label or, when
  it has none, to the nearest labelled ancestor on the same thread. Nested op spans therefore
  never count twice. On traces with GPU kernels, op time is the device time of the kernels
  each op launched (linked by `correlation`), not the CPU time of the launch.
* Steps are `ProfilerStep#N` spans; a trace without them (the simulator's) is one step.
* Profiler overhead: every op also counts the profiler events charged to it (`op_events`), so
  a caller that knows what one event costs the profiler on that host (perfmodel.calibrate fits
  it from profiled vs unprofiled step times) can take it out: `op_seconds_per_step(us_per_event)`
  (never below a fifth of the traced time). GPU kernel times need no correction (events = 0).

Unknown events are tolerated (their time is reported as unattributed); a file that is not a
Chrome trace raises SpecError naming the file.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from perfmodel.specs import SpecError
from perfmodel.specs.opnames import split_event_name

GEMM_OPS = frozenset({"attn.qkv", "attn.proj", "moe.router", "moe.fc1", "moe.fc2", "moe.shared",
                      "ffn.fc1", "ffn.fc2", "head.proj"})
MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_BWD = "autograd::engine::evaluate_function: "
_STEP = re.compile(r"^ProfilerStep#(\d+)$")
Label = tuple[str, str]  # (op, phase)


@dataclass
class Span:
    """One labelled interval: an op-graph event as it ran (inclusive duration, exclusive share)."""

    op: str
    phase: str
    start_us: float
    dur_us: float
    self_us: float = 0.0  # exclusive time attributed to this label by this span and its unlabelled children
    step: int | None = None
    tid: Any = None
    pid: Any = None
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def event(self) -> str:
        return f"{self.op}/{self.phase}"


@dataclass
class RankTrace:
    path: str
    source: str  # torch | sim
    device: bool  # op times are GPU kernel times
    steps: list[tuple[float, float]]  # (start_us, end_us) of each step
    spans: list[Span]
    op_us: dict[str, float]  # event name -> attributed microseconds, summed over the steps
    unattributed_us: float  # time inside steps that no op name claims
    unknown_events: int
    meta: dict[str, Any] = field(default_factory=dict)
    op_events: dict[str, int] = field(default_factory=dict)  # profiler events charged to each op (CPU time)
    events: int = 0  # profiler events inside the steps (CPU traces)

    @property
    def n_steps(self) -> int:
        return max(1, len(self.steps))

    def step_times_s(self) -> list[float]:
        return [(b - a) * 1e-6 for a, b in self.steps]

    def op_seconds_per_step(self, us_per_event: float = 0.0) -> dict[str, float]:
        """Seconds per step of each op event, less `us_per_event` of profiler cost per event charged to it."""
        c = max(0.0, us_per_event)
        return {k: max(v - c * self.op_events.get(k, 0), 0.2 * v) * 1e-6 / self.n_steps
                for k, v in sorted(self.op_us.items())}

    def unattributed_s_per_step(self, us_per_event: float = 0.0) -> float:
        """Step time no op claims, less the profiler cost of the events in it."""
        free = self.events - sum(self.op_events.values())
        return max(0.0, self.unattributed_us - max(0.0, us_per_event) * free) * 1e-6 / self.n_steps

    def step_events(self) -> float:
        return self.events / self.n_steps

    def counts_per_step(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for s in self.spans:
            if s.step is not None or not self.steps:
                out[s.event] += 1.0 / self.n_steps
        return dict(out)


def _clean(e: dict[str, Any]) -> dict[str, Any]:
    """A damaged event made harmless: object args, hashable pid/tid."""
    bad = {k: (repr(e[k]) if k in ("pid", "tid") else {}) for k in ("pid", "tid", "args")
           if k in e and not (isinstance(e[k], dict) if k == "args" else isinstance(e[k], (int, float, str, type(None))))}
    return {**e, **bad} if bad else e


def load_events(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The trace's event list and its top-level fields; SpecError if it is not a Chrome trace."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        data = json.loads(raw)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise SpecError(f"{path}: not a Chrome trace (not JSON: {str(exc)[:80]})") from None
    top: dict[str, Any] = {}
    if isinstance(data, dict):
        top, data = data, data.get("traceEvents")
    if not isinstance(data, list) or not all(isinstance(e, dict) and "ph" in e for e in data[:1000]):
        raise SpecError(f"{path}: not a Chrome trace (expected traceEvents: a list of events with 'ph')")
    # a hand-edited or damaged trace: events that are not objects are dropped, non-object args emptied
    events = [_clean(e) for e in data if isinstance(e, dict) and "ph" in e]
    return events, {k: v for k, v in top.items() if k != "traceEvents"}


def _num(x: Any, default: float = 0.0) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return v if v == v and abs(v) != float("inf") else default


class _Node:
    __slots__ = ("ev", "start", "end", "children", "label", "name", "cat")

    def __init__(self, ev: dict[str, Any]):
        self.ev, self.name, self.cat = ev, str(ev.get("name", "")), str(ev.get("cat", ""))
        self.start = _num(ev.get("ts"))
        self.end = self.start + max(0.0, _num(ev.get("dur")))
        self.children: list[_Node] = []
        self.label: Label | None = None


def _forest(events: list[dict[str, Any]]) -> list[_Node]:
    """Nest the complete ('X') events of one thread by time; returns the roots."""
    nodes = sorted((_Node(e) for e in events), key=lambda n: (n.start, -n.end))
    roots: list[_Node] = []
    stack: list[_Node] = []
    for n in nodes:
        while stack and (n.start >= stack[-1].end or n.end > stack[-1].end + 1e-3):
            stack.pop()  # ended before n, or overlaps it without nesting (then n is a sibling)
        (stack[-1].children if stack else roots).append(n)
        stack.append(n)
    return roots


def _walk(nodes: list[_Node]):
    todo = list(reversed(nodes))
    while todo:
        n = todo.pop()
        yield n
        todo.extend(reversed(n.children))


def _inner_dim(ev: dict[str, Any]) -> int | None:
    dims = (ev.get("args") or {}).get("Input Dims")
    if not isinstance(dims, list) or len(dims) < 2:
        return None
    a = dims[1] if ev.get("name") in ("aten::addmm", "aten::baddbmm") and len(dims) >= 3 else dims[0]
    return a[-1] if isinstance(a, list) and a and isinstance(a[-1], int) else None


def _rows(ev: dict[str, Any]) -> int | None:
    dims = (ev.get("args") or {}).get("Input Dims")
    if not isinstance(dims, list) or not dims:
        return None
    a = dims[1] if ev.get("name") in ("aten::addmm", "aten::baddbmm") and len(dims) >= 3 else dims[0]
    return a[-2] if isinstance(a, list) and len(a) >= 2 and isinstance(a[-2], int) else None


def _label_threads(threads: dict[Any, list[_Node]]) -> None:
    """Give every node its own label where it has one (named spans, backward nodes, wgrad matmuls)."""
    fwd_of_seq: dict[tuple[Any, int], tuple[Label | None, int | None]] = {}
    # pass 1: named spans; forward ops remember the label of the span they ran in (by sequence number)
    for (pid, _tid), roots in threads.items():
        def visit(n: _Node, inherited: Label | None, in_bwd: bool, pid: Any = pid) -> None:
            parsed = split_event_name(n.name)
            if parsed is not None:
                op, phase = parsed
                n.label = (op, "recompute" if in_bwd and phase == "fwd" else phase)
            cur = n.label or inherited
            in_bwd = in_bwd or n.name.startswith(_BWD)
            seq = (n.ev.get("args") or {}).get("Sequence number")
            if isinstance(seq, int) and not in_bwd:  # unlabelled creators count too (their backward is unnamed)
                # ops carry the number the next autograd node will get: the node's creator is the
                # LAST forward op seen with it (earlier ones were non-differentiable)
                key = (pid, seq)
                prev = fwd_of_seq.get(key)
                rows = _rows(n.ev) if n.name in MATMULS else None
                if rows is None and prev is not None and prev[0] == cur:
                    rows = prev[1]
                fwd_of_seq[key] = (cur, rows)
            for c in n.children:
                visit(c, cur, in_bwd)

        for r in roots:
            visit(r, None, False)
    # pass 2: backward nodes take the forward op's name as dgrad; GEMM weight-gradient matmuls are wgrad
    for (pid, _tid), roots in threads.items():
        for n in _walk(roots):
            if not n.name.startswith(_BWD) or n.label is not None:
                continue
            seq = (n.ev.get("args") or {}).get("Sequence number")
            hit = fwd_of_seq.get((pid, seq)) if isinstance(seq, int) else None
            if hit is None or hit[0] is None:
                continue
            (op, _phase), rows = hit
            n.label = (op, "dgrad")
            if op in GEMM_OPS and rows is not None:
                for c in _walk(n.children):
                    if c.name in MATMULS and c.label is None and _inner_dim(c.ev) == rows:
                        c.label = (op, "wgrad")


def read_trace(path: str | Path, meta: dict[str, Any] | None = None) -> RankTrace:
    events, top = load_events(path)
    complete = [e for e in events if e.get("ph") == "X" and isinstance(e.get("name"), str)]
    # gpu_user_annotation: the profiler's copy of each CPU span on the GPU timeline (ProfilerStep#N
    # too) -- read as a CPU thread it would double the steps and the spans
    cpu = [e for e in complete if str(e.get("cat", "")) not in DEVICE_CATS + ("gpu_user_annotation",)]
    device = [e for e in complete if str(e.get("cat", "")) in DEVICE_CATS]
    source = "torch" if any(str(e.get("cat", "")) in ("cpu_op", "user_annotation") for e in cpu) else "sim"
    by_thread: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in cpu:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    threads = {k: _forest(v) for k, v in by_thread.items()}
    _label_threads(threads)

    steps: list[tuple[float, float]] = []
    for roots in threads.values():
        for n in _walk(roots):
            if _STEP.match(n.name):
                steps.append((n.start, n.end))
    steps = sorted(set(steps))
    if not steps and complete:
        lo = min(_num(e.get("ts")) for e in complete)
        hi = max(_num(e.get("ts")) + _num(e.get("dur")) for e in complete)
        bounds = (lo, hi)  # one implicit step: everything counts
    else:
        bounds = None

    def step_of(t: float) -> int | None:
        for i, (a, b) in enumerate(steps):
            if a <= t < b:
                return i
        return None

    op_us: dict[str, float] = defaultdict(float)
    op_events: dict[str, int] = defaultdict(int)
    n_counted = 0
    spans: list[Span] = []
    unknown = 0
    corr_label: dict[Any, Label] = {}
    for (pid, tid), roots in threads.items():
        def visit(n: _Node, inherited: Label | None, span: Span | None, pid: Any = pid, tid: Any = tid) -> None:
            nonlocal unknown, n_counted
            cur = n.label or inherited
            if n.label is not None and (span is None or n.label != inherited):
                span = Span(n.label[0], n.label[1], n.start, n.end - n.start, step=step_of(n.start),
                            tid=tid, pid=pid, args=dict(n.ev.get("args") or {}))
                spans.append(span)
            corr = (n.ev.get("args") or {}).get("correlation")
            if corr is not None and cur is not None:
                corr_label[corr] = cur
            if cur is None and n.cat not in ("cpu_op", "user_annotation", "cuda_runtime", "Trace", "python_function") \
                    and not _STEP.match(n.name):
                unknown += 1
            own = (n.end - n.start) - sum(c.end - c.start for c in n.children)
            counted = bounds is not None or step_of(n.start) is not None
            if counted and not _STEP.match(n.name):
                n_counted += not device  # profiler events in CPU time (kernel times carry none)
                if cur is not None and span is not None:
                    span.self_us += max(0.0, own)
                    if not device:
                        op_us[f"{cur[0]}/{cur[1]}"] += max(0.0, own)
                        op_events[f"{cur[0]}/{cur[1]}"] += 1
            for c in n.children:
                visit(c, cur, span)

        for r in roots:
            visit(r, None, None)
    if device:
        for e in device:
            lab = corr_label.get((e.get("args") or {}).get("correlation"))
            if lab is not None:
                op_us[f"{lab[0]}/{lab[1]}"] += _num(e.get("dur"))
    total = sum(b - a for a, b in steps) if steps else (bounds[1] - bounds[0] if bounds else 0.0)
    unattributed = max(0.0, total - sum(op_us.values()))
    spans.sort(key=lambda s: (s.start_us, s.tid is None, str(s.tid)))
    if not steps and bounds is not None:
        steps = [bounds]
    info = dict(meta or {})
    info.setdefault("host", top.get("host_name", ""))
    if isinstance(top.get("moeperf_run"), dict):  # who wrote it (runtime/profiling.py): checked by read_run
        info["recorded_as"] = top["moeperf_run"]
    return RankTrace(str(path), source, bool(device), steps, spans, dict(op_us), unattributed, unknown, info,
                     dict(op_events), n_counted)


def rank_files(trace_dir: str | Path) -> list[Path]:
    """`rank<k>.json` files of a trace directory, in rank order; SpecError when there are none."""
    d = Path(trace_dir)
    if not d.is_dir():
        raise SpecError(f"{d}: not a trace directory (expected traces/<run-id>/rank<k>.json + meta.yaml)")
    files = [p for p in d.iterdir() if re.fullmatch(r"rank\d+\.json(\.gz)?", p.name)]
    if not files:
        raise SpecError(f"{d}: no rank<k>.json traces in it")
    return sorted(files, key=lambda p: int(re.findall(r"\d+", p.name)[0]))


def read_meta(trace_dir: str | Path) -> dict[str, Any]:
    from perfmodel.specs import yamlsafe

    p = Path(trace_dir) / "meta.yaml"
    if not p.is_file():
        raise SpecError(f"{trace_dir}: no meta.yaml (model, plan, cluster, world_size) beside the traces")
    try:
        meta = yamlsafe.load_file(p)
    except yamlsafe.YamlError as exc:
        raise SpecError(str(exc)) from None
    if not isinstance(meta, dict):
        raise SpecError(f"{p}: expected a mapping")
    return meta


def read_run(trace_dir: str | Path) -> tuple[dict[str, Any], list[RankTrace]]:
    """meta.yaml and every rank's trace of one recorded run (parsed once per process while its
    files are unchanged: compare reads a run for calibration and again for its per-op table)."""
    d = Path(trace_dir).resolve()
    files = rank_files(d) + [d / "meta.yaml"]
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file())
    return _read_run(d, stamp)


@lru_cache(maxsize=32)
def _read_run(trace_dir: Path, _stamp: tuple) -> tuple[dict[str, Any], list[RankTrace]]:
    meta = read_meta(trace_dir)
    traces = [read_trace(p, meta) for p in rank_files(trace_dir)]
    for tr in traces:
        check_belongs(tr, meta)
    return meta, traces


def check_belongs(tr: RankTrace, meta: dict[str, Any]) -> None:
    """Refuse a rank trace that another run (model, plan, world size) or another rank recorded."""
    k = int(re.findall(r"\d+", Path(tr.path).name)[0])
    world = meta.get("world_size")
    if isinstance(world, int) and not 0 <= k < world:
        raise SpecError(f"{tr.path}: rank {k} but meta.yaml says world_size {world} (a trace from another run?)")
    rec = tr.meta.get("recorded_as") or {}
    for key in ("model", "plan", "world_size"):
        if key in rec and key in meta and rec[key] != meta[key]:
            raise SpecError(f"{tr.path}: recorded with a different {key} than meta.yaml describes "
                            "(a trace from another run?); refused")
    if "rank" in rec and rec["rank"] != k:
        raise SpecError(f"{tr.path}: recorded by rank {rec['rank']}, not rank {k}; refused")
