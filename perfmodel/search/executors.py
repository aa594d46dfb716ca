"""Where search's plans are evaluated: in this process, in a local process pool (`--jobs N`),
or as Ray tasks (`--executor ray [--address ADDR]`).

Every executor runs the same function, `evaluate_batch`, on batches of (row index, variant,
plan) tasks and hands back (row index, status, payload) outcomes; search keys them by row
index, so neither completion order nor a retried batch can reorder, drop or duplicate a plan.

An executor is asynchronous: `submit(tag, tasks)` splits the tasks into batches and queues
them; `wait()` blocks until at least one batch is done and returns every finished batch as
(tag, outcomes). Search keeps one round of each variant in flight, so variants (what-ifs,
clusters, models) are evaluated side by side while each variant's rounds stay in order.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import re
import socket
import sys
from collections.abc import Callable, Hashable
from typing import Any

from perfmodel.specs import PlanSpec, SpecError

Task = tuple[int, str, PlanSpec]  # (row index, variant name, plan)
Outcome = tuple[int, str, Any]  # (row index, "ok" | "error", summary dict | one-line message)
SimulateFn = Callable[..., Any]
EXECUTORS = ("local", "ray")
RAY_MAX_RETRIES = 3  # a batch whose worker died is run again, up to this many times
# plans per batch at least: a Ray task's scheduling and argument fetch cost ~ms, and consecutive
# plans (in lower-bound order) share the simulator's cached layer runs within one process
MIN_BATCH = 8


class ExecutorError(RuntimeError):
    """The execution environment failed (cluster unreachable, a batch lost after its retries): exit 1."""


def summarize(res: Any) -> dict[str, Any]:
    """The picklable, JSON-ready part of a SimResult that search and report use."""
    return {"step_time_s": float(res.step_time_s), "tokens_per_s": float(res.tokens_per_s),
            "mfu": float(res.mfu), "breakdown": {k: float(v) for k, v in sorted(res.breakdown.items())},
            "memory_GiB": {k: float(v) for k, v in sorted(res.memory_GiB.items())}, "fits": bool(res.fits)}


def evaluate_batch(parts: dict[str, Any], fn: SimulateFn, tasks: list[Task]) -> list[Outcome]:
    """Simulate each plan of the batch on its variant's model/cluster/profile (the one definition
    of a plan's evaluation, whatever runs it). The simulator's topology, op graph and layer
    caches live in the process, so a batch pays their setup once."""
    out: list[Outcome] = []
    for idx, variant, plan in tasks:
        v = parts[variant]
        try:
            out.append((idx, "ok", summarize(fn(v.model, v.cluster, plan, v.profile))))
        except SpecError as exc:
            out.append((idx, "error", " ".join(str(exc).split())))
        except Exception as exc:  # noqa: BLE001 - one plan's simulator failure must not end the search
            out.append((idx, "error", " ".join(f"simulator failed: {type(exc).__name__}: {exc}".split())))
    return out


def split(tasks: list[Task], pieces: int, min_batch: int) -> list[list[Task]]:
    """Consecutive, near-equal batches: at most `pieces`, none under `min_batch` plans (but one)."""
    n = max(1, min(pieces, len(tasks) // max(1, min_batch)))
    size, extra = divmod(len(tasks), n)
    out, i = [], 0
    for k in range(n):
        j = i + size + (k < extra)
        out.append(tasks[i:j])
        i = j
    return [b for b in out if b]


class Executor:
    """In this process: each batch is evaluated when submitted (--jobs 1)."""

    parallelism = 1

    def __init__(self, parts: dict[str, Any], fn: SimulateFn):
        self.parts, self.fn = parts, fn
        self.done: list[tuple[Hashable, list[Outcome]]] = []

    def submit(self, tag: Hashable, tasks: list[Task]) -> None:
        self.done.append((tag, evaluate_batch(self.parts, self.fn, tasks)))

    def wait(self) -> list[tuple[Hashable, list[Outcome]]]:
        out, self.done = self.done, []
        return out

    def close(self, ok: bool = True) -> None:
        pass


_WORKER: dict[str, Any] = {}


def _init_worker(parts: dict[str, Any], fn: SimulateFn) -> None:
    _WORKER["parts"], _WORKER["fn"] = parts, fn


def _pool_batch(tasks: list[Task]) -> list[Outcome]:
    return evaluate_batch(_WORKER["parts"], _WORKER["fn"], tasks)


class PoolExecutor(Executor):
    """A local fork pool of `jobs` processes; the variants travel once, to the pool's initializer."""

    def __init__(self, parts: dict[str, Any], fn: SimulateFn, jobs: int):
        super().__init__(parts, fn)
        self.parallelism = jobs
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        self.pool = ctx.Pool(jobs, initializer=_init_worker, initargs=(parts, fn))
        self.finished: queue.Queue = queue.Queue()
        self.in_flight = 0

    def submit(self, tag: Hashable, tasks: list[Task]) -> None:
        for b in split(tasks, self.parallelism, MIN_BATCH):
            self.in_flight += 1
            self.pool.apply_async(_pool_batch, (b,), callback=lambda r, t=tag: self.finished.put((t, r)),
                                  error_callback=lambda e, t=tag: self.finished.put((t, e)))

    def wait(self) -> list[tuple[Hashable, list[Outcome]]]:
        out = []
        while self.in_flight and (not out or not self.finished.empty()):
            tag, res = self.finished.get()
            self.in_flight -= 1
            if isinstance(res, BaseException):
                raise ExecutorError(f"a search worker process failed: {type(res).__name__}: {res}") from res
            out.append((tag, res))
        return out

    def close(self, ok: bool = True) -> None:
        if ok:
            self.pool.close()
        else:  # interrupted or failed: do not wait for the workers' queued batches
            self.pool.terminate()
        self.pool.join()


