"""`moeperf run`: check a plan against the world size, launch torchrun, summarise the run.

    moeperf run --model tiny-moe --plan plan.yaml --nproc 4 --steps 200 --out runs/x [--data DIR|FILES...]

The plan is validated with perfmodel.specs.layout.plan_layout *before* anything starts (bad input:
SpecError -> one line, exit 2). Ranks run `python -m runtime.train` under
`python -m torch.distributed.run` (gloo on CPU, NCCL on GPU); rank 0 prints a progress line per
step. If a rank raises, torchrun stops the others (their collectives also fail fast: gloo sees
the closed connection, and every process group has a timeout), and we exit 1 naming the rank; an
environment failure (disk full, ...) is one line naming rank, path and cause; a lost node is named
with its ranks. SIGTERM/SIGINT are forwarded to the ranks, which finish the step (and on SIGTERM save)
and stop: exit 0 (130 for SIGINT) with a line saying where (runtime/preempt.py). One run per --out
(perfmodel/outlock.py) unless the job spans nodes, whose launchers share --out.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from perfmodel import atomic, outlock
from perfmodel.argparse_util import parser
from perfmodel.specs import SpecError, load_spec
from perfmodel.specs.layout import plan_layout
from runtime import checkpoint, preempt
from runtime.agent import HIDDEN
from runtime.data import check_for_launch
from runtime.model import check_supported, scale
from runtime.profiling import parse_steps

ROOT = Path(__file__).resolve().parents[1]


def _args(argv: list[str]):
    ap = parser("run", "run a plan as real distributed training (torchrun)")
    ap.add_argument("--model", required=True, help="model preset name or YAML path")
    ap.add_argument("--plan", required=True, help="plan YAML path")
    ap.add_argument("--nproc", type=int, default=None, help="ranks per node (default: the plan's tp*sp*pp*dp)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None, help="run folder (default runs/<model>-<plan>)")
    ap.add_argument("--data", nargs="+", default=[],
                    help="a token folder (moeperf data prepare), or text files/folders read as bytes; default synthetic")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink widths, keeping experts, top-k and GQA ratio")
    ap.add_argument("--layers", type=int, default=None, help="override the model's layer count")
    ap.add_argument("--seq-len", type=int, default=None, help="override the model's sequence length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    ap.add_argument("--nnodes", default="1", help="passed to torchrun (N or MIN:MAX)")
    ap.add_argument("--rdzv-endpoint", default=None, help="passed to torchrun (host:port); default standalone")
    ap.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts; a restart resumes")
    ap.add_argument("--rdzv-conf", default=None, help="passed to torchrun (e.g. last_call_timeout=5)")
    ap.add_argument("--pg-timeout-s", type=float, default=120.0, help="collective timeout per process group")
    ap.add_argument("--profile-steps", default=None, help="A:B: torch.profiler traces of steps A..B in <out>/traces/")
    ap.add_argument("--inject-failure", default=None, help=argparse_suppress())
    return ap.parse_args(argv)


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS  # RANK:STEP, raise there: for testing failure handling


def _positive(name: str, value: int | float | None, most: float = 1e9) -> None:
    if value is not None and not (math.isfinite(value) and 0 < value <= most):
        raise SpecError(f"{name}: {value} must be a positive number (at most {most:g})")


def _check_args(a) -> None:
    """Every flag's range, before anything is loaded or written."""
    for name, most in (("nproc", 1024), ("steps", 1e9), ("layers", 1e5), ("seq_len", 1e7), ("lr", 1e3),
                       ("pg_timeout_s", 1e6), ("scale", 1e3)):
        _positive(f"--{name.replace('_', '-')}", getattr(a, name), most)
    for name, most in (("warmup", 1e9), ("ckpt_every", 1e9), ("max_restarts", 1000)):
        if not 0 <= getattr(a, name) <= most:
            raise SpecError(f"--{name.replace('_', '-')}: {getattr(a, name)} must be between 0 and {most:g}")
    if not 0 <= a.seed < 2**63:
        raise SpecError(f"--seed: {a.seed} must be between 0 and 2**63-1")
    parse_steps(a.profile_steps)
    if a.inject_failure is not None and not re.fullmatch(r"\d+:\d+", a.inject_failure):
        raise SpecError(f"--inject-failure: expected RANK:STEP, got {a.inject_failure!r}")
    if a.out is not None and a.out.exists() and not a.out.is_dir():
        raise SpecError(f"--out: {a.out} exists and is not a folder")


