"""torchrun entry point: `python -m torch.distributed.run --nproc-per-node N -m runtime.train ...`.

Real distributed training of a plan: AdamW with fp32 masters, warmup + cosine LR, gradient
clipping, fp32 on CPU (gloo) / bf16 autocast on GPU (NCCL). Rank 0 prints one progress line per
step and appends metrics to <out>/metrics.jsonl; checkpoints go to <out>/ckpt/step_<n>/.
Iteration n's data and everything else is a function of (seed, n) plus the checkpointed state (which
holds the data position: runtime/data.py), so `--resume` continues bit-for-bit.

A step is `forward_backward` then `optimizer_step` (benchmarks/runtime_gpu.py and
tests/runtime/test_host_syncs.py run the same two functions). Neither reads anything back from the
device, so on a GPU the host runs ahead of the kernels: the only host round-trips inside a step are
the expert-parallel all-to-alls' split sizes (one per MoE layer and micro-batch, runtime.moe). The
step's metrics (loss, aux loss, grad norm, routing, bytes) are read once, after the optimizer, in one
transfer (`_step_stats`): that read is what the step time includes, and the input batch goes to the
device without a blocking copy.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from perfmodel import atomic, envfail
from perfmodel.argparse_util import parser
from perfmodel.specs import ModelSpec, PlanSpec, load_spec
from perfmodel.specs.layout import plan_layout
from runtime import checkpoint, comm, faults, preempt
from runtime.data import open_data, step_batch
from runtime.groups import Parallel, build_parallel
from runtime.model import build_stages, check_supported, lm_loss, scale
from runtime.optim import ShardedAdamW, lr_at
from runtime.pipeline import make_schedule, run_step
from runtime.profiling import StepProfiler


@dataclass
class TrainConfig:
    model: ModelSpec
    plan: PlanSpec
    steps: int = 10
    out: Path | None = None
    data: list[str] = field(default_factory=list)
    seed: int = 0
    lr: float = 1e-3
    warmup: int = 10
    clip: float = 1.0
    ckpt_every: int = 0
    resume: bool = False
    dump_grads: Path | None = None  # write step-1 synced gradients here (tests)
    inject_failure: tuple[int, int] | None = None  # (rank, step): raise there (tests failure handling)
    quiet: bool = False
    # profiling (runtime/profiling.py): torch.profiler traces of steps "A:B" into trace_dir
    profile_steps: str | None = None
    trace_dir: Path | None = None
    cluster: str | None = None  # recorded in the traces' meta.yaml


def _reset_stats(stages) -> None:
    for _, st in stages:
        for m in st.moe_layers().values():
            m.tokens_per_expert.zero_()
            m.aux_sum.zero_()


def _step_stats(stages, spec: ModelSpec, loss: torch.Tensor, norm: torch.Tensor | float, device) -> dict:
    """The step's metrics, world-summed where shared, in ONE device-to-host read: loss, aux loss, grad
    norm, max tokens routed to one expert in one layer, and comm.step_bytes' byte counts."""
    e = spec.moe.experts if spec.moe else 0
    counts = torch.zeros(spec.layers, e, device=device)
    aux = torch.zeros((), device=device)
    for _, st in stages:
        for i, m in st.moe_layers().items():
            counts[i] = m.tokens_per_expert
            aux += m.aux_sum
    b = comm.STATS.bytes_sent
    moe_a2a = ("moe.dispatch_a2a", "moe.combine_a2a")
    nbytes = [sum(v for k, v in b.items() if k.startswith(moe_a2a)),
              sum(v for k, v in b.items() if k.startswith(moe_a2a) and k.endswith("/fwd")), b.get("dp.grad_sync", 0),
              *preempt.flags()]  # SIGTERM/SIGINT seen: summed, so every rank stops after the same step
    nbytes_t = torch.tensor(nbytes, dtype=torch.float64)  # host counts; on CUDA sent without a blocking copy
    nbytes_t = nbytes_t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else nbytes_t.to(device)
    packed = torch.cat([loss.reshape(1).double().to(device), aux.reshape(1).double(), nbytes_t,
                        counts.reshape(-1).double()])
    if dist.is_initialized():
        dist.all_reduce(packed)  # every term is a disjoint share (tokens, layers, bytes), so the sum is the total
    norm_t = torch.as_tensor(norm, dtype=torch.float64, device=device).reshape(1)  # the same on every rank
    vals = torch.cat([packed[:7], packed[7:].max().reshape(1) if e else packed.new_zeros(1), norm_t]).tolist()
    return {"loss": vals[0], "aux_loss": vals[1], "grad_norm": vals[8], "max_tokens_per_expert": int(vals[7]),
            "a2a_bytes": int(vals[2]), "a2a_fwd_bytes": int(vals[3]), "grad_sync_bytes": int(vals[4]),
            "stop": preempt.decide(vals[5], vals[6])}


