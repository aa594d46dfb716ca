"""Model, Cluster, Plan, Profile and Study specs: YAML in, validated frozen objects out.

Every unit is in the field name. Unknown keys, NaN/inf and negative sizes are errors. A
preset name or a path is accepted wherever a spec is (see `load_spec`). Errors are raised
as `SpecError` whose message is one line naming the file, the field path and the fix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from perfmodel import yamlsafe

PRESET_DIR = Path(__file__).parent / "presets"
PRESET_SUBDIR = {"model": "models", "cluster": "clusters", "profile": "gpus"}
KINDS = ("model", "cluster", "plan", "study", "profile", "published_run")


class SpecError(ValueError):
    """Bad user input. `str(err)` is the one line shown to the user (exit status 2)."""


PosInt = Annotated[int, Field(gt=0, le=10**9)]
NonNegInt = Annotated[int, Field(ge=0, le=10**9)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=False)


# ----------------------------------------------------------------------------- model
class MoESpec(Strict):
    experts: PosInt
    top_k: PosInt
    expert_ffn_hidden: PosInt
    shared_experts: NonNegInt = 0
    shared_expert_ffn_hidden: PosInt | None = None  # defaults to expert_ffn_hidden
    moe_layer_freq: PosInt = 1  # every k-th layer (after first_dense_layers) is MoE
    first_dense_layers: NonNegInt = 0
    routing_skew: Annotated[float, Field(ge=1, le=1000, allow_inf_nan=False)] = 1.0  # max/mean tokens per expert
    aux_loss_coeff: NonNegFloat = 0.01
    # group-limited routing (DeepSeek-V2 device-limited, V3 node-limited; HF n_group / topk_group): the
    # experts form `expert_groups` equal groups and a token's top_k experts come from its best
    # `groups_per_token` groups; None: no limit
    expert_groups: PosInt = 1
    groups_per_token: PosInt | None = None

    @model_validator(mode="after")
    def _check(self) -> MoESpec:
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        if self.experts % self.expert_groups:
            raise ValueError(f"expert_groups={self.expert_groups} does not divide experts={self.experts}")
        if self.groups_per_token is not None:
            if self.groups_per_token > self.expert_groups:
                raise ValueError(f"groups_per_token={self.groups_per_token} exceeds expert_groups={self.expert_groups}")
            if self.groups_per_token * (self.experts // self.expert_groups) < self.top_k:
                raise ValueError(f"groups_per_token={self.groups_per_token} groups of "
                                 f"{self.experts // self.expert_groups} experts hold fewer than top_k={self.top_k}")
        return self


class MLASpec(Strict):
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank q and kv projections."""

    q_lora_rank: PosInt
    kv_lora_rank: PosInt
    qk_nope_head_dim: PosInt
    qk_rope_head_dim: PosInt
    v_head_dim: PosInt