def prepare(a) -> tuple[list[str], Path, int, outlock.OutLock | None]:
    """Validate everything and build the torchrun command; nothing is launched."""
    _check_args(a)
    model = load_spec(a.model, "model")
    if a.scale != 1.0 or a.layers or a.seq_len:
        model = scale(model, a.scale, a.layers, a.seq_len)
    plan = load_spec(a.plan, "plan")
    nproc = a.nproc or plan.tp * plan.sp * plan.pp * (plan.dp or 1)
    try:
        nodes = [int(x) for x in str(a.nnodes).split(":")]
        min_nodes, nnodes = nodes[0], nodes[-1]
        if len(nodes) > 2 or not 1 <= min_nodes <= nnodes <= 1024:
            raise ValueError
    except ValueError:
        raise SpecError(f"--nnodes: {a.nnodes!r} is not N or MIN:MAX (1 <= MIN <= MAX)") from None
    if nnodes > 1 and not a.rdzv_endpoint:
        raise SpecError("--nnodes: more than one node needs --rdzv-endpoint HOST:PORT")
    layout = plan_layout(plan, model, nproc * nnodes)  # SpecError naming the failing constraint
    check_supported(plan, layout.microbatches)
    out = a.out or Path("runs") / f"{model.name}-{plan.name}"
    if a.resume and not (out / "ckpt").is_dir():
        raise SpecError(f"--resume: {out}/ckpt has no checkpoint to resume from")
    # the checkpoint to resume from, its SHA-256 checked once (SpecError if all are corrupt)
    found = checkpoint.latest_good(out / "ckpt", log=False) if a.resume else None
    if a.resume and found is None:
        raise SpecError(f"--resume: {out}/ckpt has no complete checkpoint to resume from")
    check_for_launch(a.data, model, plan.global_batch, a.seed, found and checkpoint.saved_meta(found), str(found))
    # one writer per --out; a multi-node job's launchers share it (the rendezvous joins them)
    lock = None if a.rdzv_endpoint else outlock.acquire(out, "run")
    try:
        atomic.write_text(out / "model.yaml", model.model_dump_json(indent=1) + "\n")  # JSON is YAML
        atomic.write_text(out / "plan.yaml", plan.model_dump_json(indent=1) + "\n")
    except BaseException:
        if lock:
            lock.release()
        raise
    for stale in ("failures", "nodes"):
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / preempt.STOPPED).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "runtime.agent", f"--nproc-per-node={nproc}", f"--max-restarts={a.max_restarts}"]
    if a.rdzv_endpoint:
        cmd += [f"--nnodes={a.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={a.rdzv_endpoint}"]
        cmd += [f"--rdzv-conf={a.rdzv_conf}"] if a.rdzv_conf else []
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "runtime.train", "--model", str(out / "model.yaml"), "--plan", str(out / "plan.yaml"),
            "--steps", str(a.steps), "--out", str(out), "--seed", str(a.seed), "--lr", str(a.lr),
            "--warmup", str(a.warmup), "--ckpt-every", str(a.ckpt_every), "--pg-timeout-s", str(a.pg_timeout_s)]
    if a.data:
        cmd += ["--data", *[str(Path(p).resolve()) for p in a.data]]
    if a.resume:
        cmd += ["--resume"]
    if a.inject_failure:
        cmd += ["--inject-failure", a.inject_failure]
    if a.profile_steps:
        cmd += ["--profile-steps", a.profile_steps]
    if min_nodes < nnodes:  # elastic: a restart without a lost node waits for it (runtime/preempt.py)
        cmd += ["--world-needed", str(nproc * nnodes)]
    return cmd, out, nproc * nnodes, lock


def summarise(out: Path) -> dict:
    path = out / "metrics.jsonl"
    recs = []
    for ln in path.read_text().splitlines() if path.exists() else []:
        try:
            recs.append(json.loads(ln))
        except ValueError:  # a torn line from a killed attempt
            continue
    if not recs:
        return {}
    timed = recs[1:] or recs  # the first step includes start-up (allocations, connections)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in timed)
    return {"steps": recs[-1]["step"], "first_loss": recs[0]["loss"], "final_loss": recs[-1]["loss"],
            "tokens_per_s": tokens / sum(r["step_time_s"] for r in timed),
            "step_time_s": sum(r["step_time_s"] for r in timed) / len(timed)}