def _step_of(line: str) -> float:
    """The step of a metrics line; a torn last line (killed mid-append) counts as never written."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


@dataclass
class Run:
    """What a training step needs, built once (`setup`)."""
    spec: ModelSpec
    plan: PlanSpec
    par: Parallel
    device: torch.device
    microbatches: int  # per replica per step
    stages: list
    modules: list
    opt: ShardedAdamW
    schedule: object | None  # the pipeline schedule (pp > 1)
    n_stages: int
    global_tokens: int


def setup(cfg: TrainConfig, par: Parallel, device: torch.device) -> Run:
    """Model stages (on device; bf16 autocast on CUDA), optimizer and pipeline schedule of cfg's plan."""
    spec, plan = cfg.model, cfg.plan
    layout = plan_layout(plan, spec, par.world)
    check_supported(plan, layout.microbatches)
    torch.manual_seed(cfg.seed)
    stages = build_stages(spec, plan, par, cfg.seed)
    modules = [m.to(device) for _, m in stages]
    if device.type == "cuda":
        for m in modules:
            m.autocast = torch.bfloat16
    opt = ShardedAdamW(modules, par, cfg.lr, distributed=plan.distributed_optimizer,
                       grad_bf16=plan.compression.grad_sync == "bf16")
    global_tokens = plan.global_batch * spec.seq_len

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, targets, global_tokens)

    n_stages = par.size("pp") * len(stages)
    schedule = None
    if par.size("pp") > 1:
        logits_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        schedule = make_schedule(stages, spec, par, plan.micro_batch, layout.microbatches, loss_fn, device,
                                 logits_dtype, plan.schedule, layout.stages)
    return Run(spec, plan, par, device, layout.microbatches, stages, modules, opt, schedule, n_stages, global_tokens)


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Host tensors to the device; on CUDA from pinned memory without blocking the host."""
    if device.type != "cuda":
        return tuple(t.to(device) for t in batch)
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)


def forward_backward(run: Run, inputs: torch.Tensor, targets: torch.Tensor, micro_batch: int | None = None
                     ) -> torch.Tensor:
    """Forward and backward of one step's local batch (gradients accumulate in .grad); returns the
    summed loss share as a device tensor. micro_batch overrides the plan's (pp = 1 only)."""
    _reset_stats(run.stages)
    comm.STATS.reset()  # bytes sent this step (metrics)
    if run.schedule is not None:
        return run_step(run.schedule, run.stages, run.n_stages, inputs, targets)
    loss = torch.zeros((), device=run.device)
    mb = micro_batch or run.plan.micro_batch
    for j in range(inputs.shape[0] // mb):
        part = lm_loss(run.modules[0](inputs[j * mb:(j + 1) * mb]), targets[j * mb:(j + 1) * mb], run.global_tokens)
        part.backward()
        loss += part.detach()
    return loss


def optimizer_step(run: Run, lr: float, clip: float, after_sync=None) -> torch.Tensor:
    """Gradient sync, clip and AdamW, then drop the gradients; returns the grad norm (device tensor).
    after_sync(): called between the sync and the update (tests dump the synced gradients there)."""
    run.opt.sync_grads()
    if after_sync is not None:
        after_sync()
    norm = run.opt.step(lr, clip)
    run.opt.zero_grad(run.modules)
    return norm


def train(cfg: TrainConfig, par: Parallel, device: torch.device) -> list[dict]:
    run = setup(cfg, par, device)
    spec, plan, stages, modules, opt = run.spec, run.plan, run.stages, run.modules, run.opt
    data = open_data(cfg.data, spec.vocab, spec.seq_len, plan.global_batch, cfg.seed)
    global_tokens = run.global_tokens
    meta = {"world": par.world, "plan": plan.model_dump(mode="json"), "model": spec.model_dump(mode="json"),
            "seed": cfg.seed, "data": data.identity()}
    state = {f"r{par.rank}": {"model": {p.full_name: p.data for m in modules for p in m.parameters()},
                              "optim": opt.state(), "rng": torch.get_rng_state()}}
    start, metrics_path, records = 0, None, []
    ckpt_dir = cfg.out / "ckpt" if cfg.out else None
    if cfg.out:
        metrics_path = cfg.out / "metrics.jsonl"
    if cfg.resume and ckpt_dir and (found := checkpoint.latest_good(ckpt_dir, log=par.rank == 0)):
        saved = checkpoint.saved_meta(found)  # the data position first: a resume on other data is refused
        data.resume(saved.get("data"), saved.get("data_position"), int(saved["step"]), str(found))
        start = checkpoint.load(found, state, meta)
        opt.after_load()
        torch.set_rng_state(state[f"r{par.rank}"]["rng"])
        if par.rank == 0 and metrics_path and metrics_path.exists():  # drop steps that will be redone
            keep = [ln for ln in metrics_path.read_text().splitlines() if _step_of(ln) <= start]
            atomic.write_text(metrics_path, "".join(ln + "\n" for ln in keep))
        if par.rank == 0 and not cfg.quiet:
            print(f"resumed from {found} (step {start})", flush=True)
    elif par.rank == 0 and metrics_path:
        atomic.write_text(metrics_path, "")
    if par.rank == 0 and ckpt_dir:
        for p in checkpoint.remove_stale(ckpt_dir):  # a killed or failed save's leftovers
            print(f"moeperf run: removed {p.name}, an unfinished checkpoint save", file=sys.stderr, flush=True)
    # --- profiling (runtime/profiling.py) ---
    trace_dir = cfg.trace_dir or (cfg.out / "traces" / cfg.out.name if cfg.out else None)
    prof = StepProfiler.create(cfg.profile_steps, trace_dir, par.rank, par.world, spec, plan, cfg.cluster)
    for step in range(start + 1, cfg.steps + 1):
        prof.begin(step)
        t0 = time.perf_counter()
        if cfg.inject_failure == (par.rank, step):
            raise RuntimeError(f"injected failure at step {step}")
        inputs, targets = to_device(step_batch(data, step, par), device)
        loss = forward_backward(run, inputs, targets)
        faults.point("step", par.rank, step)  # MOEPERF_FAULT (tests): die mid-step

        def dump(step: int = step) -> None:
            if cfg.dump_grads and step == start + 1:
                synced = opt.full_grads()
                grads = {p.full_name: (synced[p.full_name].cpu(), p.place.shard) for m in modules
                         for p in m.parameters()}
                cfg.dump_grads.mkdir(parents=True, exist_ok=True)
                torch.save(grads, cfg.dump_grads / f"rank{par.rank}.pt")

        norm = optimizer_step(run, lr_at(step, cfg.lr, cfg.warmup, cfg.steps), cfg.clip, dump)
        stats = _step_stats(stages, spec, loss, norm, device)  # the step's one read of the device
        dt = time.perf_counter() - t0
        prof.end(step, dt)
        rec = {"step": step, "loss": stats["loss"], "aux_loss": stats["aux_loss"], "grad_norm": stats["grad_norm"],
               "lr": lr_at(step, cfg.lr, cfg.warmup, cfg.steps), "tokens_per_s": global_tokens / dt,
               "step_time_s": dt, "max_tokens_per_expert": stats["max_tokens_per_expert"],
               "consumed_samples": data.position(step)["consumed_samples"],
               **{k: stats[k] for k in ("a2a_bytes", "a2a_fwd_bytes", "grad_sync_bytes")}}
        loss_v, aux_v, max_tpe = stats["loss"], stats["aux_loss"], stats["max_tokens_per_expert"]
        stop = stats["stop"]  # SIGTERM/SIGINT on any rank, agreed by all
        due = bool(ckpt_dir) and (bool(cfg.ckpt_every) and (step % cfg.ckpt_every == 0 or step == cfg.steps)
                                  or stop == "SIGTERM")
        fits = True
        if due:  # a save that cannot fit is skipped (and logged), not left to crash the job mid-write
            fits, need, free = checkpoint.room(ckpt_dir, step, state, par.rank)
            if not fits:
                rec["ckpt_skipped"] = {"need_bytes": need, "free_bytes": free}
                if par.rank == 0:
                    print(f"moeperf run: warning: skipped the step-{step} checkpoint: it needs about {need / 1e6:.1f} MB, "
                          f"{free / 1e6:.1f} MB free on {ckpt_dir}; training continues", file=sys.stderr, flush=True)
        records.append(rec)
        if par.rank == 0:
            if metrics_path:
                try:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                except OSError as exc:  # a full disk says nothing of the file: name it
                    raise OSError(exc.errno, exc.strerror, str(metrics_path)) from exc
            if not cfg.quiet:
                print(f"step {step}/{cfg.steps} loss {loss_v:.4f} aux {aux_v:.4f} tok/s {rec['tokens_per_s']:.0f} "
                      f"step {dt:.3f}s max_tok/expert {max_tpe}", flush=True)
        if due and fits:
            state[f"r{par.rank}"]["rng"] = torch.get_rng_state()
            checkpoint.save(ckpt_dir, step, state, par.rank, {**meta, "data_position": data.position(step)})
        if stop:
            if par.rank == 0 and cfg.out:
                preempt.write_stopped(cfg.out, stop, step, cfg.steps, checkpoint.latest(ckpt_dir) if ckpt_dir else None)
            break
    prof.close()
    return records


def _args(argv: list[str]):
    ap = parser("run (rank)", "one rank of a moeperf training job; launched by torchrun")
    ap.add_argument("--model", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--data", nargs="*", default=[])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--dump-grads", type=Path, default=None)
    ap.add_argument("--inject-failure", default=None, help="RANK:STEP (testing failure handling)")
    ap.add_argument("--pg-timeout-s", type=float, default=120.0)
    ap.add_argument("--world-needed", type=int, default=0, help="elastic: ranks the job needs (wait with fewer)")
    ap.add_argument("--profile-steps", default=None, help="A:B: torch.profiler traces of steps A..B")
    ap.add_argument("--trace-dir", type=Path, default=None, help="where traces go (default <out>/traces/<out name>)")
    ap.add_argument("--cluster", default=None, help="cluster preset/path recorded in the traces' meta.yaml")
    return ap.parse_args(argv)


def config_from_args(a) -> TrainConfig:
    model = load_spec(a.model, "model")
    if a.scale != 1.0 or a.layers or a.seq_len:
        model = scale(model, a.scale, a.layers, a.seq_len)
    inj = tuple(int(x) for x in a.inject_failure.split(":")) if a.inject_failure else None
    # a restarted worker (torchrun --max-restarts) resumes from the last checkpoint
    resume = a.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    return TrainConfig(model=model, plan=load_spec(a.plan, "plan"), steps=a.steps, out=a.out, data=a.data,
                       seed=a.seed, lr=a.lr, warmup=a.warmup, clip=a.clip, ckpt_every=a.ckpt_every,
                       resume=resume, dump_grads=a.dump_grads, inject_failure=inj,
                       profile_steps=a.profile_steps, trace_dir=a.trace_dir, cluster=a.cluster)  # type: ignore[arg-type]


def init_distributed(timeout_s: float) -> tuple[int, int, torch.device]:
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend, timeout = "nccl" if cuda else "gloo", timedelta(seconds=timeout_s)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun (standalone) hands a restarted attempt the same agent store, still holding the dead
        # attempt's gloo addresses: connect under a fresh prefix so the new ranks find each other
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"moeperf/attempt{restart}", store), rank=rank,
                                world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


