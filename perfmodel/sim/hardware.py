"""Compute-op timing from a hardware profile (ProfileSpec).

  gemm       FLOPs / (peak[dtype] x efficiency(FLOPs)), floored by its HBM traffic
             (grouped GEMMs use the grouped curve; fp8 GEMMs the fp8 peak and the fp8 curves)
  attention  FLOPs / (peak_bf16 x attention efficiency(FLOPs)), floored by HBM traffic
  memory     bytes / (HBM bandwidth x memory efficiency(bytes))
  + one kernel launch overhead per op; and never less than the host's time to issue the op
  (`host_us_per_op`: the device runs ahead of a host that issues ops faster than they run).

`efficiency_work` lets the intra-op tile model time a slice of a GEMM at the efficiency of
the whole GEMM (tiles of one fused kernel keep its efficiency; chunks do not).
"""

from __future__ import annotations

from dataclasses import dataclass

from perfmodel.sim.opgraph import Op
from perfmodel.specs import ProfileSpec, SpecError

TILE_OVERHEAD_US = 0.5  # per tile of a fused GEMM+comm kernel (tile sync, no extra launch)


@dataclass(frozen=True)
class Hardware:
    """Per-profile constants in SI units, precomputed once (hot path of the simulator)."""

    profile: ProfileSpec
    hbm_Bps: float
    launch_s: float
    tile_overhead_s: float = TILE_OVERHEAD_US * 1e-6
    host_s: float = 0.0

    @classmethod
    def of(cls, profile: ProfileSpec) -> Hardware:
        return cls(profile, profile.hbm_bw_GBps * 1e9, profile.launch_overhead_us * 1e-6,
                   host_s=profile.host_us_per_op * 1e-6)

    def peak_flops(self, dtype: str) -> float:
        peaks = self.profile.peak_tflops
        for key in (dtype, "tf32" if dtype == "fp32" else dtype, "bf16", "fp16", "fp32"):
            if key in peaks:
                return peaks[key] * 1e12  # type: ignore[index]
        raise SpecError(f"profile {self.profile.name}: peak_tflops has no entry for {dtype}")

    def memory_s(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        return nbytes / (self.hbm_Bps * max(self.profile.memory_efficiency.at(nbytes), 1e-9))

    def compute_s(self, op: Op, frac: float = 1.0, efficiency_work: float | None = None,
                  launch_s: float | None = None, host: bool = True) -> float:
        """Seconds for `frac` of a compute op (gemm | attention | memory) on one GPU, launch included.

        `efficiency_work` (FLOPs) sets the size the efficiency curve is read at (default: the
        slice's own FLOPs); `launch_s` overrides the launch overhead (a tile's overhead); `host`
        False: issued with the previous slice (tiles of one fused kernel), no host time of its own.
        """
        t = self._device_s(op, frac, efficiency_work, launch_s)
        return max(t, self.host_s) if host else t

    def _device_s(self, op: Op, frac: float, efficiency_work: float | None, launch_s: float | None) -> float:
        p = self.profile
        over = self.launch_s if launch_s is None else launch_s
        nbytes = op.bytes * frac
        if op.kind == "memory":
            return self.memory_s(nbytes) + over
        flops = op.flops * frac
        work = flops if efficiency_work is None else efficiency_work
        if op.kind == "gemm":
            curve = self.gemm_curve(op)
        elif op.kind == "attention":
            curve = p.attention_efficiency
        else:
            raise ValueError(f"{op.event} is not a compute op")
        dtype = op.dtype if op.kind == "gemm" else "bf16"
        peak = self.peak_flops(dtype)
        if op.kind == "gemm" and curve is self._curve16(op) and dtype not in ("bf16", "fp16"):
            # a 16-bit curve read for another dtype (the fp32 router; fp8 without fp8 curves): its
            # half_work is a fixed per-GEMM cost measured at the 16-bit rate, so read the curve at
            # the 16-bit-equivalent work (a tiny fp32 GEMM costs that latency, not 15x it)
            work *= self.peak_bf16_flops() / peak
        eff = max(curve.at(work), 1e-9)  # type: ignore[union-attr]
        t_math = flops / (peak * eff) if flops > 0 else 0.0
        return max(t_math, self.memory_s(nbytes)) + over

    def _curve16(self, op: Op):
        p = self.profile
        grouped = op.shape is not None and op.shape[0] > 1 and p.grouped_gemm_efficiency is not None
        return p.grouped_gemm_efficiency if grouped else p.gemm_efficiency

    def gemm_curve(self, op: Op):
        """The efficiency curve of a GEMM: grouped or not, FP8 or 16-bit (FP8 falls back to 16-bit)."""
        p = self.profile
        if op.dtype == "fp8":
            grouped = op.shape is not None and op.shape[0] > 1 and p.fp8_grouped_gemm_efficiency is not None
            fp8 = p.fp8_grouped_gemm_efficiency if grouped else p.fp8_gemm_efficiency
            if fp8 is not None:
                return fp8
        return self._curve16(op)

    def peak_bf16_flops(self) -> float:
        return self.peak_flops("bf16")