SIGNALS = {-6: "SIGABRT", -7: "SIGBUS", -9: "SIGKILL", -11: "SIGSEGV", -15: "SIGTERM"}


def torchrun_exits(log: str) -> dict[int, int]:
    """rank -> exit code from torchrun's failure summary (`rank : 2 (local_rank: 2)` / `exitcode : -9 ...`)."""
    out: dict[int, int] = {}
    rank = None
    for line in log.splitlines():
        key, _, val = line.strip().partition(":")
        key = key.strip()
        if key == "rank" and val.strip().split(" ")[0].isdigit():
            rank = int(val.strip().split(" ")[0])
        elif key == "exitcode" and rank is not None:
            try:
                out.setdefault(rank, int(val.strip().split(" ")[0]))
            except ValueError:
                pass
            rank = None
    return out


def _log_reports(log: str) -> list[str]:
    """`rank K...` lines the ranks printed, in the order they came (the same text as their reports)."""
    return [ln.strip()[len("moeperf run: "):] for ln in log.splitlines() if ln.startswith("moeperf run: rank ")]


def _who(msg: str) -> str:
    """`rank 2` of `rank 2 failed: ...` or `rank 2: checkpoint ...`."""
    return " ".join(msg.split(" ")[:2]).rstrip(":")


def lost_nodes(out: Path, heard: set[int]) -> list[str]:
    """Nodes of the last attempt (nodes/node<g>.json) from none of whose ranks anything was heard: no
    report, no exit code. Such a node's agent died with its ranks, or the node became unreachable."""
    files = sorted((out / "nodes").glob("node*.json")) if (out / "nodes").is_dir() else []
    nodes = []
    for f in files:
        try:
            nodes.append((f.stat().st_mtime, json.loads(f.read_text())))
        except (OSError, ValueError):
            continue
    if not nodes:
        return []
    world = max(nodes, key=lambda t: t[0])[1].get("world")
    lost = []
    for _, n in sorted(nodes, key=lambda t: t[1].get("node", 0)):
        ranks = [int(r) for r in n.get("ranks", [])]
        if n.get("world") == world and ranks and not heard & set(ranks):
            lost.append(f"node {n.get('node')} ({n.get('host')}, ranks {', '.join(map(str, ranks))})")
    return lost


def failure_reason(out: Path, rc: int, log: str = "") -> str:
    """The rank that failed first, and which others went down after it.

    A rank killed by a signal (kill -9, OOM killer, segfault) writes no report, while the ranks it
    leaves behind report connection errors: so a rank that torchrun saw die of a signal other than
    its own SIGTERM, without a report, is named first; so is a whole node that went silent. A rank
    whose report could not be written (a full disk) is named from its line in the log. Otherwise the
    earliest report wins."""
    reports = []
    for f in (out / "failures").glob("rank*.txt") if (out / "failures").is_dir() else []:
        try:
            stamp, _, msg = f.read_text().strip().partition(" ")
            reports.append((float(stamp), " ".join(msg.split())[:400]))  # one line, whatever the rank wrote
        except (OSError, ValueError):
            continue
    reports.sort()
    reported = {_who(m) for _, m in reports}
    unfiled = [m for m in _log_reports(log) if _who(m) not in reported]
    if unfiled:  # its report write failed: the environment is the likely cause, so it goes first
        reports = [(0.0, unfiled[0])] + reports
        reported.add(_who(unfiled[0]))
    exits = torchrun_exits(log)
    killed = sorted(r for r, code in exits.items() if code < 0 and code != -15 and f"rank {r}" not in reported)
    heard = {int(w.split(" ")[1]) for w in reported if w.split(" ")[-1].isdigit()} | set(exits)
    lost = lost_nodes(out, heard)
    if lost:
        then = sorted({_who(m) for _, m in reports}, key=lambda w: int(w.split(" ")[-1]) if w[-1:].isdigit() else 0)
        return (f"{'; '.join(lost)} lost: no report or exit status from {'its' if len(lost) == 1 else 'their'} ranks "
                "(the node's agent died or it became unreachable)" + (f"; then {', '.join(then)} failed" if then else ""))
    if killed:
        code = exits[killed[0]]
        others = [f"rank {r}" for r in killed[1:]] + [_who(m) for _, m in reports]
        return (f"rank {killed[0]} died: killed by {SIGNALS.get(code, f'signal {-code}')} (exit code {code}) "
                f"without an error report" + (f" (then: {', '.join(others)})" if others else ""))
    if not reports:
        return f"torchrun exited with status {rc} (see the log above for the failed rank)"
    others = [_who(m) for _, m in reports[1:] if m != reports[0][1]]
    return reports[0][1] + (f" (then: {', '.join(others)})" if others else "")


