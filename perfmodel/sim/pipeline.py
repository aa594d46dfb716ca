"""Pipeline schedules composed from per-micro-batch times of each virtual stage.

Each pipeline rank runs its actions in the schedule's order, one at a time; an action starts when
the rank is free and its inputs have arrived (the neighbouring virtual stage's output plus one
point-to-point transfer when that stage lives on another rank). Actions:
  F   forward of virtual stage v for micro-batch mb
  B   input-gradient backward (dgrad, with any recomputation)      -- zero-bubble schedules
  W   weight-gradient backward (wgrad), any time after its B        -- zero-bubble schedules
  BW  full backward (B then W)
  FB  a forward and a full backward of two micro-batches run overlapped (DualPipe's F&B: one's
      all-to-alls hide under the other's compute), priced by the caller's `fb_s(vf, vb)`
Orders (same rank orders as torch.distributed.pipelining, which the runtime runs):
  1f1b, interleaved  Megatron-LM's (interleaved: v = chunk*pp + rank)
  zero-bubble        ZB-V (Qi et al., arXiv 2401.10241 s.6): V placement, B/W split, W fills bubbles
  dualpipev          DualPipeV (DeepSeek-V3's DualPipe cut in half, github.com/deepseek-ai/DualPipe)
Closed forms with uniform stages, zero p2p and m micro-batches (tests/perfmodel/test_pipeline.py):
  1F1B (pp-1)(F+B+W); interleaved (pp-1)(F+B+W)/vpp with per-rank times; ZB-V (pp-1)(F+B-2W)
  per chunk when that is >= 0; DualPipeV (pp-1)(F&B + B+W - 3W) per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from perfmodel.pplayout import StageLayout

Action = tuple  # ("F"|"B"|"W"|"BW", v, mb) or ("FB", vf, mbf, vb, mbb)


@dataclass(frozen=True)
class Span:
    stage: int  # pipeline rank
    kind: str  # fwd | bwd | wgrad | fwd+bwd
    microbatch: int
    chunk: int  # virtual stage
    start_s: float
    end_s: float


@dataclass
class PipelineRun:
    finish_s: list[float]  # per rank: when its last action ends
    busy_s: list[float]  # per rank: sum of its action durations
    spans: list[Span]

    @property
    def step_s(self) -> float:
        return max(self.finish_s)


# ----------------------------------------------------------------------------- orders
def _megatron_order(rank: int, pp: int, m: int, vpp: int) -> list[Action]:
    """Megatron-LM's 1F1B (vpp=1) and interleaved 1F1B: warm-up forwards, steady 1F1B, cool-down."""
    total = m * vpp

    def ident(k: int, backward: bool) -> tuple[int, int]:
        c = (k // pp) % vpp
        return (vpp - 1 - c if backward else c) * pp + rank, (k // (pp * vpp)) * pp + k % pp

    warm = min(m, pp - rank - 1) if vpp == 1 else min(total, (pp - rank - 1) * 2 + (vpp - 1) * pp)
    order: list[Action] = [("F", *ident(k, False)) for k in range(warm)]
    for i in range(total - warm):
        order += [("F", *ident(warm + i, False)), ("BW", *ident(i, True))]
    return order + [("BW", *ident(k, True)) for k in range(total - warm, total)]


class _Counter:
    """Next micro-batch per (kind, stage), and the queue of W actions a B left pending."""

    def __init__(self) -> None:
        self.n: dict[tuple[str, int], int] = {}
        self.w_queue: list[tuple[int, int]] = []

    def take(self, kind: str, v: int) -> int:
        mb = self.n.get((kind, v), 0)
        self.n[(kind, v)] = mb + 1
        return mb


def _zbv_order(rank: int, pp: int, m: int) -> list[Action]:
    """ZB-V: warm-up F of chunk 0, then chunk 1, steady F-B-W per chunk, W fills the cool-down."""
    s0, s1 = rank, 2 * pp - 1 - rank
    n = max(2 * pp - 1, m)  # the order is built for a full pipeline; extra micro-batches are dropped
    c = _Counter()
    out: list[Action] = []

    def f(v):
        out.append(("F", v, c.take("F", v)))

    def b(v):
        out.append(("B", v, c.take("B", v)))

    def w(v):
        out.append(("W", v, c.take("W", v)))

    for _ in range(2 * (pp - rank) - 1):
        f(s0)
    for _ in range(rank):
        f(s1)
        f(s0)
    for _ in range(pp - rank):
        f(s1)
        b(s1)
        w(s1)
    while c.n.get(("F", s1), 0) < c.n.get(("F", s0), 0) or c.n.get(("F", s0), 0) < n:
        if c.n.get(("F", s0), 0) < n:
            f(s0)
        b(s0)
        w(s0)
        f(s1)
        b(s1)
        w(s1)
    for _ in range(rank):
        b(s0)
        b(s1)
    for _ in range(pp - rank):
        b(s0)
        w(s0)
    while c.n.get(("W", s1), 0) < c.n.get(("B", s1), 0):
        w(s1)
    while c.n.get(("W", s0), 0) < c.n.get(("B", s0), 0):
        w(s0)
    return [a for a in out if a[2] < m]


def _dualpipev_order(rank: int, pp: int, m: int) -> list[Action]:
    """DualPipeV's eight steps (m >= 2*pp): F0 | F0F1 | B1W1F1 | (F0&B1, F1&B0) | B1, F1&B0 | B1B0 | WB0 | W."""
    s0, s1 = rank, 2 * pp - 1 - rank
    c = _Counter()
    out: list[Action] = []

    def f(v):
        out.append(("F", v, c.take("F", v)))

    def bw(v):  # full backward
        mb = c.take("B", v)
        c.take("W", v)
        out.append(("BW", v, mb))

    def b(v):  # input backward; its W waits in the queue
        mb = c.take("B", v)
        c.w_queue.append((v, mb))
        out.append(("B", v, mb))

    def w():
        if c.w_queue:
            v, mb = c.w_queue.pop(0)
            c.take("W", v)
            out.append(("W", v, mb))

    def fb(vf, vb):
        mf, mb = c.take("F", vf), c.take("B", vb)
        c.take("W", vb)
        out.append(("FB", vf, mf, vb, mb))

    for _ in range(2 * (pp - rank - 1)):
        f(s0)
    for _ in range(rank + 1):
        f(s0)
        f(s1)
    for _ in range(pp - rank - 1):
        b(s1)
        w()
        f(s1)
    for i in range(m - 2 * pp + rank + 1):
        if i == 0 and rank == pp - 1:  # not overlapped: shortens the bubble on the last rank
            f(s0)
            bw(s1)
        else:
            fb(s0, s1)
        fb(s1, s0)
    for _ in range(pp - rank - 1):
        bw(s1)
        fb(s1, s0)
    zb = False
    for i in range(rank + 1):  # the second half of the cool-down splits B from W (zero bubble)
        if i == (rank + 1) // 2 and rank % 2 == 1:
            zb = True
        (b if zb else bw)(s1)
        if i == (rank + 1) // 2 and rank % 2 == 0:
            zb = True
        (b if zb else bw)(s0)
    for _ in range(pp - rank - 1):
        w()
        (b if zb else bw)(s0)
    for _ in range(rank + 1):
        w()
    return out


def rank_orders(schedule: str, pp: int, m: int, vpp: int) -> list[list[Action]]:
    if schedule == "zero-bubble":
        return [_zbv_order(r, pp, m) for r in range(pp)]
    if schedule == "dualpipev":
        if m < 2 * pp:
            raise ValueError(f"dualpipev needs at least 2*pp={2 * pp} micro-batches, got {m}")
        return [_dualpipev_order(r, pp, m) for r in range(pp)]
    return [_megatron_order(r, pp, m, vpp) for r in range(pp)]


# --------------------------------------------------------------------------- executor
def run_schedule(stages: StageLayout, schedule: str, m: int, fwd_s: list[float], bwd_s: list[float],
                 wgrad_s: list[float] | None = None, p2p_s: float = 0.0,
                 fb_s: Callable[[int, int], float] | None = None) -> PipelineRun:
    """Execute the schedule. Times are per micro-batch per virtual stage: fwd_s, bwd_s (the whole
    backward, W included) and wgrad_s (the W part of it; 0 when not given)."""
    n, pp = stages.n_stages, stages.pp
    w_s = wgrad_s or [0.0] * n
    b_s = [bwd_s[v] - w_s[v] for v in range(n)]
    fb = fb_s or (lambda vf, vb: fwd_s[vf] + bwd_s[vb])
    orders = rank_orders(schedule, pp, m, stages.vpp)
    rank_of = [stages.rank_of(v) for v in range(n)]
    done: dict[tuple[str, int, int], float] = {}

    def arrival(kind: str, v: int, mb: int) -> float | None:
        if kind == "F":
            if v == 0:
                return 0.0
            dep, hop = ("F", v - 1, mb), rank_of[v - 1] != rank_of[v]
        elif kind in ("B", "BW"):
            if v == n - 1:
                dep, hop = ("F", v, mb), False
            else:
                dep, hop = ("B", v + 1, mb), rank_of[v + 1] != rank_of[v]
        else:
            dep, hop = ("B", v, mb), False
        t = done.get(dep)
        return None if t is None else t + (p2p_s if hop else 0.0)

    def ready(a: Action) -> float | None:
        if a[0] == "FB":
            t1, t2 = arrival("F", a[1], a[2]), arrival("BW", a[3], a[4])
            return None if t1 is None or t2 is None else max(t1, t2)
        return arrival(a[0], a[1], a[2])

    def duration(a: Action) -> float:
        return {"F": lambda: fwd_s[a[1]], "B": lambda: b_s[a[1]], "W": lambda: w_s[a[1]],
                "BW": lambda: bwd_s[a[1]], "FB": lambda: fb(a[1], a[3])}[a[0]]()

    pos, free, busy = [0] * pp, [0.0] * pp, [0.0] * pp
    spans: list[Span] = []
    names = {"F": "fwd", "B": "bwd", "W": "wgrad", "BW": "bwd"}
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                a = orders[r][pos[r]]
                t = ready(a)
                if t is None:
                    break
                start = max(t, free[r])
                end = start + duration(a)
                if a[0] == "FB":
                    done[("F", a[1], a[2])] = done[("B", a[3], a[4])] = done[("W", a[3], a[4])] = end
                    spans.append(Span(r, "fwd+bwd", a[2], a[1], start, end))
                else:
                    done[(a[0][0], a[1], a[2])] = end
                    if a[0] == "BW":
                        done[("W", a[1], a[2])] = end
                    spans.append(Span(r, names[a[0]], a[2], a[1], start, end))
                free[r] = end
                busy[r] += end - start
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # pragma: no cover - the orders above cannot deadlock
            raise RuntimeError(f"pipeline schedule {schedule} deadlocked")
    return PipelineRun(free, busy, spans)


def run_pipeline(fwd_s: list[float], bwd_s: list[float], m: int, vpp: int = 1, p2p_s: float = 0.0) -> PipelineRun:
    """1F1B / interleaved 1F1B from per-rank times (each rank's vpp chunks equal: fwd_s[r] / vpp each)."""
    pp = len(fwd_s)
    n = pp * vpp
    stages = StageLayout(pp, vpp, "loop", tuple((v, v + 1) for v in range(n)))
    per_f = [fwd_s[v % pp] / vpp for v in range(n)]
    per_b = [bwd_s[v % pp] / vpp for v in range(n)]
    return run_schedule(stages, "interleaved" if vpp > 1 else "1f1b", m, per_f, per_b, p2p_s=p2p_s)
