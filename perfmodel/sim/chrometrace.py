"""Chrome trace JSON (Perfetto / chrome://tracing loadable).

Write side: a simulated timeline (SimResult.timeline, a list of TraceEvents) becomes one
process per track prefix (`stage0`, `link`, ...) and one thread per track (`stage0/compute`,
`stage0/comm.ep`, `link/nvlink`, ...), complete ('X') events with microsecond times and the
DESIGN.md args (layer, microbatch, rank, bytes, flops). Output is deterministic: tracks are
numbered in sorted order and times are rounded to nanoseconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from perfmodel import atomic
from perfmodel.sim.result import stable as _round


def to_chrome_trace(events: list[Any], metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """TraceEvents (name, track, start_s, dur_s, args) -> a Chrome trace dict."""
    tracks = sorted({e.track for e in events})
    procs = sorted({t.split("/", 1)[0] for t in tracks})
    pid = {p: i + 1 for i, p in enumerate(procs)}
    tid = {t: i + 1 for i, t in enumerate(tracks)}
    out: list[dict[str, Any]] = []
    for p in procs:
        out.append({"ph": "M", "name": "process_name", "pid": pid[p], "tid": 0, "args": {"name": p}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": pid[p], "tid": 0, "args": {"sort_index": pid[p]}})
    for t in tracks:
        p = pid[t.split("/", 1)[0]]
        out.append({"ph": "M", "name": "thread_name", "pid": p, "tid": tid[t], "args": {"name": t}})
        out.append({"ph": "M", "name": "thread_sort_index", "pid": p, "tid": tid[t], "args": {"sort_index": tid[t]}})
    body = []
    for e in events:
        cat = e.track.split("/", 1)[-1].split(".", 1)[0]
        body.append({"ph": "X", "name": e.name, "cat": cat, "pid": pid[e.track.split("/", 1)[0]], "tid": tid[e.track],
                     "ts": round(e.start_s * 1e6, 3), "dur": round(e.dur_s * 1e6, 3), "args": _round(dict(e.args))})
    body.sort(key=lambda x: (x["pid"], x["tid"], x["ts"], -x["dur"], x["name"]))
    return {"traceEvents": out + body, "displayTimeUnit": "ms", "otherData": _round(metadata or {})}


def dumps(events: list[Any], metadata: dict[str, Any] | None = None) -> str:
    return json.dumps(to_chrome_trace(events, metadata), sort_keys=True, separators=(",", ":")) + "\n"


def write_chrome_trace(path: str | Path, events: list[Any], metadata: dict[str, Any] | None = None) -> Path:
    """Write atomically (a killed run leaves the old file or the new one, never half)."""
    return atomic.write_text(path, dumps(events, metadata))


# Read side (one definition, in perfmodel/calibrate/trace_reader.py): torch.profiler (CPU/CUDA) and simulated
# traces -> op-graph event names and phases.
from perfmodel.calibrate.trace_reader import RankTrace, Span, load_events, read_run, read_trace  # noqa: E402

__all__ = ["to_chrome_trace", "dumps", "write_chrome_trace", "RankTrace", "Span", "load_events", "read_run", "read_trace"]
