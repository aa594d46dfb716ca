"""`moeperf validate FILE...` and `moeperf presets`.

validate: each file is loaded with the safe YAML loader, its kind taken from `kind:` (or
`--kind`, or inferred from its keys) and validated. A cluster's GPU reference is loaded; a
study's model, cluster and profile references are loaded, its variants re-validated and
every fixed plan laid out on the model and the cluster's world size. The first bad file
stops the run with a SpecError naming the file and the field (the CLI: one line, exit 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perfmodel import yamlsafe
from perfmodel.argparse_util import parser
from perfmodel.layout import plan_layout
from perfmodel.specs import (
    KINDS,
    PRESET_SUBDIR,
    ClusterSpec,
    ModelSpec,
    ProfileSpec,
    SpecError,
    Strict,
    StudySpec,
    check_precision,
    load_spec,
    parse_spec,
    preset_names,
    with_overrides,
)


def one_line(msg: str) -> str:
    """Collapse a message to one line (keys from a hostile file may hold newlines)."""
    return " ".join(str(msg).split())


@dataclass(frozen=True)
class StudyParts:
    model: ModelSpec
    cluster: ClusterSpec
    profile: ProfileSpec
    world: int


def load_ref(ref: Any, kind: str, where: str, field: str, base: Path | None = None) -> Any:
    """Load a nested reference (preset name, path, or inline spec); errors name `where` and `field`.

    A relative path is tried as given (from the working directory) and then relative to
    `base`, the folder of the file that refers to it.
    """
    if isinstance(ref, Strict):
        return ref
    try:
        try:
            return load_spec(ref, kind)
        except SpecError:
            alt = base / str(ref) if base is not None else None
            if alt is None or Path(str(ref)).is_absolute() or not alt.is_file():
                raise
            return load_spec(alt, kind)
    except SpecError as exc:
        raise SpecError(one_line(f"{where}: {field}: {exc}")) from None


def cluster_profile(cluster: ClusterSpec, where: str, base: Path | None = None) -> ProfileSpec:
    return load_ref(cluster.gpu, "profile", where, "cluster.gpu", base)


def check_study(study: StudySpec, where: str, base: Path | None = None) -> StudyParts:
    """Load a study's references and lay out every fixed plan; raise SpecError on the first problem."""
    model = load_ref(study.model, "model", where, "study.model", base)
    cluster = load_ref(study.cluster, "cluster", where, "study.cluster", base)
    if study.profile is not None:
        profile = load_ref(study.profile, "profile", where, "study.profile", base)
    else:
        profile = cluster_profile(cluster, where, base)
    world = study.world_size or cluster.world_size
    for i, plan in enumerate(study.plans):
        label = f"study.plans[{i}] ({plan.name})"
        if study.global_batch is not None and plan.global_batch != study.global_batch:
            plan = with_overrides(plan, {"global_batch": study.global_batch}, f"{where}: {label}")
        try:
            plan_layout(plan, model, world)
            check_precision(plan, profile)
        except SpecError as exc:
            raise SpecError(one_line(f"{where}: {label}: {exc}")) from None
    for i, var in enumerate(study.variants):
        label = f"{where}: study.variants[{i}] ({var.name})"
        if var.model:
            with_overrides(model, var.model, label)
        if var.cluster:
            vc = with_overrides(cluster, var.cluster, label)
            if "gpu" in var.cluster:
                cluster_profile(vc, label, base)
    return StudyParts(model=model, cluster=cluster, profile=profile, world=world)


def validate_file(path: str, kind: str | None = None) -> Strict:
    """Load and fully check one spec file; return the spec or raise SpecError (one line)."""
    try:
        return _validate_file(path, kind)
    except SpecError as exc:
        raise SpecError(one_line(str(exc))) from None


