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
Closed forms with uniform stages, zero p2p and m micro-batches (tests/perfmodel/sim/test_pipeline.py):
  1F1B (pp-1)(F+B+W); interleaved (pp-1)(F+B+W)/vpp with per-rank times; ZB-V (pp-1)(F+B-2W)
  per chunk when that is >= 0; DualPipeV (pp-1)(F&B + B+W - 3W) per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from perfmodel.specs.pplayout import StageLayout

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
    # per virtual stage: when its weight gradients are final (its last W / BW / FB ends; the DP
    # reduction of that chunk may start) and when its first forward starts (its parameters are needed)
    grads_ready_s: list[float] = field(default_factory=list)
    first_fwd_s: list[float] = field(default_factory=list)

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


@lru_cache(maxsize=256)
def rank_orders(schedule: str, pp: int, m: int, vpp: int) -> tuple[tuple[Action, ...], ...]:
    if schedule == "zero-bubble":
        return tuple(tuple(_zbv_order(r, pp, m)) for r in range(pp))
    if schedule == "dualpipev":
        if m < 2 * pp:
            raise ValueError(f"dualpipev needs at least 2*pp={2 * pp} micro-batches, got {m}")
        return tuple(tuple(_dualpipev_order(r, pp, m)) for r in range(pp))
    return tuple(tuple(_megatron_order(r, pp, m, vpp)) for r in range(pp))


# --------------------------------------------------------------------------- executor
_F, _B, _W = 0, 1, 2  # what an action completes
_SPAN = {"F": "fwd", "B": "bwd", "W": "wgrad", "BW": "bwd", "FB": "fwd+bwd"}
_DONE = {"F": (_F,), "B": (_B,), "W": (_W,), "BW": (_B, _W)}


@lru_cache(maxsize=64)
def _skeleton(schedule: str, pp: int, m: int, vpp: int, style: str) -> tuple:
    """Per rank, its actions with their dependencies resolved once per schedule shape: (kind,
    v, dependencies as (completion key, crosses ranks), completion keys, span kind, micro-batch,
    backward stage of an FB). A completion key is (what * n + v) * m + mb."""
    n = pp * vpp
    rank_of = StageLayout(pp, vpp, style, tuple((v, v + 1) for v in range(n))).rank_of
    key = lambda what, v, mb: (what * n + v) * m + mb  # noqa: E731

    def needs(kind: str, v: int, mb: int) -> tuple[int, bool] | None:
        if kind == "F":
            return None if v == 0 else (key(_F, v - 1, mb), rank_of(v - 1) != rank_of(v))
        if kind in ("B", "BW"):
            return (key(_F, v, mb), False) if v == n - 1 else (key(_B, v + 1, mb), rank_of(v + 1) != rank_of(v))
        return key(_B, v, mb), False

    out = []
    for order in rank_orders(schedule, pp, m, vpp):
        acts = []
        for a in order:
            if a[0] == "FB":
                deps = tuple(d for d in (needs("F", a[1], a[2]), needs("BW", a[3], a[4])) if d is not None)
                done = (key(_F, a[1], a[2]), key(_B, a[3], a[4]), key(_W, a[3], a[4]))
                acts.append(("FB", a[1], deps, done, _SPAN["FB"], a[2], a[3]))
            else:
                d = needs(a[0], a[1], a[2])
                done = tuple(key(w, a[1], a[2]) for w in _DONE[a[0]])
                acts.append((a[0], a[1], (d,) if d else (), done, _SPAN[a[0]], a[2], -1))
        out.append(tuple(acts))
    return tuple(out)


def run_schedule(stages: StageLayout, schedule: str, m: int, fwd_s: list[float], bwd_s: list[float],
                 wgrad_s: list[float] | None = None, p2p_s: float = 0.0,
                 fb_s: Callable[[int, int], float] | None = None, record: bool = True) -> PipelineRun:
    """Execute the schedule. Times are per micro-batch per virtual stage: fwd_s, bwd_s (the whole
    backward, W included) and wgrad_s (the W part of it; 0 when not given). `record`: keep every
    action's span (for timelines; the search does not need them)."""
    n, pp = stages.n_stages, stages.pp
    w_s = wgrad_s or [0.0] * n
    dur = {"F": fwd_s, "B": [bwd_s[v] - w_s[v] for v in range(n)], "W": w_s, "BW": bwd_s}
    fb_cache: dict[tuple[int, int], float] = {}

    def fb(vf: int, vb: int) -> float:
        if (vf, vb) not in fb_cache:
            fb_cache[(vf, vb)] = fb_s(vf, vb) if fb_s else fwd_s[vf] + bwd_s[vb]
        return fb_cache[(vf, vb)]

    plans = _skeleton(schedule, pp, m, stages.vpp, stages.style)
    # durations per rank, in action order (hot loop below: plain lists, no per-action calls)
    durs = [[fb(a[1], a[6]) if a[0] == "FB" else dur[a[0]][a[1]] for a in order] for order in plans]
    done: dict[int, float] = {}
    waiting: dict[int, list[int]] = {}  # completion key -> ranks blocked on it
    pos, free, busy = [0] * pp, [0.0] * pp, [0.0] * pp
    spans: list[Span] = []
    # each rank runs its actions in order; an action starts at max(rank free, inputs arrived), so
    # the order in which ranks are advanced here does not change any time
    todo = list(range(pp))
    get = done.get
    while todo:
        r = todo.pop()
        order, d_r = plans[r], durs[r]
        i, t_free, n_act = pos[r], free[r], len(order)
        while i < n_act:
            act = order[i]
            start = t_free
            blocked = None
            for k, cross in act[2]:
                t = get(k)
                if t is None:
                    blocked = k
                    break
                if cross:
                    t += p2p_s
                if t > start:
                    start = t
            if blocked is not None:
                waiting.setdefault(blocked, []).append(r)
                break
            t_free = start + d_r[i]
            for k in act[3]:
                done[k] = t_free
                if k in waiting:
                    todo += waiting.pop(k)
            if record:
                spans.append(Span(r, act[4], act[5], act[1], start, t_free))
            i += 1
        busy[r] += sum(d_r[pos[r]:i])
        pos[r], free[r] = i, t_free
    if any(pos[r] < len(plans[r]) for r in range(pp)):  # pragma: no cover - the orders cannot deadlock
        raise RuntimeError(f"pipeline schedule {schedule} deadlocked")
    ready = [max(done[(_W * n + v) * m + mb] for mb in range(m)) for v in range(n)]
    first = [done[(_F * n + v) * m] - fwd_s[v] for v in range(n)]  # every schedule's first F of a chunk is a plain F
    return PipelineRun(free, busy, spans, ready, first)


def run_pipeline(fwd_s: list[float], bwd_s: list[float], m: int, vpp: int = 1, p2p_s: float = 0.0) -> PipelineRun:
    """1F1B / interleaved 1F1B from per-rank times (each rank's vpp chunks equal: fwd_s[r] / vpp each)."""
    pp = len(fwd_s)
    n = pp * vpp
    stages = StageLayout(pp, vpp, "loop", tuple((v, v + 1) for v in range(n)))
    per_f = [fwd_s[v % pp] / vpp for v in range(n)]
    per_b = [bwd_s[v % pp] / vpp for v in range(n)]
    return run_schedule(stages, "interleaved" if vpp > 1 else "1f1b", m, per_f, per_b, p2p_s=p2p_s)
