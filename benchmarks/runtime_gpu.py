"""moeperf's runtime training on one GPU against a peer training stack: same model, batch, precision.

Models: moe-1b; Mixtral-8x7B cut to 4 layers, widths x0.5 (runtime.model.scale: full width does not fit
one GPU with fp32 masters + AdamW). moeperf runs runtime.train's step (forward_backward +
optimizer_step: bf16 autocast, fp32 masters, AdamW, clip 1, one metrics read per step) in bf16 and FP8
(precision fp8, tensorwise and blockwise) at micro-batch 1, 2, 4, 8 of 8 sequences. Reported: tokens/s
(median of --windows windows; spread = (max - min) / median), MFU = perfmodel.sim.opgraph's
model_flops_per_iteration / (step time x 989 TFLOP/s, H100/H200/H800 SXM bf16 dense), and for the best
bf16 micro-batch one profiled step: host_us_per_op = the host's time to issue the step (its
ProfilerStep span; nothing is read back inside it) / its op-graph op spans (perfmodel.calibrate.trace_reader),
kernel time, CUDA syncs inside the step (torch.cuda.set_sync_debug_mode("warn")).
Peer, bf16 (its FP8 would need torchao / Transformer Engine): torchtitan's MoE layer (softmax router,
route_norm, LocalTokenDispatcher, GroupedExperts on torch._grouped_mm) in a plain decoder of the
runtime's structure (RMSNorm, GQA + RoPE + SDPA, untied head; fused AdamW, foreach clip); else
megatron-core; else the same decoder with RefMoE (plain PyTorch, torch._grouped_mm, no parallel code).
Why a peer was not used is printed. Last lines: `peer <name> ...`, `vs_torchtitan R` (moeperf bf16
tokens/s / the peer's, first model, each at its best micro-batch). Writes <out>/runtime_gpu.csv, .json.
--dry-run: tiny-moe on the CPU, 2 steps per configuration (tests/runtime/test_runtime_gpu_smoke.py).
"""


from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from perfmodel import atomic  # noqa: E402
from perfmodel.calibrate.trace_reader import read_trace  # noqa: E402
from perfmodel.sim.opgraph import OpGraph  # noqa: E402
from perfmodel.specs import PlanSpec, load_spec  # noqa: E402
from runtime.data import Data, local_batch  # noqa: E402
from runtime.groups import Parallel  # noqa: E402
from runtime.model import scale, set_precision  # noqa: E402
from runtime.train import TrainConfig, _step_stats, forward_backward, optimizer_step, setup, to_device  # noqa: E402

PRECISIONS = {"bf16": ("bf16", "tensorwise"), "fp8-tensorwise": ("fp8", "tensorwise"),
              "fp8-blockwise": ("fp8", "blockwise")}
BF16_PEAK = 989e12  # H100 / H200 / H800 SXM, dense
REFERENCE = "plain-PyTorch reference"


class Moeperf:
    name = "moeperf"

    def __init__(self, spec, global_batch: int, device: torch.device):
        self.spec, self.device, self.k = spec, device, 0
        self.plan = PlanSpec(name="runtime-gpu", global_batch=global_batch, micro_batch=1)
        self.run = setup(TrainConfig(model=spec, plan=self.plan, quiet=True), Parallel.single(), device)
        self.data = Data(spec.vocab, spec.seq_len, global_batch, 0)

    def configure(self, precision: str) -> None:
        set_precision(self.run.modules, *PRECISIONS[precision])

    def issue(self, mb: int):
        """One training step, nothing read back: (loss, grad norm) device tensors."""
        self.k += 1
        inputs, targets = to_device(local_batch(self.data.batch(self.k), self.run.par), self.device)
        loss = forward_backward(self.run, inputs, targets, mb)
        return loss, optimizer_step(self.run, 1e-4, 1.0)

    def finish(self, out) -> float:  # the step's one read of the device (runtime.train's metrics)
        return _step_stats(self.run.stages, self.spec, out[0], out[1], self.device)["loss"]

    def step(self, mb: int) -> float:
        return self.finish(self.issue(mb))

    def reset(self) -> None:  # after an out-of-memory step
        self.run.opt.zero_grad(self.run.modules)
        for b in self.run.opt.buckets:
            b.master.grad = None

    def flops(self, mb: int) -> float:
        return OpGraph(self.spec, self.plan.model_copy(update={"micro_batch": mb}), 1).model_flops_per_iteration()