def _validate_file(path: str, kind: str | None) -> Strict:
    p = Path(path)
    if p.is_dir():
        raise SpecError(f"{path}: is a directory; pass the YAML files in it (e.g. {path.rstrip('/')}/*.yaml)")
    try:
        data = yamlsafe.load_file(p)
    except yamlsafe.YamlError as exc:
        raise SpecError(str(exc)) from None
    if data is None:
        raise SpecError(f"{path}: empty file, expected a YAML mapping")
    spec = parse_spec(data, kind, path)
    if isinstance(spec, ClusterSpec):
        cluster_profile(spec, path, p.parent)
    elif isinstance(spec, StudySpec):
        check_study(spec, path, p.parent)
    elif spec.kind == "published_run":  # type: ignore[attr-defined]
        from perfmodel.published import measured_tokens_per_s

        measured_tokens_per_s(spec, p.parent)  # type: ignore[arg-type]  # resolves model, cluster, plan
    return spec


def main_validate(argv: list[str]) -> int:
    ap = parser("validate", "Check spec YAML files (model, cluster, plan, study, profile, published_run). "
                "Exit 0 when all are valid, 2 with one line naming the file and field otherwise.")
    ap.add_argument("files", nargs="+", metavar="FILE", help="YAML spec files (shell globs are expanded by the shell)")
    ap.add_argument("--kind", choices=KINDS, help="expect this kind (default: the file's kind: or inferred from keys)")
    ap.add_argument("--json", action="store_true", help="print a JSON list of {file, kind, name}")
    args = ap.parse_args(argv)
    results = []
    for f in args.files:
        spec = validate_file(f, args.kind)
        name = getattr(spec, "name", "")
        results.append({"file": f, "kind": spec.kind, "name": name})  # type: ignore[attr-defined]
        if not args.json:
            print(f"ok {f} ({spec.kind} {name})", flush=True)  # type: ignore[attr-defined]
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


# ---------------------------------------------------------------------------- presets
def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def preset_summary(kind: str, spec: Any) -> dict[str, Any]:
    """A preset's name, one-line summary and the key numbers behind it."""
    out: dict[str, Any] = {"name": spec.name, "source": spec.source}
    if kind == "model":
        out.update(params_total=spec.params_total, params_active=spec.params_active,
                   summary=f"{_count(spec.params_total)} params, {_count(spec.params_active)} active, "
                           f"{spec.layers} layers" + (f", {spec.moe.experts} experts top-{spec.moe.top_k}"
                                                      if spec.moe else ""))
    elif kind == "cluster":
        gpu = spec.gpu if isinstance(spec.gpu, str) else spec.gpu.name
        out.update(gpus=spec.world_size, gpu=gpu,
                   summary=f"{spec.world_size} GPUs ({spec.nodes} x {spec.gpus_per_node} {gpu}), "
                           f"{spec.network.nics_per_node} x {spec.network.nic_Gbps:g} Gb/s NICs per node")
    else:
        bf16 = spec.peak_tflops.get("bf16")
        out.update(bf16_tflops=bf16, memory_GiB=spec.memory_GiB,
                   summary=f"{bf16:g} TFLOP/s bf16, {spec.memory_GiB:g} GiB, {spec.hbm_bw_GBps:g} GB/s HBM"
                   if bf16 else f"{spec.memory_GiB:g} GiB, {spec.hbm_bw_GBps:g} GB/s")
    return out


def main_presets(argv: list[str]) -> int:
    ap = parser("presets", "List the built-in presets (models, clusters, GPU profiles).")
    ap.add_argument("--kind", choices=sorted(PRESET_SUBDIR), help="list only this kind")
    ap.add_argument("--json", action="store_true", help="print {kind: [{name, summary, ...}]} as JSON")
    args = ap.parse_args(argv)
    kinds = [args.kind] if args.kind else ["model", "cluster", "profile"]
    table = {k: [preset_summary(k, load_spec(n, k)) for n in preset_names(k)] for k in kinds}
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    for k in kinds:
        print(f"{k}s:")
        for row in table[k]:
            print(f"  {row['name']:<22} {row['summary']}")
    return 0
