"""Smoke benchmark of the Triton kernels on CPU (TRITON_INTERPRET=1) against torch.

The interpreter executes every program in Python, so the ratio says nothing about GPU speed;
this run proves the benchmark code path and the kernels work end to end on a CPU machine, in
fp32 (the interpreter mishandles bf16).  Prints one line per implementation and, last,
`kernels_cpu_interpreter_ratio <triton ms / torch loop ms>` (forward GEMM).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton or runtime.kernels

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels_gpu import bench_shape  # noqa: E402


def wall_ms(fn: Callable[[], object], reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)  # min: the machine may be shared, and noise only ever adds time


def main() -> int:
    torch.manual_seed(0)
    # a scaled-down DeepSeek-like shape: 4 experts, top-2, 64 tokens, H=64, 2F=96
    rows = bench_shape("cpu", "tiny", "fc1", 64, 64, 96, 4, 2, device="cpu", dtype=torch.float32, timer=wall_ms)
    for r in rows:
        status = f"{r.ms:9.2f} ms  err {r.max_rel_err:.1e}" if r.ms == r.ms else r.note
        print(f"{r.gemm:9s} {r.dtype:8s} {r.impl:24s} {status}")
    bad = [r for r in rows if r.impl == "triton" and r.dtype == "float32" and not r.max_rel_err <= 1e-5]
    if bad:
        print(f"kernels_cpu: triton differs from torch in {[r.gemm for r in bad]}")
        return 1
    by = {(r.dtype, r.impl): r for r in rows if r.ms == r.ms and r.gemm == "fc1"}
    tri, loop = by.get(("float32", "triton")), by.get(("float32", "torch_loop"))
    if tri is None or loop is None:
        print("kernels_cpu: triton or torch path failed")
        return 1
    print(f"kernels_cpu_interpreter_ratio {tri.ms / loop.ms:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
