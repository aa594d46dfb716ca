"""Grouped GEMM TFLOP/s on a GPU: Triton kernel vs the best torch path, bf16 and FP8.

Shapes are the per-rank expert GEMMs of Mixtral-8x7B (H=4096, F=14336, 8 local experts, top-2)
and DeepSeek-V3 (H=7168, F=2048, 32 local experts, top-8): fc1 is [rows, H] x [E, H, 2F], fc2 is
[rows, F] x [E, F, H], rows = tokens per rank x top-k, routed near-uniformly (multinomial, fixed
seed, so counts are ragged like real routing and not multiples of any tile size).

torch baselines: a per-expert matmul loop (cuBLAS) and torch._grouped_mm where present; for FP8
a per-expert torch._scaled_mm loop (row-wise scales) and torch._scaled_grouped_mm where present.
A baseline that raises on this GPU/torch is reported as unavailable, not silently dropped.

Writes benchmarks/results/kernels_gpu_<gpu>.csv and prints, per shape, triton / best torch;
the last lines are `grouped_gemm_fwd_ratio_min` and `grouped_gemm_ratio_min` (forward, and
forward + dgrad + wgrad; the bar is >= 0.9).  Without CUDA it prints
a skip line and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {  # name: (hidden, expert_ffn_hidden, local experts, top_k)
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "deepseek-v3": (7168, 2048, 32, 8),
}


@dataclass
class Row:
    gpu: str
    model: str
    gemm: str
    tokens: int
    rows: int
    K: int
    N: int
    E: int
    dtype: str
    impl: str
    ms: float
    tflops: float
    max_rel_err: float
    note: str = ""


def _counts(rows: int, experts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, experts, (rows,), generator=g)
    return torch.bincount(picks, minlength=experts)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _time_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100))


def _quant_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(expert, output column) e4m3 weights, stored [E, N, K] (K-major B for Hopper FP8) and
    returned viewed as [E, K, N]; scales [E, N]."""
    from runtime.kernels import FP8_DTYPE, FP8_MAX

    sw = w.float().abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    wq_nk = (w.float() / sw[:, None, :]).clamp(-FP8_MAX, FP8_MAX).transpose(1, 2).contiguous().to(FP8_DTYPE)
    return wq_nk.transpose(1, 2), sw