def _launch(cmd: list[str], env: dict[str, str], hidden: list[str] | None = None) -> tuple[int, str, int | None]:
    """Run torchrun, passing its stderr through live and keeping the tail for failure_reason.

    Returns (exit status, log tail, the signal that stopped the job or None). SIGTERM/SIGINT sent to us
    go on to the ranks (not to torchrun, which would tear them down): they finish the step and stop.
    The agent's own lines (HIDDEN) and the ranks' environment-failure lines (repeated as our last line)
    are kept, not shown."""
    from collections import deque

    tail: deque[str] = deque(maxlen=4000)
    got: list[int] = []
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        assert proc.stderr is not None

        def forward(signum: int, _frame) -> None:
            got.append(signum)
            for kid in preempt.children(proc.pid):
                try:
                    os.kill(kid, signum)
                except OSError:
                    pass

        old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for line in proc.stderr:
                if line.startswith(HIDDEN):
                    line = line[len(HIDDEN):]
                    if hidden is not None:
                        hidden.append(line)
                elif not re.match(r"moeperf run: rank \d+: ", line):
                    sys.stderr.write(line)
                tail.append(line)
            rc = proc.wait()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    sys.stderr.flush()
    return rc, "".join(tail), (got[0] if got else None)


def _stopped(out: Path, sig: int | None, rc: int) -> tuple[str, int] | None:
    """The last line and exit status of a job stopped by SIGTERM/SIGINT (None: it was not stopped)."""
    try:
        info = json.loads((out / preempt.STOPPED).read_text())
    except (OSError, ValueError):
        info = None
    name = info["signal"] if info else (signal.Signals(sig).name if sig and rc != 0 else None)
    if name is None:  # not signalled, or the signal came after the last step: the run simply finished
        return None
    status = 130 if name == "SIGINT" else 0
    if not info:
        return f"moeperf run: stopped by {name} before a step finished; nothing saved", status
    ckpt = info.get("checkpoint")
    where = f"stopped by {name} after step {info['step']} of {info['steps']}"
    if name == "SIGTERM" and ckpt and ckpt.endswith(f"step_{info['step']:06d}"):
        return f"moeperf run: {where}; saved {ckpt}; continue with --resume", status
    last = f"the last checkpoint is {ckpt}; --resume continues from it" if ckpt else "no checkpoint to resume from"
    return f"moeperf run: {where}; not saved ({last})", status


def main(argv: list[str] | None = None) -> int:
    a = _args(list(sys.argv[1:] if argv is None else argv))
    cmd, out, world, lock = prepare(a)
    try:
        return _run(a, cmd, out, world)
    finally:
        if lock:
            lock.release()


def _run(a, cmd: list[str], out: Path, world: int) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: ranks share the cores
    if a.rdzv_endpoint:  # a worker store per round (hosted by rank 0), not one shared with a dead round
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    print(f"moeperf run: {world} ranks, out {out}", flush=True)
    hidden: list[str] = []
    rc, log, sig = _launch(cmd, env, hidden)
    if hidden:
        try:
            atomic.write_text(out / "agent.log", "".join(hidden))
        except OSError:
            pass
    stop = _stopped(out, sig, rc)
    if stop is not None:
        print(stop[0], file=sys.stderr, flush=True)
        return stop[1]
    if rc != 0:
        print(f"moeperf run: error: {failure_reason(out, rc, log)}", file=sys.stderr, flush=True)
        return 1
    s = summarise(out)
    if s:
        print(f"moeperf run: done {s['steps']} steps, {s['tokens_per_s']:.0f} tokens/s, "
              f"{s['step_time_s']:.3f} s/step, loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}", flush=True)
        try:
            atomic.write_json(out / "summary.json", s)
        except OSError as exc:
            print(f"moeperf run: warning: summary not written: {exc.strerror} ({exc.filename})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
