"""Pipeline schedules (1F1B and Megatron's interleaved 1F1B) composed from per-micro-batch stage times.

Each stage runs its forward/backward chunks in the schedule's order, one at a time; a
chunk starts when the stage is free and its input has arrived (the previous virtual
stage's output plus one point-to-point transfer). Stage s with vpp virtual chunks spends
fwd_s[s] / vpp per forward chunk. With uniform stages and zero p2p time, 1F1B takes
(m + pp - 1) (F + B): bubble fraction (pp - 1) / (m + pp - 1).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    stage: int
    kind: str  # fwd | bwd
    microbatch: int
    chunk: int
    start_s: float
    end_s: float


@dataclass
class PipelineRun:
    finish_s: list[float]  # per stage: when its last backward ends
    busy_s: list[float]  # per stage: sum of chunk durations
    spans: list[Span]

    @property
    def step_s(self) -> float:
        return max(self.finish_s)


def stage_order(stage: int, pp: int, m: int, vpp: int) -> list[tuple[str, int, int]]:
    """(kind, microbatch, chunk) in the order the stage runs them (Megatron-LM's schedule)."""
    total = m * vpp

    def ident(k: int, backward: bool) -> tuple[int, int]:
        c = (k // pp) % vpp
        return (k // (pp * vpp)) * pp + k % pp, (vpp - 1 - c) if backward else c

    if vpp == 1:
        warm = min(m, pp - stage - 1)
    else:
        warm = min(total, (pp - stage - 1) * 2 + (vpp - 1) * pp)
    order = [("fwd", *ident(k, False)) for k in range(warm)]
    for i in range(total - warm):
        order.append(("fwd", *ident(warm + i, False)))
        order.append(("bwd", *ident(i, True)))
    order += [("bwd", *ident(k, True)) for k in range(total - warm, total)]
    return order


def run_pipeline(fwd_s: list[float], bwd_s: list[float], m: int, vpp: int = 1, p2p_s: float = 0.0) -> PipelineRun:
    pp = len(fwd_s)
    orders = [stage_order(s, pp, m, vpp) for s in range(pp)]
    pos = [0] * pp
    free = [0.0] * pp
    done: dict[tuple[str, int, int, int], float] = {}  # (kind, chunk, stage, mb) -> end time
    spans: list[Span] = []
    last_v = vpp - 1

    def ready(kind: str, c: int, s: int, mb: int) -> float | None:
        if kind == "fwd":
            if s > 0:
                dep, hop = ("fwd", c, s - 1, mb), p2p_s
            elif c > 0:
                dep, hop = ("fwd", c - 1, pp - 1, mb), p2p_s
            else:
                return 0.0
        elif s < pp - 1:
            dep, hop = ("bwd", c, s + 1, mb), p2p_s
        elif c < last_v:
            dep, hop = ("bwd", c + 1, 0, mb), p2p_s
        else:
            dep, hop = ("fwd", c, s, mb), 0.0
        t = done.get(dep)
        return None if t is None else t + hop

    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(pp):
            while pos[s] < len(orders[s]):
                kind, mb, c = orders[s][pos[s]]
                t = ready(kind, c, s, mb)
                if t is None:
                    break
                start = max(t, free[s])
                end = start + (fwd_s[s] if kind == "fwd" else bwd_s[s]) / vpp
                done[(kind, c, s, mb)] = free[s] = end
                spans.append(Span(s, kind, mb, c, start, end))
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # pragma: no cover - the schedules above cannot deadlock
            raise RuntimeError("pipeline schedule deadlocked")
    busy = [m * (fwd_s[s] + bwd_s[s]) for s in range(pp)]
    return PipelineRun(free, busy, spans)