def bench_shape(gpu: str, model: str, gemm: str, tokens: int, k: int, n: int, e: int, topk: int,
                device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                timer: Callable[[Callable[[], object]], float] | None = None, backward: bool = True) -> list[Row]:
    """All implementations on one shape.  device/dtype/timer exist so kernels_cpu.py can run the
    same code as a smoke test under the interpreter (fp32, tiny shapes, wall-clock timer)."""
    from runtime.kernels import quantize_fp8
    from runtime.kernels.grouped_gemm import counts_to_offsets, grouped_gemm_fwd_triton

    dev = torch.device(device)
    timer = timer or _time_ms
    hi = "bf16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")
    rows = tokens * topk
    counts = _counts(rows, e).to(dev)
    splits = counts.tolist()
    offsets = counts_to_offsets(counts)
    ends = offsets[1:].contiguous()  # torch._grouped_mm wants inclusive ends, int32
    x = torch.randn(rows, k, device=dev, dtype=dtype)
    w = torch.randn(e, k, n, device=dev, dtype=dtype) / k**0.5
    flops = 2.0 * rows * k * n
    out: list[Row] = []

    def record(dtype: str, impl: str, fn: Callable[[], torch.Tensor], ref: torch.Tensor | None,
               label: str = gemm) -> None:
        try:
            y = fn()
            err = _rel(y, ref) if ref is not None else 0.0
            ms = timer(fn)
            out.append(Row(gpu, model, label, tokens, rows, k, n, e, dtype, impl, ms, flops / ms / 1e9, err))
        except Exception as exc:  # an unsupported baseline on this torch/GPU: say so, keep going
            out.append(Row(gpu, model, label, tokens, rows, k, n, e, dtype, impl, float("nan"), float("nan"),
                           float("nan"), f"unavailable: {type(exc).__name__}: {str(exc)[:120]}"))

    # ---- 16-bit (fp32 in the CPU smoke)
    y_loop = torch.empty(rows, n, device=dev, dtype=dtype)
    xs = list(torch.split(x, splits))
    ys = list(torch.split(y_loop, splits))

    def loop() -> torch.Tensor:
        for i in range(e):
            torch.mm(xs[i], w[i], out=ys[i])
        return y_loop

    ref = loop().clone()
    record(hi, "torch_loop", loop, ref)
    if hasattr(torch, "_grouped_mm"):
        record(hi, "torch_grouped_mm", lambda: torch._grouped_mm(x, w, offs=ends), ref)
    record(hi, "triton", lambda: grouped_gemm_fwd_triton(x, w, offsets, tma=False), ref)
    if device == "cuda":  # Hopper TMA loads (the runtime's default there)
        record(hi, "triton_tma", lambda: grouped_gemm_fwd_triton(x, w, offsets, tma=True), ref)
    if backward:
        _bench_backward(record, hi, x, w, splits, offsets, ends, gemm, tma=device == "cuda")

    # ---- fp8: per-token x scales, per-channel w scales, bf16 output
    xq, sx = quantize_fp8(x, None, "triton")
    wq, sw = _quant_weight(w)
    ref8 = ref  # the bf16 product; fp8 error is reported against it
    xqs = list(torch.split(xq, splits))
    sxs = [s[:, None].contiguous() for s in torch.split(sx, splits)]
    sws = [sw[i][None, :].contiguous() for i in range(e)]
    y8 = torch.empty(rows, n, device=dev, dtype=torch.bfloat16)
    y8s = list(torch.split(y8, splits))

    def loop8() -> torch.Tensor:
        for i in range(e):
            if xqs[i].shape[0]:
                y8s[i].copy_(torch._scaled_mm(xqs[i], wq[i], scale_a=sxs[i], scale_b=sws[i],
                                              out_dtype=torch.bfloat16))
        return y8

    record("fp8", "torch_scaled_mm_loop", loop8, ref8)
    if hasattr(torch, "_scaled_grouped_mm"):
        record("fp8", "torch_scaled_grouped_mm",
               lambda: torch._scaled_grouped_mm(xq, wq, sx, sw, offs=ends, out_dtype=torch.bfloat16), ref8)
    from runtime.kernels.grouped_gemm import grouped_gemm_fp8_triton

    record("fp8", "triton", lambda: grouped_gemm_fp8_triton(xq, sx, wq, sw, counts, torch.bfloat16, tma=False), ref8)
    if device == "cuda":
        record("fp8", "triton_tma",
               lambda: grouped_gemm_fp8_triton(xq, sx, wq, sw, counts, torch.bfloat16, tma=True), ref8)
    return out


def _bench_backward(record, hi: str, x, w, splits: list[int], offsets, ends, gemm: str, tma: bool = False) -> None:
    """dgrad dx_e = dy_e @ W_e^T and wgrad dW_e = x_e^T @ dy_e, same FLOPs as the forward."""
    from runtime.kernels.grouped_gemm import grouped_gemm_dgrad_triton, grouped_gemm_wgrad_triton

    e, n = w.shape[0], w.shape[2]
    dy = torch.randn(x.shape[0], n, device=x.device, dtype=x.dtype)
    dys, xs = list(torch.split(dy, splits)), list(torch.split(x, splits))
    dx = torch.empty_like(x)
    dxs = list(torch.split(dx, splits))
    dw = torch.empty_like(w)

    def dgrad_loop() -> torch.Tensor:
        for i in range(e):
            torch.mm(dys[i], w[i].t(), out=dxs[i])
        return dx

    def wgrad_loop() -> torch.Tensor:
        for i in range(e):
            torch.mm(xs[i].t(), dys[i], out=dw[i])
        return dw

    ref_d = dgrad_loop().clone()
    ref_w = wgrad_loop().clone()
    record(hi, "torch_loop", dgrad_loop, ref_d, f"{gemm}.dgrad")
    record(hi, "torch_loop", wgrad_loop, ref_w, f"{gemm}.wgrad")
    if hasattr(torch, "_grouped_mm"):
        record(hi, "torch_grouped_mm", lambda: torch._grouped_mm(dy, w.transpose(1, 2), offs=ends), ref_d,
               f"{gemm}.dgrad")
        record(hi, "torch_grouped_mm", lambda: torch._grouped_mm(x.t(), dy, offs=ends), ref_w, f"{gemm}.wgrad")
    record(hi, "triton", lambda: grouped_gemm_dgrad_triton(dy, w, offsets, tma=False), ref_d, f"{gemm}.dgrad")
    if tma:
        record(hi, "triton_tma", lambda: grouped_gemm_dgrad_triton(dy, w, offsets, tma=True), ref_d, f"{gemm}.dgrad")
    record(hi, "triton", lambda: grouped_gemm_wgrad_triton(x, dy, offsets, w.dtype), ref_w, f"{gemm}.wgrad")


