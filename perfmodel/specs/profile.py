"""The hardware profile spec: peaks, efficiency curves, fabrics, calibration fits and error band."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from perfmodel.specs.base import Fraction, NonNegFloat, PosFloat, Strict


class EfficiencyCurve(Strict):
    """Achieved fraction of peak as a function of work: max * w / (w + half_work).

    `half_work` is in FLOPs for compute curves and bytes for memory/comm curves; it is the
    size at which the kernel reaches half its best efficiency.
    """

    max: Fraction
    half_work: NonNegFloat = 0.0

    def at(self, work: float) -> float:
        return self.max * work / (work + self.half_work) if work > 0 else self.max


class FabricProfile(Strict):
    latency_us: NonNegFloat
    efficiency: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0


class CollectiveFit(Strict):
    """A calibrated collective (alpha-beta): seconds = latency_us*1e-6 * latency steps + bytes_per_rank /
    (bw_GBps*1e9); latency steps = perfmodel.sim.collectives.latency_steps (n-1 per ring or peer exchange)."""

    latency_us: NonNegFloat
    bw_GBps: PosFloat


class UncertaintySpec(Strict):
    """How far a prediction of this profile is from a measured run (perfmodel/sim/uncertainty.py):
    the band is prediction x exp(-+w), w = z((1 + confidence) / 2) x loo_log_rms."""

    confidence: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 0.9  # two-sided coverage
    loo_log_rms: NonNegFloat  # RMS of out-of-sample residuals ln(predicted / measured tokens/s)
    # optional echo of w for readers of the YAML; checked against z x loo_log_rms, never used instead
    log_halfwidth: NonNegFloat | None = None
    n_runs: Annotated[int, Field(ge=2, le=10**9)]  # runs the residuals come from
    method: str = ""

    @model_validator(mode="after")
    def _check(self) -> UncertaintySpec:
        if self.log_halfwidth is not None:
            from perfmodel.sim.uncertainty import z_for  # lazy: uncertainty imports this module

            w = z_for(self.confidence) * self.loo_log_rms
            if abs(self.log_halfwidth - w) > 1e-3:
                raise ValueError(f"log_halfwidth={self.log_halfwidth:g} is not z x loo_log_rms = {w:.4f} at "
                                 f"confidence {self.confidence:g}; write {w:.4f} or leave it out (derived)")
        return self


class ProfileSpec(Strict):
    """A hardware profile: public datasheet peaks plus efficiency curves (presets) or fits (calibrated)."""

    kind: Literal["profile"] = "profile"
    name: str = "profile"
    source: str = ""
    peak_tflops: dict[Literal["fp32", "tf32", "bf16", "fp16", "fp8"], PosFloat]
    memory_GiB: PosFloat
    hbm_bw_GBps: PosFloat
    nvlink_bw_GBps: NonNegFloat = 0.0  # per GPU per direction
    gemm_efficiency: EfficiencyCurve
    grouped_gemm_efficiency: EfficiencyCurve | None = None
    # FP8 GEMMs (precision: fp8) against peak_tflops.fp8; absent: the 16-bit curves are used
    fp8_gemm_efficiency: EfficiencyCurve | None = None
    fp8_grouped_gemm_efficiency: EfficiencyCurve | None = None
    attention_efficiency: EfficiencyCurve
    memory_efficiency: EfficiencyCurve
    launch_overhead_us: NonNegFloat = 4.0
    # calibrated on GPU traces: host (CPU) time to issue one op-graph op. A GPU runs ahead of its
    # host, so an op takes max(device time, this), not their sum: small ops of a Python training
    # loop are host-bound, large ones are not. 0 on presets and on CPU profiles (ops run inline)
    host_us_per_op: NonNegFloat = 0.0
    # calibrated: host time per step outside every op span that does not grow with the op count
    # (data, zero_grad, the training loop); 0 on presets
    step_overhead_us: NonNegFloat = 0.0
    fabrics: dict[Literal["nvlink", "pcie", "ib", "ethernet", "loopback"], FabricProfile]
    comm_compute_slowdown: Annotated[float, Field(ge=0, le=5, allow_inf_nan=False)] = 0.0
    # ranks drift apart while they compute (OS noise, time-shared cores, clock jitter): the spread
    # of their arrival at a layer collective is this fraction of the compute each did since its
    # previous collective, and the collective first waits for the last of its n ranks
    # (perfmodel.sim.collectives.straggler_wait_s). Calibrated on gloo ranks sharing cores; 0 on presets
    sync_skew: Annotated[float, Field(ge=0, le=5, allow_inf_nan=False)] = 0.0
    # calibrated collectives: latency grows with the group as (n-1)^latency_exponent steps
    # (perfmodel.sim.collectives.latency_steps); 1 = rounds in series
    latency_exponent: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    # calibrated only: per collective, keyed "<collective>.<group kind>" (e.g. all_to_all.ep) or
    # "<collective>" (any group); the fabric's latency/efficiency apply where no key matches
    collectives: dict[str, CollectiveFit] = {}
    calibrated_from: list[str] = []
    residuals: dict[str, float] = {}
    # the error band of this profile's predictions (calibrated against measured runs); None: no band
    uncertainty: UncertaintySpec | None = None