@record
def main(argv: list[str] | None = None) -> int:
    a = _args(list(sys.argv[1:] if argv is None else argv))
    cfg = config_from_args(a)
    world_now = int(os.environ.get("WORLD_SIZE", "1"))
    if a.world_needed and world_now < a.world_needed:  # an elastic restart without the lost node: wait for it
        return preempt.wait_for_nodes(world_now, a.world_needed)
    preempt.install()
    rank, world, device = init_distributed(a.pg_timeout_s)
    try:
        _write_node(cfg.out, rank, world)
        if world > 1:  # a node that rejoins an elastic job runs without --resume: resume if any rank does
            flag = torch.tensor([float(cfg.resume)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            cfg.resume = bool(flag.item())
        par = build_parallel(cfg.plan, world, rank, timeout=timedelta(seconds=a.pg_timeout_s))
        train(cfg, par, device)
        dist.barrier()
    except (checkpoint.CheckpointError, OSError) as exc:  # the environment: one line, exit 1, no traceback
        # a CheckpointError is the same on every rank (naming the rank that failed): rank 0 says it
        msg = str(exc) if isinstance(exc, checkpoint.CheckpointError) else f"rank {rank}: {envfail.describe(exc)}"
        if rank == 0 or not isinstance(exc, checkpoint.CheckpointError):
            print(f"moeperf run: {msg}", file=sys.stderr, flush=True)
            _report(cfg.out, rank, msg)
        return 1
    except Exception as exc:
        msg = f"rank {rank} failed: {type(exc).__name__}: {exc}"
        print(f"moeperf run: {msg}", file=sys.stderr, flush=True)
        _report(cfg.out, rank, msg)
        raise
    dist.destroy_process_group()
    return 0


def _report(out: Path | None, rank: int, msg: str) -> None:
    """failures/rank<k>.txt for the launcher; the time tells the first failure from the ranks it brought
    down. Best effort: on a full disk the launcher reads the same line from the log instead."""
    if out:
        try:
            atomic.write_text(out / "failures" / f"rank{rank}.txt", f"{time.time():.6f} {msg}\n")
        except OSError:
            pass


def _write_node(out: Path | None, rank: int, world: int) -> None:
    """nodes/node<g>.json (local rank 0 of each node): its host and ranks, so the launcher can name a lost node."""
    if not out or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    node = {"node": int(os.environ.get("GROUP_RANK", "0")), "host": socket.gethostname(), "agent_pid": os.getppid(),
            "ranks": list(range(rank, rank + local)), "world": world}
    try:
        atomic.write_json(out / "nodes" / f"node{node['node']}.json", node)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