class ModelSpec(Strict):
    kind: Literal["model"] = "model"
    name: str = "model"
    source: str = ""
    layers: PosInt
    hidden: PosInt
    heads: PosInt
    kv_heads: PosInt
    head_dim: PosInt
    vocab: PosInt
    seq_len: PosInt
    dense_ffn_hidden: PosInt | None = None  # FFN of non-MoE layers
    moe: MoESpec | None = None
    mla: MLASpec | None = None
    tie_embeddings: bool = False
    # True: gated FFNs (SwiGLU: gate, up, down); False: two-matrix FFNs (up, down: Nemotron-4's
    # squared ReLU, GPT's GeLU). Applies to dense, shared and routed-expert FFNs alike
    gated_ffn: bool = True

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads={self.kv_heads} does not divide heads={self.heads}")
        if self.moe is None and self.dense_ffn_hidden is None:
            raise ValueError("a model needs moe: or dense_ffn_hidden:")
        if self.n_dense_layers and self.dense_ffn_hidden is None:
            raise ValueError("dense layers exist (first_dense_layers/moe_layer_freq) but dense_ffn_hidden is missing")
        if self.moe and self.moe.first_dense_layers > self.layers:
            raise ValueError(f"moe.first_dense_layers={self.moe.first_dense_layers} exceeds layers={self.layers}")
        return self

    # --- structure -----------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        if self.moe is None or i < self.moe.first_dense_layers:
            return False
        return (i - self.moe.first_dense_layers) % self.moe.moe_layer_freq == 0

    @property
    def n_moe_layers(self) -> int:
        # closed form of sum(is_moe_layer(i) for i in range(layers)): layers may be huge in bad input
        if self.moe is None:
            return 0
        after = max(0, self.layers - self.moe.first_dense_layers)
        return -(-after // self.moe.moe_layer_freq)

    @property
    def n_dense_layers(self) -> int:
        return self.layers - self.n_moe_layers

    # --- widths --------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        """Width of the attention's query/output (heads x the dim the output projection reads)."""
        return self.heads * (self.mla.v_head_dim if self.mla else self.head_dim)

    @property
    def qk_head_dim(self) -> int:
        return self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim if self.mla else self.head_dim

    @property
    def v_head_dim(self) -> int:
        return self.mla.v_head_dim if self.mla else self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def shared_ffn_hidden(self) -> int:
        if not self.moe or not self.moe.shared_experts:
            return 0
        return self.moe.shared_experts * (self.moe.shared_expert_ffn_hidden or self.moe.expert_ffn_hidden)

    @property
    def ffn_matrices(self) -> int:
        """Weight matrices of one FFN of width f (each h x f): 3 gated (gate, up, down), 2 otherwise."""
        return 3 if self.gated_ffn else 2

    # --- parameter counts ----------------------------------------------------------
    @property
    def attn_in_params(self) -> int:
        """Parameters of the projections that produce q, k, v (before the core)."""
        h = self.hidden
        if self.mla:
            m = self.mla
            q = h * m.q_lora_rank + m.q_lora_rank * self.heads * self.qk_head_dim
            kv = h * (m.kv_lora_rank + m.qk_rope_head_dim)
            kv += m.kv_lora_rank * self.heads * (m.qk_nope_head_dim + m.v_head_dim)
            return q + kv
        return h * (self.heads * self.head_dim + 2 * self.kv_dim)

    @property
    def attn_out_params(self) -> int:
        return self.q_dim * self.hidden

    @property
    def attn_params(self) -> int:
        return self.attn_in_params + self.attn_out_params + self.hidden  # + norm

    @property
    def expert_params(self) -> int:
        """One routed expert (SwiGLU: gate, up, down; non-gated: up, down)."""
        return self.ffn_matrices * self.hidden * self.moe.expert_ffn_hidden if self.moe else 0

    @property
    def moe_layer_params(self) -> int:
        assert self.moe
        router = self.hidden * self.moe.experts
        shared = self.ffn_matrices * self.hidden * self.shared_ffn_hidden
        return self.attn_params + self.hidden + router + shared + self.moe.experts * self.expert_params

    @property
    def dense_layer_params(self) -> int:
        return self.attn_params + self.hidden + self.ffn_matrices * self.hidden * (self.dense_ffn_hidden or 0)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2) + self.hidden  # + final norm

    @property
    def params_total(self) -> int:
        moe = self.n_moe_layers * self.moe_layer_params if self.moe else 0
        return moe + self.n_dense_layers * self.dense_layer_params + self.embedding_params

    @property
    def params_active(self) -> int:
        """Parameters touched by one token (routed experts counted top_k times)."""
        if not self.moe:
            return self.params_total
        inactive = (self.moe.experts - self.moe.top_k) * self.expert_params
        return self.params_total - self.n_moe_layers * inactive


# ---------------------------------------------------------------------------- profile
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
    (bw_GBps*1e9); latency steps = perfmodel.collectives.latency_steps (n-1 per ring or peer exchange)."""

    latency_us: NonNegFloat
    bw_GBps: PosFloat


class UncertaintySpec(Strict):
    """How far a prediction of this profile is from a measured run (perfmodel/uncertainty.py):
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
            from perfmodel.uncertainty import z_for  # lazy: uncertainty imports this module

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
    # (perfmodel.collectives.straggler_wait_s). Calibrated on gloo ranks sharing cores; 0 on presets
    sync_skew: Annotated[float, Field(ge=0, le=5, allow_inf_nan=False)] = 0.0
    # calibrated collectives: latency grows with the group as (n-1)^latency_exponent steps
    # (perfmodel.collectives.latency_steps); 1 = rounds in series
    latency_exponent: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    # calibrated only: per collective, keyed "<collective>.<group kind>" (e.g. all_to_all.ep) or
    # "<collective>" (any group); the fabric's latency/efficiency apply where no key matches
    collectives: dict[str, CollectiveFit] = {}
    calibrated_from: list[str] = []
    residuals: dict[str, float] = {}
    # the error band of this profile's predictions (calibrated against measured runs); None: no band
    uncertainty: UncertaintySpec | None = None


# ---------------------------------------------------------------------------- cluster
class IntraNodeSpec(Strict):
    fabric: Literal["nvswitch", "nvlink", "pcie", "loopback"] = "nvswitch"
    bw_GBps: PosFloat | None = None  # per GPU per direction; default: the GPU profile's nvlink_bw_GBps
    domain_gpus: PosInt | None = None  # GPUs sharing one NVLink domain (NVL72: 72); default gpus_per_node


