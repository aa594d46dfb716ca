"""A published training run: where it was published, what ran, and the figure it measured.

One YAML per run (studies/published/*.yaml, `kind: published_run`): the source (paper and table,
URL, and `group`, the id of the independent source), the model, cluster and plan exactly as
published (assumptions listed where the source is silent), the precision, the training stack,
and exactly one measured figure: tokens/s, step time, MFU or TFLOP/s per GPU (with the FLOP
convention the source counted by, perfmodel.flops), or GPU-hours per trillion tokens.
`measured_tokens_per_s` turns each into the cluster's training tokens per second, the one unit
calibration compares against the simulator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from perfmodel import yamlsafe
from perfmodel.flops import FlopConvention, flops_per_token
from perfmodel.specs import (
    ClusterSpec,
    ModelSpec,
    PlanSpec,
    PosFloat,
    SpecError,
    Strict,
    check_precision,
    parse_spec,
    with_overrides,
)

MEASURED_KINDS = ("tokens_per_s", "step_time_s", "mfu", "tflops_per_gpu", "gpu_hours_per_trillion_tokens")


class Source(Strict):
    title: str
    url: str
    where: str  # table / section / page of the figure
    group: str  # id of the independent source (runs of one group share authors, stack and cluster)


class Measured(Strict):
    """Exactly one figure; MFU and TFLOP/s carry the FLOP count they were computed with."""

    tokens_per_s: PosFloat | None = None  # training tokens per second, whole cluster
    step_time_s: PosFloat | None = None  # seconds per iteration of plan.global_batch sequences
    mfu: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    tflops_per_gpu: PosFloat | None = None  # achieved model TFLOP/s per GPU
    gpu_hours_per_trillion_tokens: PosFloat | None = None
    flop_convention: FlopConvention | None = None  # with mfu / tflops_per_gpu
    peak_tflops: PosFloat | None = None  # with mfu: the per-GPU peak the source divided by

    @model_validator(mode="after")
    def _check(self) -> Measured:
        given = [k for k in MEASURED_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(MEASURED_KINDS)} (got {given or 'none'})")
        flops = given[0] in ("mfu", "tflops_per_gpu")
        if flops and self.flop_convention is None:
            raise ValueError(f"{given[0]} needs flop_convention: the FLOP count the source used "
                             f"(megatron-lm, palm or 6n-active; see perfmodel/flops.py)")
        if not flops and self.flop_convention is not None:
            raise ValueError(f"flop_convention applies to mfu/tflops_per_gpu only, not {given[0]}; remove it")
        if (given[0] == "mfu") != (self.peak_tflops is not None):
            raise ValueError("peak_tflops (the per-GPU peak the source divided by) goes with mfu, and only with it")
        return self

    @property
    def figure(self) -> str:
        """Which figure was published (one of MEASURED_KINDS)."""
        return next(k for k in MEASURED_KINDS if getattr(self, k) is not None)


class PublishedRun(Strict):
    kind: Literal["published_run"] = "published_run"
    name: str
    source: Source
    model: str | ModelSpec  # preset name, path, or inline
    model_overrides: dict[str, Any] = {}  # deep-merged into the model (e.g. the run's seq_len)
    cluster: str | ClusterSpec
    cluster_overrides: dict[str, Any] = {}  # deep-merged into the cluster (e.g. nodes)
    plan: PlanSpec  # incl. global_batch (sequences per iteration)
    precision: Literal["bf16", "fp8"]
    system: str  # training stack: megascale-moe, megatron-lm, megatron-core, deepseek-hai-llm, meta, ...
    measured: Measured
    assumptions: list[str] = []  # every choice the source does not state

    @model_validator(mode="after")
    def _check(self) -> PublishedRun:
        if self.precision != self.plan.precision:
            raise ValueError(f"precision {self.precision!r} differs from plan.precision {self.plan.precision!r}; "
                             f"set plan.precision: {self.precision}")
        return self


def parse_published(data: Any, where: str) -> PublishedRun:
    return parse_spec(data, "published_run", where)  # type: ignore[return-value]


def load_published(folder: str | Path) -> list[PublishedRun]:
    """Every published run in `folder` (*.yaml), sorted by name; SpecError naming the file and field."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SpecError(f"{folder}: no such directory of published runs")
    runs: list[PublishedRun] = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            data = yamlsafe.load_file(path)
        except yamlsafe.YamlError as exc:
            raise SpecError(str(exc)) from None
        runs.append(parse_published(data, str(path)))
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"{folder}: published_run.name: repeated {dup}; names must be unique")
    return sorted(runs, key=lambda r: r.name)


def resolve(run: PublishedRun, base: Path | None = None) -> tuple[ModelSpec, ClusterSpec, PlanSpec]:
    """The run's model, cluster and plan; SpecError when the plan cannot be laid out on the cluster."""
    from perfmodel.layout import plan_layout
    from perfmodel.validate import cluster_profile, load_ref

    where = f"published_run {run.name}"
    model = with_overrides(load_ref(run.model, "model", where, "model", base), run.model_overrides,
                           f"{where}: model_overrides")
    cluster = with_overrides(load_ref(run.cluster, "cluster", where, "cluster", base), run.cluster_overrides,
                             f"{where}: cluster_overrides")
    try:
        plan_layout(run.plan, model, cluster.world_size)
        check_precision(run.plan, cluster_profile(cluster, where, base))
    except SpecError as exc:
        raise SpecError(" ".join(f"{where}: {exc}".split())) from None
    return model, cluster, run.plan


def measured_tokens_per_s(run: PublishedRun, base: Path | None = None) -> float:
    """The published figure as training tokens per second of the whole cluster."""
    m = run.measured
    if m.tokens_per_s is not None:
        return m.tokens_per_s
    model, cluster, plan = resolve(run, base)
    gpus = cluster.world_size
    if m.step_time_s is not None:
        return plan.global_batch * model.seq_len / m.step_time_s
    if m.gpu_hours_per_trillion_tokens is not None:
        return 1e12 / (m.gpu_hours_per_trillion_tokens * 3600.0 / gpus)
    assert m.flop_convention is not None
    tflops = m.tflops_per_gpu if m.tflops_per_gpu is not None else m.mfu * m.peak_tflops  # type: ignore[operator]
    return tflops * 1e12 * gpus / flops_per_token(model, m.flop_convention)