# ------------------------------------------------------------------------------- Ray
_RAY_CACHE: dict[str, tuple[dict[str, Any], SimulateFn]] = {}  # per Ray worker: search id -> (parts, fn)


def _ray_batch(shared: list[Any], tasks: list[Task]) -> list[Outcome]:
    """One Ray task. `shared` wraps the ObjectRef of (parts, fn) in a list so Ray does not resolve
    it per task: a worker fetches it once per search and keeps the same objects, so the
    simulator's caches (keyed partly by object identity) carry over from batch to batch."""
    import ray

    ref = shared[0]
    key = ref.hex()
    if key not in _RAY_CACHE:
        _RAY_CACHE.clear()  # one search at a time per worker: drop the last one's variants
        _RAY_CACHE[key] = ray.get(ref)
    parts, fn = _RAY_CACHE[key]
    return evaluate_batch(parts, fn, tasks)


_ADDRESS = re.compile(r"^(auto|local|ray://[\w.\-]+(:\d+)?|[\w.\-]+:\d+)$")


def require_ray(address: str | None = None):
    """The ray module (SpecError naming the extra when it is not installed), after checking the
    form of `address`: both are the user's to fix, so the CLI asks before any work."""
    if address is not None and not _ADDRESS.match(address):
        raise SpecError(f"--address {address!r}: expected HOST:PORT of a Ray head node, ray://HOST:PORT "
                        "or auto")
    try:
        import ray
    except ImportError:
        raise SpecError("--executor ray needs Ray, which is not installed: pip install 'moeperf[distributed]'") \
            from None
    return ray


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast on a HOST:PORT nobody listens at: Ray itself retries such an address for ever."""
    m = re.match(r"^(?:ray://)?([\w.\-]+):(\d+)$", address or "")
    if m:
        with socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout_s):
            pass


def _route_ray_errors() -> None:
    """Ray's driver prints the cluster's system errors (a worker died, ...) on stdout, where they
    would break --json, whatever log_to_driver says: say each as one line on stderr instead. A
    lost batch is retried, so this is a warning. (Ray has no switch for it: the hook is its
    module-level printer, looked up per message; left alone if Ray renames it.)"""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    orig = getattr(ray_worker, "print_to_stdstream", None)
    if orig is None or getattr(orig, "moeperf", False):
        return

    def route(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            return orig(data, ignore_prefix)
        for line in data.get("lines", []):
            first = " ".join(str(line).split()).split(". ")[0]
            print(f"moeperf search: warning: Ray: {first[:200]}", file=sys.stderr, flush=True)

    route.moeperf = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = route


class RayExecutor(Executor):
    """Batches of plans as Ray tasks on a cluster: `address` connects to a running one (`ray
    start --head` or ADDR=auto); without it a local Ray instance with `num_cpus` CPUs is started
    (and stopped at close). A Ray instance already running in this process is used as is."""

    def __init__(self, parts: dict[str, Any], fn: SimulateFn, address: str | None = None,
                 num_cpus: int | None = None):
        super().__init__(parts, fn)
        ray = self.ray = require_ray(address)
        self.owns = not ray.is_initialized()
        if self.owns:
            # Ray's own logging and the workers' output stay off this terminal (its files are in the
            # session's log folder): the search's table/JSON is the only output
            quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
            try:
                _check_reachable(address)
                if address is None:
                    ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
                else:
                    ray.init(address=address, **quiet)
            except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: all environment
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise ExecutorError(f"cannot start or reach {where}: {type(exc).__name__}: "
                                    f"{' '.join(str(exc).split())[:300]}") from None
        _route_ray_errors()
        self.parallelism = max(1, int(ray.available_resources().get("CPU", 0)
                                      or ray.cluster_resources().get("CPU", 1)))
        self.shared = [ray.put((parts, fn))]
        self.remote = ray.remote(num_cpus=1, max_retries=RAY_MAX_RETRIES, retry_exceptions=False)(_ray_batch)
        self.pending: dict[Any, Hashable] = {}  # ObjectRef -> tag

    def submit(self, tag: Hashable, tasks: list[Task]) -> None:
        for b in split(tasks, self.parallelism, MIN_BATCH):
            self.pending[self.remote.remote(self.shared, b)] = tag

    def wait(self) -> list[tuple[Hashable, list[Outcome]]]:
        if not self.pending:
            return []
        refs = list(self.pending)
        ready, _ = self.ray.wait(refs, num_returns=1)
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0) if len(refs) > 1 else (ready, None)
        out = []
        for ref in ready:
            tag = self.pending.pop(ref)
            try:
                out.append((tag, self.ray.get(ref)))
            except self.ray.exceptions.RayError as exc:
                raise ExecutorError(f"a Ray search task failed after {RAY_MAX_RETRIES} retries: "
                                    f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
        return out

    def close(self, ok: bool = True) -> None:
        if not ok:
            for ref in self.pending:
                self.ray.cancel(ref, force=True)
        self.pending.clear()
        if self.owns:
            self.ray.shutdown()


def make_executor(kind: str, parts: dict[str, Any], fn: SimulateFn, *, jobs: int | None = None,
                  address: str | None = None) -> Executor:
    """The executor for --executor KIND: "local" (jobs processes; 1 = this process) or "ray"."""
    if kind == "ray":
        return RayExecutor(parts, fn, address=address, num_cpus=jobs)
    if kind != "local":
        raise SpecError(f"--executor {kind!r}: choose one of {', '.join(EXECUTORS)}")
    if address is not None:
        raise SpecError("--address is for --executor ray")
    return PoolExecutor(parts, fn, jobs) if jobs and jobs > 1 else Executor(parts, fn)