class NetworkSpec(Strict):
    nics_per_node: PosInt = 8
    nic_Gbps: PosFloat = 400.0
    rails: bool = True  # rail-optimized: NIC i of every node on the same leaf group
    tiers: Annotated[int, Field(ge=1, le=3)] = 2
    oversubscription: Annotated[float, Field(ge=1, le=64, allow_inf_nan=False)] = 1.0
    leaf_ports: PosInt = 64  # downlinks per leaf switch


class ClusterSpec(Strict):
    kind: Literal["cluster"] = "cluster"
    name: str = "cluster"
    source: str = ""
    gpu: str | ProfileSpec  # preset name, path, or inline profile
    nodes: PosInt
    gpus_per_node: PosInt
    intra_node: IntraNodeSpec = IntraNodeSpec()
    network: NetworkSpec = NetworkSpec()

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def profile(self) -> ProfileSpec:
        return self.gpu if isinstance(self.gpu, ProfileSpec) else load_spec(self.gpu, "profile")


# ------------------------------------------------------------------------------- plan
class OverlapSpec(Strict):
    inter_op: bool = False  # reorder independent ops so comm hides under compute; dgrad/wgrad split
    intra_op: Literal["none", "chunk", "tile"] = "none"
    chunks: Annotated[int, Field(ge=1, le=256)] = 4  # token chunks (chunk) or tiles in flight (tile)
    grad_sync: bool = True  # DP gradient sync overlapped with backward


class CompressionSpec(Strict):
    dispatch: Literal["bf16", "fp8"] = "bf16"
    combine: Literal["bf16", "fp8"] = "bf16"
    grad_sync: Literal["fp32", "bf16"] = "fp32"


PARALLEL_DIMS = ("tp", "sp", "dp", "pp")
SCHEDULES = ("1f1b", "interleaved", "zero-bubble", "dualpipev")


class PipelineLayoutSpec(Strict):
    """Layers per virtual pipeline stage (perfmodel/pplayout.py resolves and checks it).

    `stages`: decoder layers of each virtual stage in pipeline order (pp*vpp entries); omitted:
    the default split, where the two flags count the embedding / the loss as one layer's worth of
    work on the first / last stage (Megatron-Core's account_for_*_in_pipeline_split). A plan may
    also give a Megatron-Core `--pipeline-model-parallel-layout` string or a plain list of counts.
    """

    stages: tuple[NonNegInt, ...] | None = None
    account_for_embedding: bool = False
    account_for_loss: bool = False


class PlanSpec(Strict):
    kind: Literal["plan"] = "plan"
    name: str = "plan"
    tp: PosInt = 1
    sp: PosInt = 1
    ep: PosInt = 1
    etp: PosInt = 1
    pp: PosInt = 1
    vpp: PosInt = 1
    dp: PosInt | None = None  # derived from the world size if omitted
    micro_batch: PosInt = 1  # sequences per micro-batch per data-parallel replica
    global_batch: PosInt = 8  # sequences per iteration
    # 1f1b (vpp=1), interleaved (vpp>1), zero-bubble (ZB-V) and dualpipev: V-shape, vpp=2
    schedule: Literal["1f1b", "interleaved", "zero-bubble", "dualpipev"] = "1f1b"
    pp_layout: PipelineLayoutSpec | None = None  # default: even split, else balanced (pplayout.py)
    # fp8: the linear layers of attention, experts and dense FFNs run FP8 GEMMs (fwd, dgrad, wgrad)
    precision: Literal["bf16", "fp8"] = "bf16"
    # token dispatcher of expert parallelism: alltoall sends every (token, expert) copy to its GPU
    # (Megatron-Core's alltoall dispatcher); deepep sends a token once per destination node over the
    # network, to the GPU of the same local index, which forwards it over NVLink (DeepEP, DeepSeek-V3
    # s.3.2.2; Megatron-Core's flex dispatcher); simulator only
    dispatcher: Literal["alltoall", "deepep"] = "alltoall"
    # tensorwise: per-tensor current scaling (Transformer Engine's default); blockwise: DeepSeek-V3's
    # 1x128 activation tiles and 128x128 weight blocks
    fp8_recipe: Literal["tensorwise", "blockwise"] = "tensorwise"
    recompute: Literal["none", "selective", "full"] = "none"
    overlap: OverlapSpec = OverlapSpec()
    compression: CompressionSpec = CompressionSpec()
    distributed_optimizer: bool = True
    # innermost first: Megatron's order puts tp (then sp) on neighbouring ranks of one node
    rank_order: tuple[Literal["tp", "sp", "dp", "pp"], ...] = ("tp", "sp", "dp", "pp")
    kernels: Literal["torch", "triton"] = "torch"  # runtime only

    @model_validator(mode="after")
    def _check(self) -> PlanSpec:
        if sorted(self.rank_order) != sorted(PARALLEL_DIMS):
            raise ValueError(f"rank_order must be a permutation of {list(PARALLEL_DIMS)}")
        if self.schedule == "1f1b" and self.vpp != 1:
            raise ValueError(f"vpp={self.vpp} needs schedule: interleaved (1f1b runs one stage per rank)")
        if self.schedule == "interleaved" and self.vpp == 1 and self.pp > 1:
            raise ValueError("schedule: interleaved needs vpp>1 (virtual stages per rank); use 1f1b for vpp=1")
        if self.schedule in ("zero-bubble", "dualpipev") and self.vpp != 2:
            raise ValueError(f"schedule: {self.schedule} is a V-shape schedule and needs vpp=2 (two stages per "
                             f"rank), got vpp={self.vpp}")
        return self

    @field_validator("pp_layout", mode="before")
    @classmethod
    def _layout(cls, v: Any) -> Any:
        if isinstance(v, str):
            from perfmodel.pplayout import parse_megatron

            return parse_megatron(v)
        if isinstance(v, (list, tuple)):
            return {"stages": v}
        return v


