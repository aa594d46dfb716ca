"""A fluid model of shared resources on a simpy clock: max-min fair rates by progressive filling.

A job has work (bytes, or seconds of standalone time) and the resources it crosses (links,
or a GPU's compute); a resource has a capacity (work units per second) shared max-min
fairly among the jobs crossing it. On every arrival and departure the rates are recomputed
and the next completion is rescheduled (a simpy timeout; stale timers are ignored by
generation). A job's completion is a simpy event.

Compute slowdown: resources named in `slowed` run at capacity / (1 + slowdown) while any
job of kind "comm" is active, or a collective holds a `comm_presence` (SM/HBM interference of
communication kernels, which occupy the GPU from their launch, waits for peers included).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import numpy as np
import simpy

INF = float("inf")


@dataclass(eq=False)
class Job:
    work: float
    resources: tuple[Hashable, ...]
    kind: str
    done: simpy.Event
    remaining: float = 0.0
    rate: float = 0.0
    start_s: float = 0.0
    tag: object = None


@dataclass(eq=False)
class FluidNet:
    env: simpy.Environment
    capacity: dict[Hashable, float]
    slowdown: float = 0.0
    slowed: frozenset = frozenset()
    active: list[Job] = field(default_factory=list)
    _t: float = 0.0
    _gen: int = 0
    _comm_active: int = 0
    _due: list[Job] = field(default_factory=list)

    # -------------------------------------------------------------- public
    def submit(self, work: float, resources: Iterable[Hashable], kind: str = "comm", tag: object = None) -> Job:
        """Start a job now; `job.done` fires at its completion."""
        return self.submit_many([(work, tuple(resources))], kind, tag)[0]

    def submit_many(self, jobs: list[tuple[float, tuple[Hashable, ...]]], kind: str = "comm",
                    tag: object = None) -> list[Job]:
        """Start several jobs at once (one rate recomputation for all of them)."""
        out = []
        self._advance()
        for work, resources in jobs:
            job = Job(work, resources, kind, self.env.event(), remaining=work, start_s=self.env.now, tag=tag)
            out.append(job)
            if work <= 0:
                job.done.succeed(job)
                continue
            self.active.append(job)
            self._comm_active += kind == "comm"
        self._reschedule()
        return out

    def comm_presence(self, delta: int) -> None:
        """A collective that is waiting (for peers, or its latency) without moving bytes still
        occupies the rank (NCCL kernels spin on SMs; gloo threads on cores): +1 at its start,
        -1 at its end, so compute is slowed for its whole duration."""
        self._advance()
        self._comm_active += delta
        self._reschedule()

    def run_job(self, work: float, resources: Iterable[Hashable], latency_s: float = 0.0, kind: str = "comm",
                tag: object = None):
        """A tiny process: wait the latency, then transfer the work."""
        if latency_s > 0:
            yield self.env.timeout(latency_s)
        job = self.submit(work, resources, kind, tag)
        yield job.done
        return job

    # ------------------------------------------------------------ internals
    def _advance(self) -> None:
        dt = self.env.now - self._t
        if dt > 0:
            for j in self.active:
                j.remaining -= j.rate * dt
        self._t = self.env.now

    def _cap(self, r: Hashable) -> float:
        c = self.capacity[r]
        if self._comm_active and r in self.slowed:
            return c / (1.0 + self.slowdown)
        return c

    def _rates(self) -> None:
        """Progressive filling: raise all unfrozen rates together; freeze jobs on saturated resources."""
        left: dict[Hashable, float] = {}
        users: dict[Hashable, list[Job]] = {}
        for j in self.active:
            j.rate = -1.0
            if not j.resources:
                j.rate = INF
            for r in j.resources:
                if r not in left:
                    left[r] = self._cap(r)
                    users[r] = []
                users[r].append(j)
        count = {r: len(u) for r, u in users.items()}
        level = 0.0
        while count:
            delta = min(left[r] / c for r, c in count.items())
            level += delta
            tie = delta * (1 + 1e-9)
            frozen = []
            for r, c in count.items():
                if left[r] / c <= tie:
                    frozen.append(r)
                left[r] -= delta * c
            for r in frozen:
                for j in users[r]:
                    if j.rate < 0:
                        j.rate = level
                        for r2 in j.resources:
                            if r2 in count:
                                count[r2] -= 1
            count = {r: c for r, c in count.items() if c > 0}

    def _reschedule(self) -> None:
        self._rates()
        self._gen += 1
        if not self.active:
            return
        dt = min(j.remaining / j.rate if j.rate > 0 else INF for j in self.active)
        if dt == INF:
            raise RuntimeError("fluid model: a job has no capacity to progress")
        # the jobs that finish at this timer are decided now: after `now + dt` is rounded to
        # the clock's float resolution their `remaining` may keep a residue that no further
        # advance can remove (dt below now's ulp), which would loop forever on zero-length timers
        self._due = [j for j in self.active if j.rate > 0 and j.remaining / j.rate <= dt * (1 + 1e-9)]
        ev = self.env.timeout(max(dt, 0.0))
        gen = self._gen
        ev.callbacks.append(lambda _e: self._on_timer(gen))

    def _on_timer(self, gen: int) -> None:
        if gen != self._gen:
            return  # superseded by a later arrival/departure
        self._advance()
        due = set(map(id, self._due))
        still = []
        for j in self.active:
            if id(j) in due or j.remaining <= j.work * 1e-9 or j.rate == INF:
                self._comm_active -= j.kind == "comm"
                j.remaining = 0.0
                j.done.succeed(j)
            else:
                still.append(j)
        self.active = still
        self._reschedule()


def batch_finish_s(capacity: np.ndarray, resources: np.ndarray, work: np.ndarray) -> float:
    """When the last of a batch of jobs that all start at time 0 (no later arrivals) completes:
    FluidNet's progressive filling and completion rule run on arrays, one row of `resources`
    (indices into `capacity`, -1 padded; distinct within a row) per job. Every float operation
    is FluidNet's, on the same values, so the result equals `submit_many` + `env.run()` bit for
    bit (tests/perfmodel/sim/test_topology_symmetry.py); a collective phase of 10^3..10^4 flows
    costs a few array passes per completion instead of a Python loop per job and resource."""
    n_res = len(capacity)
    has = resources >= 0
    safe = np.where(has, resources, 0)
    remaining = work.astype(float).copy()
    live = remaining > 0  # FluidNet completes a job without work on submission
    now = t = 0.0
    while live.any():
        # progressive filling over the live jobs
        rate = np.full(len(work), -1.0)
        cnt = np.bincount(safe[live][has[live]], minlength=n_res)
        left = capacity.astype(float).copy()
        unfrozen = live.copy()
        level = 0.0
        while True:
            act = cnt > 0
            if not act.any():
                break
            ratio = np.full(n_res, INF)
            ratio[act] = left[act] / cnt[act]
            delta = float(ratio.min())
            level += delta
            frozen = act & (ratio <= delta * (1 + 1e-9))
            left[act] -= delta * cnt[act]
            newly = unfrozen & (frozen[safe] & has).any(axis=1)
            rate[newly] = level
            unfrozen &= ~newly
            cnt -= np.bincount(safe[newly][has[newly]], minlength=n_res)
        r = rate[live]
        if (r <= 0).any():
            raise RuntimeError("fluid model: a job has no capacity to progress")
        left_s = remaining[live] / r
        dt = float(left_s.min())
        due = left_s <= dt * (1 + 1e-9)
        now = now + max(dt, 0.0)
        remaining[live] -= r * (now - t)
        t = now
        done = due | (remaining[live] <= work[live] * 1e-9)
        idx = np.flatnonzero(live)[done]
        remaining[idx] = 0.0
        live[idx] = False
    return now
