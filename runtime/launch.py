"""`moeperf run`: check a plan against the world size, launch torchrun, summarise the run.

    moeperf run --model tiny-moe --plan plan.yaml --nproc 4 --steps 200 --out runs/x [--data DIR|FILES...]

The plan is validated with perfmodel.layout.plan_layout *before* anything starts (bad input:
SpecError -> one line, exit 2). Ranks run `python -m runtime.train` under
`python -m torch.distributed.run` (gloo on CPU, NCCL on GPU); rank 0 prints a progress line per
step. If a rank raises, torchrun stops the others (their collectives also fail fast: gloo sees
the closed connection, and every process group has a timeout), and we exit 1 naming the rank.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from perfmodel import atomic
from perfmodel.argparse_util import parser
from perfmodel.layout import plan_layout
from perfmodel.specs import SpecError, load_spec
from runtime import checkpoint
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


def prepare(a) -> tuple[list[str], Path, int]:
    """Validate everything and build the torchrun command; nothing is launched."""
    _check_args(a)
    model = load_spec(a.model, "model")
    if a.scale != 1.0 or a.layers or a.seq_len:
        model = scale(model, a.scale, a.layers, a.seq_len)
    plan = load_spec(a.plan, "plan")
    nproc = a.nproc or plan.tp * plan.sp * plan.pp * (plan.dp or 1)
    try:
        nnodes = int(str(a.nnodes).split(":")[-1])
    except ValueError:
        raise SpecError(f"--nnodes: {a.nnodes!r} is not N or MIN:MAX") from None
    layout = plan_layout(plan, model, nproc * nnodes)  # SpecError naming the failing constraint
    check_supported(plan, layout.microbatches)
    out = a.out or Path("runs") / f"{model.name}-{plan.name}"
    if a.resume and not (out / "ckpt").is_dir():
        raise SpecError(f"--resume: {out}/ckpt has no checkpoint to resume from")
    if a.resume and checkpoint.latest_good(out / "ckpt", log=False) is None:  # SpecError if all are corrupt
        raise SpecError(f"--resume: {out}/ckpt has no complete checkpoint to resume from")
    found = checkpoint.latest_good(out / "ckpt", log=False) if a.resume else None
    check_for_launch(a.data, model, plan.global_batch, a.seed, found and checkpoint.saved_meta(found), str(found))
    atomic.write_text(out / "model.yaml", model.model_dump_json(indent=1) + "\n")  # JSON is YAML
    atomic.write_text(out / "plan.yaml", plan.model_dump_json(indent=1) + "\n")
    shutil.rmtree(out / "failures", ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--max-restarts={a.max_restarts}"]
    if a.rdzv_endpoint:
        cmd += [f"--nnodes={a.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={a.rdzv_endpoint}"]
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
    return cmd, out, nproc * nnodes


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


def failure_reason(out: Path, rc: int, log: str = "") -> str:
    """The rank that failed first, and which others went down after it.

    A rank killed by a signal (kill -9, OOM killer, segfault) writes no report, while the ranks it
    leaves behind report connection errors: so a rank that torchrun saw die of a signal other than
    its own SIGTERM, without a report, is named first. Otherwise the earliest report wins."""
    reports = []
    for f in (out / "failures").glob("rank*.txt") if (out / "failures").is_dir() else []:
        stamp, _, msg = f.read_text().strip().partition(" ")
        try:
            reports.append((float(stamp), msg))
        except ValueError:
            continue
    reports.sort()
    reported = {m.split(" failed")[0] for _, m in reports}
    killed = sorted(r for r, code in torchrun_exits(log).items()
                    if code < 0 and code != -15 and f"rank {r}" not in reported)
    if killed:
        code = torchrun_exits(log)[killed[0]]
        others = [f"rank {r}" for r in killed[1:]] + [m.split(" failed")[0] for _, m in reports]
        return (f"rank {killed[0]} died: killed by {SIGNALS.get(code, f'signal {-code}')} (exit code {code}) "
                f"without an error report" + (f" (then: {', '.join(others)})" if others else ""))
    if not reports:
        return f"torchrun exited with status {rc} (see the log above for the failed rank)"
    others = [m.split(" failed")[0] for _, m in reports[1:]]
    return reports[0][1] + (f" (then: {', '.join(others)})" if others else "")


def _launch(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run torchrun, passing its stderr through live and keeping the tail for failure_reason."""
    from collections import deque

    tail: deque[str] = deque(maxlen=4000)
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)
        rc = proc.wait()
    sys.stderr.flush()
    return rc, "".join(tail)


def main(argv: list[str] | None = None) -> int:
    a = _args(list(sys.argv[1:] if argv is None else argv))
    cmd, out, world = prepare(a)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: ranks share the cores
    print(f"moeperf run: {world} ranks, out {out}", flush=True)
    rc, log = _launch(cmd, env)
    if rc != 0:
        print(f"moeperf run: error: {failure_reason(out, rc, log)}", file=sys.stderr, flush=True)
        return 1
    s = summarise(out)
    if s:
        print(f"moeperf run: done {s['steps']} steps, {s['tokens_per_s']:.0f} tokens/s, "
              f"{s['step_time_s']:.3f} s/step, loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}", flush=True)
        atomic.write_json(out / "summary.json", s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