# ------------------------------------------------------------------------------ study
class SearchSpace(Strict):
    """Candidate values per plan field; every combination is a candidate plan."""

    tp: list[PosInt] = [1]
    sp: list[PosInt] = [1]
    ep: list[PosInt] = [1]
    etp: list[PosInt] = [1]
    pp: list[PosInt] = [1]
    vpp: list[PosInt] = [1]
    micro_batch: list[PosInt] = [1]
    recompute: list[Literal["none", "selective", "full"]] = ["none"]
    inter_op: list[bool] = [False]
    intra_op: list[Literal["none", "chunk", "tile"]] = ["none"]
    chunks: list[Annotated[int, Field(ge=1, le=256)]] = [4]
    dispatch: list[Literal["bf16", "fp8"]] = ["bf16"]
    combine: list[Literal["bf16", "fp8"]] = ["bf16"]
    grad_sync: list[Literal["fp32", "bf16"]] = ["fp32"]
    distributed_optimizer: list[bool] = [True]
    rank_order: list[tuple[Literal["tp", "sp", "dp", "pp"], ...]] = [("tp", "sp", "dp", "pp")]
    # a schedule is a candidate only with a vpp it fits: 1f1b vpp=1, interleaved vpp>1, the V-shape
    # schedules (zero-bubble, dualpipev) vpp=2; other pairings are dropped as no-effect duplicates
    schedule: list[Literal["1f1b", "interleaved", "zero-bubble", "dualpipev"]] = ["1f1b", "interleaved"]
    precision: list[Literal["bf16", "fp8"]] = ["bf16"]
    fp8_recipe: list[Literal["tensorwise", "blockwise"]] = ["tensorwise"]  # only with precision fp8
    dispatcher: list[Literal["alltoall", "deepep"]] = ["alltoall"]  # only with ep > 1


class NamedPlan(PlanSpec):
    calibrate: bool = False  # compare: fit the profile on this plan's traces


class Variant(Strict):
    """A what-if: deep-merged overrides of the study's cluster (and/or model)."""

    name: str
    cluster: dict[str, Any] = {}
    model: dict[str, Any] = {}


class StudySpec(Strict):
    kind: Literal["study"] = "study"
    name: str = "study"
    description: str = ""
    model: str | ModelSpec
    cluster: str | ClusterSpec
    profile: str | ProfileSpec | None = None  # default: the cluster's GPU preset
    global_batch: PosInt | None = None  # overrides every plan's global_batch
    baseline: str | None = None  # name of a fixed plan
    plans: list[NamedPlan] = []
    search: SearchSpace | None = None
    variants: list[Variant] = []
    reference: dict[str, float] = {}  # published figures, e.g. tokens_per_s.<plan>, speedup
    world_size: PosInt | None = None  # runtime studies: ranks to launch (default the cluster's)

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        names = [p.name for p in self.plans]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"plan names must be unique, repeated: {sorted(dup)}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the plans {names}")
        if not self.plans and self.search is None:
            raise ValueError("a study needs plans: or search:")
        return self


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
    """The class of a spec kind; a published run's lives in perfmodel.published (it builds on these)."""
    if kind == "published_run":
        from perfmodel.published import PublishedRun

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


def check_precision(plan: PlanSpec, profile: ProfileSpec) -> None:
    """An FP8 plan needs a profile with an fp8 peak (SpecError naming the field otherwise)."""
    if plan.precision == "fp8" and "fp8" not in profile.peak_tflops:
        raise SpecError(f"plan.precision: fp8 needs an fp8 peak, but profile {profile.name} has no "
                        f"peak_tflops.fp8; add it or use precision: bf16")


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
