"""Model, Cluster, Plan, Profile and Study specs: YAML in, validated frozen objects out.

Every unit is in the field name. Unknown keys, NaN/inf and negative sizes are errors. A
preset name or a path is accepted wherever a spec is (see `load_spec`). Errors are raised
as `SpecError` whose message is one line naming the file, the field path and the fix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from perfmodel.specs import yamlsafe
from perfmodel.specs.base import Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt, SpecError, Strict  # noqa: F401
from perfmodel.specs.cluster import ClusterSpec, IntraNodeSpec, NetworkSpec  # noqa: F401
from perfmodel.specs.model import MLASpec, ModelSpec, MoESpec  # noqa: F401
from perfmodel.specs.plan import (  # noqa: F401
    PARALLEL_DIMS,
    SCHEDULES,
    CompressionSpec,
    OverlapSpec,
    PipelineLayoutSpec,
    PlanSpec,
    check_precision,
)
from perfmodel.specs.profile import (  # noqa: F401
    CollectiveFit,
    EfficiencyCurve,
    FabricProfile,
    ProfileSpec,
    UncertaintySpec,
)
from perfmodel.specs.study import NamedPlan, SearchSpace, StudySpec, Variant  # noqa: F401

PRESET_DIR = Path(__file__).parent.parent / "presets"
PRESET_SUBDIR = {"model": "models", "cluster": "clusters", "profile": "gpus"}
KINDS = ("model", "cluster", "plan", "study", "profile", "published_run")


SPEC_CLASSES: dict[str, type[Strict]] = {
    "model": ModelSpec,
    "cluster": ClusterSpec,
    "plan": PlanSpec,
    "study": StudySpec,
    "profile": ProfileSpec,
}
# keys that only one kind has, used to infer the kind of a file that does not say it
_KIND_MARKERS = {
    "study": {"plans", "search", "variants", "baseline"},
    "cluster": {"nodes", "gpus_per_node", "network", "intra_node"},
    "profile": {"peak_tflops", "hbm_bw_GBps", "gemm_efficiency"},
    "model": {"layers", "hidden", "heads", "vocab"},
    "plan": {"tp", "sp", "ep", "etp", "pp", "micro_batch", "overlap", "compression", "schedule"},
    "published_run": {"measured", "system", "assumptions"},
}


def spec_class(kind: str) -> type[Strict]:
    """The class of a spec kind; a published run's lives in perfmodel.specs.published (it builds on these)."""
    if kind == "published_run":
        from perfmodel.specs.published import PublishedRun

        return PublishedRun
    return SPEC_CLASSES[kind]


def infer_kind(data: Any, where: str) -> str:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a YAML mapping, got {type(data).__name__}")
    kind = data.get("kind")
    if kind is not None:
        if kind not in KINDS:
            raise SpecError(f"{where}: kind: {kind!r} is not one of {', '.join(KINDS)}")
        return kind
    keys = set(data)
    for k, markers in _KIND_MARKERS.items():
        if keys & markers:
            return k
    raise SpecError(f"{where}: cannot tell what this is; add kind: {'|'.join(KINDS)}")


def _format_error(exc: ValidationError, where: str, kind: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-after"))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (typo?); remove it or see `moeperf validate --help`"
    field = f"{kind}.{loc}" if loc else kind
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: {field}: {msg}{more}"


def parse_spec(data: Any, kind: str | None, where: str) -> Strict:
    """Validate an already-loaded mapping as a spec of `kind` (inferred when None)."""
    found = infer_kind(data, where)
    if kind is not None and found != kind and "kind" in data:
        raise SpecError(f"{where}: is a {found} spec, expected a {kind}")
    kind = kind or found
    try:
        return spec_class(kind).model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_error(exc, where, kind)) from None
    except (TypeError, ValueError, RecursionError) as exc:  # pragma: no cover - defensive
        raise SpecError(f"{where}: {kind}: {exc}") from None


def preset_names(kind: str) -> list[str]:
    sub = PRESET_DIR / PRESET_SUBDIR[kind]
    return sorted(p.stem for p in sub.glob("*.yaml"))


def resolve_path(ref: str, kind: str) -> Path:
    """A preset name (`h100-sxm`) or a path to a YAML file."""
    if kind in PRESET_SUBDIR:
        preset = PRESET_DIR / PRESET_SUBDIR[kind] / f"{ref}.yaml"
        if preset.is_file():
            return preset
    p = Path(ref)
    if p.is_file():
        return p
    if "/" not in ref and not ref.endswith((".yaml", ".yml")) and kind in PRESET_SUBDIR:
        raise SpecError(f"{ref}: no {kind} preset of that name; `moeperf presets` lists them ({', '.join(preset_names(kind))})")
    raise SpecError(f"{ref}: no such file")


def load_spec(ref: str | Path | Strict, kind: str | None = None) -> Any:
    """Load a spec from a preset name, a path, or pass through an already-built spec."""
    if isinstance(ref, Strict):
        return ref
    path = resolve_path(str(ref), kind) if kind else Path(ref)
    try:
        data = yamlsafe.load_file(path)
    except yamlsafe.YamlError as exc:
        raise SpecError(str(exc)) from None
    return parse_spec(data, kind, str(path))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_overrides(spec: Strict, overrides: dict[str, Any], where: str) -> Any:
    """A copy of `spec` with deep-merged overrides, validated again."""
    if not overrides:
        return spec
    data = deep_merge(spec.model_dump(mode="python"), overrides)
    if getattr(spec, "kind", "") in KINDS and type(spec) is spec_class(spec.kind):  # type: ignore[attr-defined]
        return parse_spec(data, spec.kind, where)  # type: ignore[attr-defined]
    try:  # a subclass (NamedPlan) or a nested part: validate as its own class
        return type(spec).model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_error(exc, where, getattr(spec, "kind", type(spec).__name__))) from None


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