class RefMoE(nn.Module):
    """Softmax top-k router (renormalised), tokens sorted by expert, SwiGLU experts on torch._grouped_mm."""

    def __init__(self, h: int, f: int, e: int, k: int):
        super().__init__()
        self.k, self.e, self.router = k, e, nn.Linear(h, e, bias=False)
        self.w1, self.w3, self.w2 = (nn.Parameter(torch.empty(e, *sh)) for sh in ((h, f), (h, f), (f, h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.reshape(-1, x.shape[-1])
        w, idx = torch.topk(torch.softmax(F.linear(t.float(), self.router.weight.float()), dim=-1), self.k, dim=-1)
        w, flat = w / w.sum(-1, keepdim=True), idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(self.e, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        ends, dt = torch.cumsum(counts, 0, dtype=torch.int32), torch.bfloat16 if x.is_cuda else t.dtype
        xs = t[order // self.k].to(dt)
        h = F.silu(torch._grouped_mm(xs, self.w1.to(dt), offs=ends)) * torch._grouped_mm(xs, self.w3.to(dt), offs=ends)
        y = torch._grouped_mm(h, self.w2.to(dt), offs=ends).float() * w.reshape(-1)[order, None]
        return torch.zeros_like(t).index_add_(0, order // self.k, y.to(t.dtype)).view_as(x)


def torchtitan_moe(h: int, f: int, e: int, k: int) -> nn.Module:
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    return MoE.Config(
        num_experts=e, load_balance_coeff=None,
        routed_experts=RoutedExperts.Config(inner_experts=GroupedExperts.Config(dim=h, hidden_dim=f, num_experts=e),
                                            token_dispatcher=LocalTokenDispatcher.Config(num_experts=e, top_k=k)),
        router=TokenChoiceTopKRouter.Config(num_experts=e, gate=Linear.Config(in_features=h, out_features=e), top_k=k,
                                            score_func="softmax", route_norm=True)).build()


class Block(nn.Module):
    def __init__(self, spec, moe: nn.Module):
        super().__init__()
        h, d, self.rep, self.d = spec.hidden, spec.head_dim, spec.heads // spec.kv_heads, spec.head_dim
        self.n1, self.n2, self.moe = nn.RMSNorm(h, eps=1e-6), nn.RMSNorm(h, eps=1e-6), moe
        self.wq, self.wo = nn.Linear(h, spec.heads * d, bias=False), nn.Linear(spec.heads * d, h, bias=False)
        self.wk, self.wv = nn.Linear(h, spec.kv_heads * d, bias=False), nn.Linear(h, spec.kv_heads * d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        a = self.n1(x)
        q, k, v = (w(a).view(b, s, -1, self.d) for w in (self.wq, self.wk, self.wv))
        q, k = (rope(t, cos, sin) for t in (q, k))
        k, v = k.repeat_interleave(self.rep, dim=2), v.repeat_interleave(self.rep, dim=2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.wo(o.transpose(1, 2).reshape(b, s, -1))
        return x + self.moe(self.n2(x))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    return (x.float() * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1).float() * sin).to(x.dtype)


class Decoder(nn.Module):
    def __init__(self, spec, moe_factory):
        super().__init__()
        m = spec.moe
        self.embed = nn.Embedding(spec.vocab, spec.hidden)
        self.layers = nn.ModuleList(Block(spec, moe_factory(spec.hidden, m.expert_ffn_hidden, m.experts, m.top_k))
                                    for _ in range(spec.layers))
        self.norm, self.head = nn.RMSNorm(spec.hidden, eps=1e-6), nn.Linear(spec.hidden, spec.vocab, bias=False)
        ang = torch.arange(spec.seq_len).float()[:, None] / 10000.0 ** (
            torch.arange(0, spec.head_dim, 2).float()[None, :] / spec.head_dim)
        for name, fn in (("cos", torch.cos), ("sin", torch.sin)):  # rotate-half RoPE, as runtime.attention
            self.register_buffer(name, torch.cat([fn(ang)] * 2, -1)[None, :, None, :], persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        return self.head(self.norm(x))


class Peer:
    def __init__(self, name: str, moe_factory, spec, global_batch: int, device: torch.device):
        self.name, self.spec, self.device, self.k = name, spec, device, 0
        with torch.device(device):
            self.model = Decoder(spec, moe_factory)
        with torch.no_grad():
            for p in self.model.parameters():
                p.normal_(0, 0.02) if p.dim() >= 2 else None
        self.params, cuda = list(self.model.parameters()), device.type == "cuda"
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda,
                                     foreach=not cuda)
        self.data, self.tokens = Data(spec.vocab, spec.seq_len, global_batch, 0), global_batch * spec.seq_len

    def configure(self, precision: str) -> None:
        assert precision == "bf16", "peers run bf16"

    def step(self, mb: int) -> float:
        self.k += 1
        batch, total = self.data.batch(self.k).to(self.device), torch.zeros((), device=self.device)
        for j in range(0, batch.shape[0], mb):
            x, y = batch[j:j + mb, :-1], batch[j:j + mb, 1:]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            (loss / self.tokens).backward()
            total += loss.detach() / self.tokens
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(total)  # the step's one read, as the runtime's metrics

    def reset(self) -> None:  # after an out-of-memory step
        self.opt.zero_grad(set_to_none=True)


def pick_peer(requested: str) -> tuple[str, object, list[str]]:
    """(name, MoE factory, why the preferred peers were not used)."""
    why: list[str] = []
    if requested in ("auto", "torchtitan"):
        try:
            import torchtitan

            torchtitan_moe(16, 16, 2, 1)  # builds on this torch
            return f"torchtitan {getattr(torchtitan, '__version__', '?')}", torchtitan_moe, why
        except Exception as exc:  # not installed, or not for this torch: say why, fall back
            why.append(f"torchtitan not used: {type(exc).__name__}: {str(exc)[:200]}")
    if requested in ("auto", "megatron"):
        try:
            import megatron.core  # noqa: F401

            why.append("megatron-core imports, but its MoE GPT model needs model-parallel initialisation and "
                       "Transformer Engine's grouped GEMM: not wired into this benchmark")
        except Exception as exc:
            why.append(f"megatron-core not used: {type(exc).__name__}: {str(exc)[:160]}")
    return REFERENCE, RefMoE, why


def measure(stack, mb: int, tokens: int, a) -> dict:
    """Warm-up steps, then --windows windows of --window-steps steps (each ends in its metrics read)."""
    for _ in range(a.warmup):
        stack.step(mb)
    times = []
    for _ in range(a.windows):
        t0 = time.perf_counter()
        for _ in range(a.window_steps):
            stack.step(mb)
        times.append((time.perf_counter() - t0) / a.window_steps)
    med = statistics.median(times)
    return {"step_s": med, "tokens_per_s": tokens / med, "spread": (max(times) - min(times)) / med,
            "windows_s": [round(t, 6) for t in times]}


def profile_step(stack: Moeperf, mb: int) -> dict:
    """One profiled step: host time to issue it / op-graph op spans; kernel time; CUDA syncs inside."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = stack.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        with record_function("ProfilerStep#1"):
            out = stack.issue(mb)
        stack.finish(out)  # reads the metrics: waits for the device
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        tr = read_trace(path)
        kernel_us = sum(float(e.get("dur", 0)) for e in json.loads(path.read_text())["traceEvents"]
                        if e.get("cat") == "kernel")
    (start, end), ops, syncs = tr.steps[0], sum(1 for s in tr.spans if s.step == 0), None
    if cuda:  # the same step with torch's sync debug mode: every host wait inside it warns
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            out = stack.issue(mb)
            torch.cuda.set_sync_debug_mode("default")
        stack.finish(out)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    return {"host_ms": (end - start) / 1e3, "op_spans": ops, "host_us_per_op": (end - start) / max(ops, 1),
            "kernel_ms": kernel_us / 1e3 if cuda else None, "cuda_syncs_in_step": syncs}


def sweep(stack, model: str, precisions: list[str], a, rows: list, t0: float, peak=None) -> None:
    for prec in precisions:
        stack.configure(prec)
        for mb in a.micro_batches:
            r = {"stack": stack.name, "model": model, "precision": prec, "micro_batch": mb}
            if time.perf_counter() - t0 > a.budget_s:
                r["note"] = "skipped: time budget"
            else:
                try:
                    r.update(measure(stack, mb, a.global_batch * stack.spec.seq_len, a))
                    r["mfu"] = stack.flops(mb) / (r["step_s"] * peak) if peak and hasattr(stack, "flops") else None
                except torch.cuda.OutOfMemoryError:
                    stack.reset()
                    torch.cuda.empty_cache()
                    r["note"] = "out of memory"
            rows.append(r)
            head = f"{r['stack']:>10s} {model:11s} {prec:14s} mb={mb}"
            print(f"{head}: {r['note']}" if "note" in r else
                  f"{head}: {r['tokens_per_s']:10,.0f} tok/s (spread {100 * r['spread']:.1f}%) "
                  f"step {r['step_s'] * 1e3:.1f} ms" + (f" MFU {r['mfu']:.3f}" if r["mfu"] else ""), flush=True)


def best(rows: list, stack: str, model: str) -> dict | None:
    ok = [r for r in rows if (r["stack"], r["model"], r["precision"]) == (stack, model, "bf16") and "step_s" in r]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None


def free(device: torch.device) -> None:
    gc.collect(), torch.cuda.empty_cache() if device.type == "cuda" else None


def run_peer(peer: list, spec, model: str, a, rows: list, t0: float, device, why: list) -> str:
    """Sweep the peer [name, factory] on one model. One that fails (other than the reference) is
    replaced by the reference from then on (peer is updated in place). Returns the name used."""
    try:
        sweep(Peer(peer[0], peer[1], spec, a.global_batch, device), model, ["bf16"], a, rows, t0)
    except Exception as exc:
        if peer[1] is RefMoE:
            raise
        why.append(f"{peer[0]} failed on {model} ({type(exc).__name__}: {str(exc)[:200]}); using the {REFERENCE}")
        print(why[-1], flush=True)
        rows[:] = [r for r in rows if (r["stack"], r["model"]) != (peer[0], model)]
        free(device)
        peer[:] = [REFERENCE, RefMoE]
        sweep(Peer(peer[0], peer[1], spec, a.global_batch, device), model, ["bf16"], a, rows, t0)
    free(device)
    return peer[0]


def save(out: Path, rows: list, meta: dict) -> None:
    wr = csv.DictWriter(buf := io.StringIO(), extrasaction="ignore", fieldnames=[
        "stack", "model", "precision", "micro_batch", "tokens_per_s", "spread", "step_s", "mfu", "note"])
    wr.writeheader(), wr.writerows(rows)
    atomic.write_text(out / "runtime_gpu.csv", buf.getvalue())
    atomic.write_text(out / "runtime_gpu.json", json.dumps({**meta, "rows": rows}, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "runtime_gpu")
    ap.add_argument("--models", nargs="+", default=None, help="moe-1b mixtral-4l (default both)")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    for flag, default in (("--global-batch", 8), ("--warmup", 2), ("--windows", 3), ("--window-steps", 2)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--peer", default="auto", choices=["auto", "torchtitan", "megatron", "reference", "none"])
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no configuration after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="CPU smoke: tiny-moe, 2 steps per configuration")
    a = ap.parse_args(argv)
    if a.dry_run:
        a.micro_batches, a.global_batch, a.warmup, a.windows, a.window_steps = [1, 2], 2, 1, 1, 1
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("runtime_gpu: skip (no CUDA device; --dry-run runs the CPU smoke)")
        return 0
    else:
        os.environ.pop("TRITON_INTERPRET", None)
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = BF16_PEAK if any(k in gpu.upper() for k in ("H100", "H200", "H800")) else None
    specs = {"tiny-moe": load_spec("tiny-moe", "model")} if a.dry_run else {
        "moe-1b": load_spec("moe-1b", "model"), "mixtral-4l": scale(load_spec("mixtral-8x7b", "model"), 0.5, layers=4)}
    models = [m for m in (a.models or list(specs)) if m in specs]
    name, factory, why = {"none": ("none", None, []), "reference": (REFERENCE, RefMoE, [])}.get(a.peer) \
        or pick_peer(a.peer)
    peer, rows, profiles, peer_of, t0 = [name, factory], [], [], {}, time.perf_counter()
    meta = {"device": gpu, "torch": str(torch.__version__), "peers": peer_of, "peer_notes": why, "profiles": profiles,
            "global_batch": a.global_batch}
    print(f"device {gpu}, torch {torch.__version__}; models {models}; micro-batches {a.micro_batches} of "
          f"{a.global_batch} sequences; peer {name}", *why, sep="\n", flush=True)
    for model in models:
        if peer[1] is not None:  # the peer first: the headline needs it
            peer_of[model] = run_peer(peer, specs[model], model, a, rows, t0, device, why)
        mp = Moeperf(specs[model], a.global_batch, device)
        sweep(mp, model, a.precisions, a, rows, t0, peak)
        top = best(rows, "moeperf", model)
        if top is not None and time.perf_counter() - t0 <= a.budget_s:
            mp.configure("bf16")
            pr = {"model": model, "precision": "bf16", "micro_batch": top["micro_batch"],
                  **profile_step(mp, top["micro_batch"])}
            profiles.append(pr)
            print(f"   moeperf {model} bf16 mb={pr['micro_batch']} profiled step: host {pr['host_ms']:.1f} ms for "
                  f"{pr['op_spans']} op spans -> host_us_per_op {pr['host_us_per_op']:.1f}" + (
                      f"; kernels {pr['kernel_ms']:.1f} ms; CUDA syncs inside the step {pr['cuda_syncs_in_step']}"
                      if pr["kernel_ms"] else ""), flush=True)
        del mp
        free(device)
        save(a.out, rows, meta)  # a run cut short keeps every model it finished
    ratios = {}
    for model, name in peer_of.items():
        mine, theirs = best(rows, "moeperf", model), best(rows, name, model)
        if mine and theirs:
            ratios[model] = mine["tokens_per_s"] / theirs["tokens_per_s"]
            print(f"ratio {model} bf16: moeperf mb={mine['micro_batch']} {mine['tokens_per_s']:,.0f} tok/s / "
                  f"{name} mb={theirs['micro_batch']} {theirs['tokens_per_s']:,.0f} tok/s = {ratios[model]:.3f}")
    save(a.out, rows, meta | {"vs_peer": ratios, "wall_s": round(time.perf_counter() - t0, 1)})
    head = models[0] if models else None
    theirs = best(rows, peer_of.get(head, ""), head)
    print(f"peer {peer_of.get(head, 'none')}" + (
        f" ({head} bf16, best mb={theirs['micro_batch']}, {theirs['tokens_per_s']:,.0f} tok/s)" if theirs else ""))
    print(f"vs_torchtitan {ratios[head]:.3f}" if head in ratios else "vs_torchtitan n/a")
    return 0


if __name__ == "__main__":
    sys.exit(main())