def _gpu_name() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        wr.writeheader()
        for r in rows:
            wr.writerow(asdict(r))
    os.replace(tmp, path)  # atomic: a crashed run never leaves half a CSV


def summarize(rows: list[Row], quiet: bool = False) -> float:
    """Print Triton / best torch per (shape, dtype); return the smallest ratio. The Triton figure is
    the kernel the runtime runs by default: TMA loads for 16-bit operands on Hopper, pointer loads
    for fp8 (the faster of the two there, measured)."""
    worst = float("inf")
    keys = sorted({(r.model, r.gemm, r.tokens, r.dtype) for r in rows})
    for key in keys:
        group = [r for r in rows if (r.model, r.gemm, r.tokens, r.dtype) == key and r.ms == r.ms]
        # the runtime's default (runtime.kernels.grouped_gemm._launch_fwd): TMA for 16-bit, pointer loads for fp8
        order = ("triton",) if key[3] == "fp8" else ("triton_tma", "triton")
        tri = next(([r for r in group if r.impl == impl] for impl in order if any(r.impl == impl for r in group)), [])
        base = [r for r in group if not r.impl.startswith("triton")]
        if not tri or not base:
            if not quiet:
                    print(f"{key}: no comparison (triton {'ok' if tri else 'missing'}, torch baselines {len(base)})")
            continue
        best = max(base, key=lambda r: r.tflops)
        ratio = tri[0].tflops / best.tflops
        worst = min(worst, ratio)
        if quiet:
            continue
        print(f"{key[0]:13s} {key[1]:9s} T={key[2]:5d} {key[3]:4s}: {tri[0].impl} {tri[0].tflops:7.1f} TFLOP/s "
              f"(err {tri[0].max_rel_err:.1e}), best torch {best.impl} {best.tflops:7.1f} -> ratio {ratio:.2f}")
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192], help="tokens per rank")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/...)")
    ap.add_argument("--no-backward", action="store_true", help="forward GEMMs only (skip dgrad/wgrad)")
    ap.add_argument("--summarize", type=Path, default=None, metavar="CSV",
                    help="print the summary of a recorded CSV (no GPU needed) and exit")
    args = ap.parse_args(argv)
    if args.summarize is not None:
        return _print_summary(read_csv(args.summarize))
    if not torch.cuda.is_available():
        print("kernels_gpu: skip (no CUDA device)")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels only: this measures the GPU
    torch.manual_seed(0)
    gpu = _gpu_name()
    rows: list[Row] = []
    path = args.out or ROOT / "benchmarks" / "results" / f"kernels_gpu_{gpu}.csv"
    for model in args.models:
        h, f, e, topk = MODELS[model]
        for tokens in args.tokens:
            for gemm, k, n in (("fc1", h, 2 * f), ("fc2", f, h)):
                t0 = time.perf_counter()
                rows += bench_shape(gpu, model, gemm, tokens, k, n, e, topk, backward=not args.no_backward)
                torch.cuda.empty_cache()
                write_csv(rows, path)  # after every shape: a run cut short keeps what it measured
                print(f"{model} {gemm} T={tokens}: {time.perf_counter() - t0:.1f} s (autotuning included)", flush=True)
    for r in rows:
        if r.note:
            print(f"note: {r.model} {r.gemm} T={r.tokens} {r.dtype} {r.impl}: {r.note}")
    print(f"wrote {path}")
    return _print_summary(rows)


def _print_summary(rows: list[Row]) -> int:
    worst = summarize(rows)
    fwd_worst = summarize([r for r in rows if "." not in r.gemm], quiet=True)
    print(f"grouped_gemm_fwd_ratio_min {fwd_worst:.3f}")
    print(f"grouped_gemm_ratio_min {worst:.3f}")
    return 0


def read_csv(path: Path) -> list[Row]:
    types = {f.name: f.type for f in fields(Row)}
    conv = {"int": int, "float": float, "str": str}
    with path.open() as f:
        return [Row(**{k: conv[types[k]](v) for k, v in r.items()}) for r in csv.DictReader(f)]


if __name__ == "__main__":
    sys.exit(main())
