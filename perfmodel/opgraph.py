"""The one MoE-layer op graph for (model, plan): what every rank computes and communicates.

Per micro-batch and per representative rank (all ranks of a stage are symmetric; routing
imbalance is a skew factor on the hottest rank). Every op is named from `opnames.OP_NAMES`
and carries its kind, FLOPs, HBM bytes, and for collectives the group and payload.

Token counts per rank (b = micro_batch, s = seq_len):
  t_seq  = b*s/(tp*sp)  tokens held in sequence-sharded regions (norms, router, MoE input)
  t_attn = b*s/sp       tokens in the attention GEMMs (after the TP all-gather)
  t_exp  = t_seq*top_k*etp*skew  expert rows on the hottest rank (after dispatch + ETP gather)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from perfmodel.layout import Layout, plan_layout
from perfmodel.opnames import OP_NAMES
from perfmodel.specs import ModelSpec, PlanSpec

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int64": 8}
ACT = "bf16"  # activations and weights are bf16 in every plan (mixed precision)
FP8_SCALE_BYTES_PER_TOKEN = 4  # one fp32 scale per token (per-token e4m3 quantization)
FP8_BLOCK = 128  # blockwise recipe: 1x128 activation tiles, 128x128 weight blocks (DeepSeek-V3)
# precision: fp8 runs these GEMMs in FP8 (fwd, dgrad, wgrad), as Transformer Engine does; the attention
# core, router, embedding and output head stay 16-bit. Each gets a `<gemm>_quant` op before it.
FP8_GEMMS = ("attn.qkv", "attn.proj", "moe.fc1", "moe.fc2", "moe.shared", "ffn.fc1", "ffn.fc2")


def fp8_cast_bytes(rows: float, cols: float, recipe: str) -> float:
    """HBM bytes to cast a 16-bit [rows, cols] tensor to FP8 plus the transposed FP8 copy the other
    backward GEMM reads (Transformer Engine's cast-transpose). Tensorwise (current scaling) first
    reads the tensor for its amax, then reads it again to cast; blockwise computes each 1x128
    tile's scale in the pass that casts it and writes one fp32 scale per tile (and per transposed tile)."""
    n = rows * cols
    if recipe == "blockwise":
        return n * (BYTES[ACT] + 2 * (1 + BYTES["fp32"] / FP8_BLOCK))
    return n * (2 * BYTES[ACT] + 2)


@dataclass(frozen=True)
class Op:
    name: str  # from OP_NAMES
    phase: str  # fwd | dgrad | wgrad | recompute
    kind: str  # gemm | attention | memory | comm
    flops: float = 0.0
    bytes: float = 0.0  # HBM bytes for compute ops; payload (local buffer) bytes for comm ops
    dtype: str = ACT  # compute dtype, or wire dtype for comm
    deps: tuple[str, ...] = ()  # events (name/phase) of the same layer this op waits for
    shape: tuple[int, int, int, int] | None = None  # GEMM (groups, m, n, k)
    collective: str | None = None
    group: str | None = None  # a group kind of layout.rank_groups
    group_size: int = 1
    imbalance: float = 1.0  # comm: hottest rank's traffic / mean (routing skew); `bytes` is the mean rank's
    branch: str = "main"  # ops on another branch may run concurrently with "main"
    # comm: payload of the backward collective (gradients, bf16); FP8 casts: bytes of the gradient's cast
    bwd_bytes: float | None = None
    # comm, deepep dispatcher: (top_k, expert_groups, groups_per_token or 0) — the collective sends a
    # token once per destination node (collectives.expand); None: every (token, expert) copy
    routing: tuple[int, int, int] | None = None

    @property
    def event(self) -> str:
        return f"{self.name}/{self.phase}"

    @property
    def bytes_per_rank(self) -> float:
        """Algorithm-independent bytes this rank must send for a collective."""
        n = self.group_size
        if self.kind != "comm" or n <= 1 and self.collective != "send_recv":
            return 0.0
        frac = {"all_to_all": (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
                "all_reduce": 2 * (n - 1) / n, "send_recv": 1.0}[self.collective or ""]
        return self.bytes * frac


@dataclass
class _Builder:
    """Accumulates forward ops as a DAG; backward and recompute are derived from it."""

    fwd: list[Op] = field(default_factory=list)

    def add(self, op: Op, after: tuple[str, ...] | None = None) -> str:
        assert op.name in OP_NAMES, op.name
        deps = after if after is not None else ((self.fwd[-1].event,) if self.fwd else ())
        self.fwd.append(Op(**{**op.__dict__, "deps": deps}))
        return op.event


def gemm(name: str, m: float, n: float, k: float, groups: int = 1, dtype: str = ACT) -> Op:
    flops = 2.0 * m * n * k
    b = BYTES[dtype]
    hbm = b * (m * k + groups * k * n + m * n)
    return Op(name, "fwd", "gemm", flops=flops, bytes=hbm, dtype=dtype,
              shape=(groups, int(m), int(n), int(k)))


def mem(name: str, nbytes: float) -> Op:
    return Op(name, "fwd", "memory", bytes=nbytes)


def comm(name: str, collective: str, group: str, size: int, payload: float, dtype: str = ACT,
         imbalance: float = 1.0, bwd_bytes: float | None = None, routing: tuple[int, int, int] | None = None) -> Op:
    return Op(name, "fwd", "comm", bytes=payload, dtype=dtype, collective=collective, group=group,
              group_size=size, imbalance=imbalance, bwd_bytes=payload if bwd_bytes is None else bwd_bytes,
              routing=routing)


_REVERSE = {"all_to_all": "all_to_all", "all_gather": "reduce_scatter", "reduce_scatter": "all_gather",
            "all_reduce": "all_reduce", "send_recv": "send_recv"}
# ops whose outputs selective recomputation drops and regenerates in backward (cheap to redo)
QUANT_OPS = {"moe.dispatch_quant", "moe.dispatch_dequant", "moe.combine_quant", "moe.combine_dequant"}
# forward-only ops: nothing flows back through them (quantization; the token-count exchange)
NO_GRAD = QUANT_OPS | {"moe.dispatch_counts"}
SELECTIVE = {"attn.norm", "moe.norm", "ffn.norm", "moe.act", "ffn.act", "moe.permute", "attn.tp_ag",
             "ffn.tp_ag", "moe.etp_ag"}


def _backward(fwd: list[Op], recompute: str) -> list[Op]:
    """dgrad of op X waits for the dgrad of every consumer of X; wgrad of X waits for the same."""
    consumers: dict[str, list[str]] = {op.event: [] for op in fwd}
    for op in fwd:
        for d in op.deps:
            consumers[d].append(op.event)
    out: list[Op] = []
    redo = [op for op in fwd if recompute == "full" or (recompute == "selective" and op.name in SELECTIVE)]
    prev = None
    for op in redo:  # recomputation runs first, as a chain, before the layer's backward
        out.append(Op(**{**op.__dict__, "phase": "recompute", "deps": (prev,) if prev else ()}))
        prev = out[-1].event
    start = (prev,) if prev else ()
    # quantize/dequantize exist only around compressed forward collectives (backward is bf16), and
    # backward reuses the forward's token counts
    grad_of = {op.event: op for op in fwd if op.name not in NO_GRAD}

    def dgrad_deps(event: str) -> tuple[str, ...]:
        out: list[str] = []
        for c in consumers[event]:
            out += [f"{c.split('/')[0]}/dgrad"] if c in grad_of else list(dgrad_deps(c))
        return tuple(dict.fromkeys(out))

    for op in reversed(fwd):
        if op.event not in grad_of:
            continue
        deps = dgrad_deps(op.event) or start
        if op.kind == "comm":
            coll = _REVERSE[op.collective or ""]
            # backward comm carries gradients in bf16 (compression applies to forward activations)
            out.append(Op(**{**op.__dict__, "phase": "dgrad", "deps": deps, "collective": coll,
                             "dtype": ACT, "bytes": op.bwd_bytes}))
            continue
        scale = 2.5 if op.kind == "attention" else 1.0  # flash-attention backward does 5 of 2 matmuls
        # an FP8 cast's backward casts the output gradient (bwd_bytes); other ops scale their forward
        nbytes = op.bwd_bytes if op.kind == "memory" and op.bwd_bytes is not None else op.bytes * scale
        out.append(Op(**{**op.__dict__, "phase": "dgrad", "deps": deps, "flops": op.flops * scale,
                         "bytes": nbytes}))
        if op.kind == "gemm":
            out.append(Op(**{**op.__dict__, "phase": "wgrad", "deps": deps}))
    return out


_LAYERS: dict[tuple, tuple[ModelSpec, dict[str, LayerGraph]]] = {}  # OpGraph.layers, shared


@dataclass(frozen=True)
class LayerGraph:
    kind: str  # moe | dense
    ops: tuple[Op, ...]
    params: dict[str, float]  # local parameters per sync group kind ("dp_sp", "edp")
    fp8_params: float = 0.0  # local weights of the FP8 GEMMs (precision fp8; copied to FP8 once per step)

    def phase(self, *phases: str) -> list[Op]:
        return [op for op in self.ops if op.phase in phases]


class OpGraph:
    """All ops of one iteration for a representative rank of each pipeline stage."""

    def __init__(self, model: ModelSpec, plan: PlanSpec, world: int, layout: Layout | None = None):
        self.model, self.plan = model, plan
        self.layout = layout or plan_layout(plan, model, world)
        L = self.layout
        self.t_seq = plan.micro_batch * model.seq_len / (L.tp * L.sp)
        self.t_attn = plan.micro_batch * model.seq_len / L.sp

    # ------------------------------------------------------------------ layers
    # ------------------------------------------------------------------ FP8
    @property
    def fp8(self) -> bool:
        return self.plan.precision == "fp8"

    def _gemm(self, b: _Builder, name: str, m: float, n: float, k: float, groups: int = 1,
              after: tuple[str, ...] | None = None, branch: str = "main", quantized_input: bool = False) -> str:
        """A linear layer's GEMM; under precision fp8 an FP8 GEMM preceded by the cast of its input
        (`<name>_quant`: amax/scale, quantize, transposed copy; its dgrad casts the output gradient).
        `quantized_input`: the input arrives already in FP8 (dispatched quantized): only the
        transposed copy for wgrad is made."""
        if not (self.fp8 and name in FP8_GEMMS):
            op = gemm(name, m, n, k, groups)
            return b.add(Op(**{**op.__dict__, "branch": branch}), after=after)
        recipe = self.plan.fp8_recipe
        fwd = 2.0 * m * k if quantized_input else fp8_cast_bytes(m, k, recipe)
        q = Op(f"{name}_quant", "fwd", "memory", bytes=fwd, branch=branch, bwd_bytes=fp8_cast_bytes(m, n, recipe))
        cast = b.add(q, after=after)
        op = gemm(name, m, n, k, groups, dtype="fp8")
        return b.add(Op(**{**op.__dict__, "branch": branch}), after=(cast,))

    def fp8_weight_cast_ops(self, stage: int) -> tuple[Op, ...]:
        """Once per step, after the optimizer: the FP8 copies (and transposes) of a rank's FP8-GEMM weights."""
        if not self.fp8:
            return ()
        n = sum(self.layers[k].fp8_params for k in self.stage_layer_kinds(stage))
        return (Op("optim.fp8_cast", "fwd", "memory", bytes=fp8_cast_bytes(n, 1, self.plan.fp8_recipe),
                   dtype="fp8"),)

    @cached_property
    def layers(self) -> dict[str, LayerGraph]:
        # a layer's ops depend on the model, tp/sp/ep/etp and these plan fields only (not on dp, pp,
        # the schedule or the batch): plans of a search that differ elsewhere share them
        p, L = self.plan, self.layout
        key = (id(self.model), L.tp, L.sp, L.ep, L.etp, p.micro_batch, p.recompute, p.compression.dispatch,
               p.compression.combine, p.overlap.intra_op != "none" and p.overlap.chunks, p.precision,
               p.fp8_recipe, p.dispatcher)
        hit = _LAYERS.get(key)
        if hit is not None and hit[0] is self.model:  # id() reused by a new model: rebuild
            return hit[1]
        out = {}
        if self.model.n_moe_layers:
            out["moe"] = self._layer(moe=True)
        if self.model.n_dense_layers:
            out["dense"] = self._layer(moe=False)
        if len(_LAYERS) > 4096:
            _LAYERS.clear()
        _LAYERS[key] = (self.model, out)
        return out

    def _kind(self, i: int) -> str:
        return "moe" if self.model.is_moe_layer(i) else "dense"

    def _memo(self, key: tuple, fn):
        """Per-graph memo of stage-level derived values (the simulator asks for them per rank, often)."""
        memo = self.__dict__.setdefault("_memo_", {})
        if key not in memo:
            memo[key] = fn()
        return memo[key]

    def vstage_layer_kinds(self, v: int) -> list[str]:
        """Layer kinds of virtual stage v (pipeline order; perfmodel.pplayout)."""
        return list(self._memo(("v", v), lambda: tuple(self._kind(i) for i in range(*self.layout.stages.ranges[v]))))

    def stage_layer_kinds(self, stage: int) -> list[str]:
        """Layer kinds held by pipeline rank `stage` (all its virtual stages)."""
        return list(self._memo(("s", stage), lambda: tuple(self._kind(i) for i in self.layout.stages.layers_of(stage))))

    def holds_embedding(self, stage: int) -> bool:
        return self.layout.stages.rank_of(0) == stage

    def holds_head(self, stage: int) -> bool:
        return self.layout.stages.rank_of(self.layout.stages.n_stages - 1) == stage

    def _attention(self, b: _Builder) -> None:
        m, L = self.model, self.layout
        h, a = m.hidden, BYTES[ACT]
        b.add(mem("attn.norm", self.t_seq * h * a * 3))  # read x, write y, residual read
        if L.tp > 1:
            b.add(comm("attn.tp_ag", "all_gather", "tp", L.tp, self.t_attn * h * a))
        self._gemm(b, "attn.qkv", self.t_attn, m.attn_in_params / h / L.tp, h)
        heads_local = m.heads / (L.tp * L.sp)
        kv_heads_tp = max(m.kv_heads / L.tp, 1)
        kv_sent = max(kv_heads_tp, L.sp)  # GQA: kv heads are replicated when fewer than sp ranks
        kv_heads_eff = m.heads if m.mla else kv_sent
        width_in = m.heads / L.tp * m.qk_head_dim + kv_heads_eff * (m.qk_head_dim + m.v_head_dim)
        if L.sp > 1:
            b.add(comm("attn.sp_a2a_in", "all_to_all", "sp", L.sp, self.t_attn * width_in * a))
        s = m.seq_len
        core_flops = self.plan.micro_batch * heads_local * 2 * s * s * (m.qk_head_dim + m.v_head_dim) * 0.5
        core_bytes = self.t_attn * (width_in + m.q_dim / L.tp) * a
        b.add(Op("attn.core", "fwd", "attention", flops=core_flops, bytes=core_bytes))
        if L.sp > 1:
            b.add(comm("attn.sp_a2a_out", "all_to_all", "sp", L.sp, self.t_attn * m.q_dim / L.tp * a))
        self._gemm(b, "attn.proj", self.t_attn, h, m.q_dim / L.tp)
        if L.tp > 1:
            b.add(comm("attn.tp_rs", "reduce_scatter", "tp", L.tp, self.t_attn * h * a))

    def _moe(self, b: _Builder) -> None:
        m, L, p = self.model, self.layout, self.plan
        moe = m.moe
        assert moe is not None
        h, a, k = m.hidden, BYTES[ACT], moe.top_k
        skew = moe.routing_skew if L.ep > 1 else 1.0
        f = moe.expert_ffn_hidden / L.etp
        t_route = self.t_seq * k
        t_exp = t_route * L.etp * skew
        routing = (k, moe.expert_groups, moe.groups_per_token or 0) if p.dispatcher == "deepep" else None
        norm = b.add(mem("moe.norm", self.t_seq * h * a * 3))
        b.add(gemm("moe.router", self.t_seq, moe.experts, h, dtype="fp32"), after=(norm,))
        if L.tp * L.sp > 1:
            # the per-sequence load-balancing loss needs each sequence's expert counts and router
            # probabilities summed over its shards: one fp32 all-reduce of [micro_batch, 2E]
            # (Megatron likewise all-reduces tokens_per_expert over TP x CP); backward sums its gradient
            stats = p.micro_batch * moe.experts * 2 * BYTES["fp32"]
            b.add(comm("moe.aux_ar", "all_reduce", "tp_sp", L.tp * L.sp, stats, "fp32"))
        b.add(mem("moe.permute", t_route * h * a * 2 + self.t_seq * k * 8))
        if L.ep > 1:
            # the uneven all-to-all needs every peer's row counts first: one small blocking exchange
            # of [ep, chunks, experts/ep] int64 per micro-batch (Megatron's alltoall dispatcher and
            # DeepEP's notify_dispatch do the same); latency-bound, and where ranks drift apart it is
            # the collective that absorbs the wait
            nc = p.overlap.chunks if p.overlap.intra_op != "none" else 1
            b.add(comm("moe.dispatch_counts", "all_to_all", "ep", L.ep, nc * moe.experts * BYTES["int64"], "int64"))
            d = p.compression.dispatch
            if d == "fp8":
                b.add(mem("moe.dispatch_quant", t_route * h * (a + 1)))
            payload = t_route * (h * BYTES[d] + (self._scale_bytes_per_token if d == "fp8" else 0))
            b.add(comm("moe.dispatch_a2a", "all_to_all", "ep", L.ep, payload, d, skew, t_route * h * a, routing))
            if d == "fp8" and not self.fp8:
                b.add(mem("moe.dispatch_dequant", t_route * skew * h * (a + 1)))
        if L.etp > 1:
            b.add(comm("moe.etp_ag", "all_gather", "etp", L.etp, t_exp * h * a))
        groups = moe.experts // L.ep
        # FP8 dispatch under precision fp8 sends the activations already quantized for the expert
        # GEMM (DeepSeek-V3): no dequantize after the all-to-all, no second cast before fc1
        pre_quantized = self.fp8 and L.ep > 1 and L.etp == 1 and p.compression.dispatch == "fp8"
        # fc1 writes gate and up (gated) or up alone; the activation reads them and writes f
        self._gemm(b, "moe.fc1", t_exp, (m.ffn_matrices - 1) * f, h, groups, quantized_input=pre_quantized)
        b.add(mem("moe.act", t_exp * m.ffn_matrices * f * a))
        fc2 = self._gemm(b, "moe.fc2", t_exp, h, f, groups)
        if L.etp > 1:
            b.add(comm("moe.etp_rs", "reduce_scatter", "etp", L.etp, t_exp * h * a))
        if L.ep > 1:
            c = p.compression.combine
            if c == "fp8":
                b.add(mem("moe.combine_quant", t_route * skew * h * (a + 1)))
            # mean rank's payload, like dispatch; the hottest rank's extra is `imbalance` (skew)
            payload = t_route * (h * BYTES[c] + (self._scale_bytes_per_token if c == "fp8" else 0))
            b.add(comm("moe.combine_a2a", "all_to_all", "ep", L.ep, payload, c, skew, t_route * skew * h * a,
                       routing))
            if c == "fp8":
                b.add(mem("moe.combine_dequant", t_route * h * (a + 1)))
        joins = [b.fwd[-1].event]
        if m.shared_ffn_hidden:
            # the shared expert only needs the normed tokens; the runtime (runtime/moe.py) runs it once
            # the experts are done, under the combine all-to-all (and its gradient in backward)
            joins.append(self._gemm(b, "moe.shared", self.t_seq, m.ffn_matrices * m.shared_ffn_hidden, h, after=(fc2,),
                                    branch="shared"))
        b.add(mem("moe.unpermute", t_route * h * a * 2 + self.t_seq * h * a * 2), after=tuple(joins))

    @property
    def _scale_bytes_per_token(self) -> float:
        """fp32 scales sent with an FP8 token: one per token, or one per 1x128 tile (blockwise)."""
        if self.fp8 and self.plan.fp8_recipe == "blockwise":
            return -(-self.model.hidden // FP8_BLOCK) * BYTES["fp32"]
        return FP8_SCALE_BYTES_PER_TOKEN

    def _dense_ffn(self, b: _Builder) -> None:
        m, L = self.model, self.layout
        h, a = m.hidden, BYTES[ACT]
        f = (m.dense_ffn_hidden or 0) / L.tp
        b.add(mem("ffn.norm", self.t_seq * h * a * 3))
        if L.tp > 1:
            b.add(comm("ffn.tp_ag", "all_gather", "tp", L.tp, self.t_attn * h * a))
        self._gemm(b, "ffn.fc1", self.t_attn, (m.ffn_matrices - 1) * f, h)
        b.add(mem("ffn.act", self.t_attn * m.ffn_matrices * f * a))
        self._gemm(b, "ffn.fc2", self.t_attn, h, f)
        if L.tp > 1:
            b.add(comm("ffn.tp_rs", "reduce_scatter", "tp", L.tp, self.t_attn * h * a))

    def _layer(self, moe: bool) -> LayerGraph:
        b = _Builder()
        self._attention(b)
        (self._moe if moe else self._dense_ffn)(b)
        m, L = self.model, self.layout
        # non-expert params (attention, norms, router, shared/dense FFN) are sharded by tp only
        dense_local = (m.attn_params + m.hidden) / L.tp
        expert_local = 0.0
        if moe:
            dense_local += m.hidden * m.moe.experts + m.ffn_matrices * m.hidden * m.shared_ffn_hidden / L.tp
            expert_local = m.moe.experts / L.ep * m.expert_params / L.etp
        else:
            dense_local += m.ffn_matrices * m.hidden * (m.dense_ffn_hidden or 0) / L.tp
        ops = tuple(b.fwd) + tuple(_backward(b.fwd, self.plan.recompute))
        params = {"dp_sp": dense_local, **({"edp": expert_local} if moe else {})}
        fp8_params = 0.0
        if self.fp8:
            ffn = m.ffn_matrices * m.hidden * (m.shared_ffn_hidden if moe else (m.dense_ffn_hidden or 0)) / L.tp
            fp8_params = (m.attn_in_params + m.attn_out_params) / L.tp + ffn + expert_local
        return LayerGraph("moe" if moe else "dense", ops, params, fp8_params)

    # ---------------------------------------------------------- stage extras
    @cached_property
    def embed_ops(self) -> tuple[Op, ...]:
        return (mem("embed.lookup", self.t_seq * self.model.hidden * BYTES[ACT] * 2),)

    @cached_property
    def head_ops(self) -> tuple[Op, ...]:
        """Final norm, vocab-parallel output projection and the loss (last stage)."""
        m, L = self.model, self.layout
        b = _Builder()
        b.add(mem("head.norm", self.t_seq * m.hidden * BYTES[ACT] * 3))
        b.add(gemm("head.proj", self.t_attn, m.vocab / L.tp, m.hidden))
        b.add(mem("head.loss", self.t_attn * m.vocab / L.tp * 4 * 3))
        return tuple(b.fwd) + tuple(_backward(b.fwd, "none"))

    @cached_property
    def pp_bytes(self) -> float:
        """Activation (forward) or gradient (backward) bytes sent between stages per micro-batch."""
        return self.t_seq * self.model.hidden * BYTES[ACT]

    def stage_params(self, stage: int) -> dict[str, float]:
        """Local parameters of a stage's rank per sync group (embeddings on the first/last stage)."""
        return dict(self._memo(("params", stage), lambda: self._stage_params(stage)))

    def _stage_params(self, stage: int) -> dict[str, float]:
        out = {"dp_sp": 0.0, "edp": 0.0}
        for kind in self.stage_layer_kinds(stage):
            for g, n in self.layers[kind].params.items():
                out[g] += n
        emb = self.model.vocab * self.model.hidden / self.layout.tp
        if self.holds_embedding(stage):
            out["dp_sp"] += emb
        if self.holds_head(stage) and not (self.model.tie_embeddings and self.layout.pp == 1):
            out["dp_sp"] += emb + self.model.hidden
        return out

    def grad_sync_ops(self, stage: int) -> tuple[Op, ...]:
        """Gradient reduction (+ parameter all-gather with a distributed optimizer) per sync group."""
        return self._memo(("sync", stage), lambda: self._grad_sync_ops(stage))

    def _grad_sync_ops(self, stage: int) -> tuple[Op, ...]:
        L, p = self.layout, self.plan
        sizes = {"dp_sp": L.dp * L.sp, "edp": L.edp}
        wire = BYTES[p.compression.grad_sync]
        out = []
        for g, n in self.stage_params(stage).items():
            if n <= 0 or sizes[g] <= 1:
                continue
            if p.distributed_optimizer:
                out.append(comm("dp.grad_sync", "reduce_scatter", g, sizes[g], n * wire, p.compression.grad_sync))
                out.append(comm("dp.param_gather", "all_gather", g, sizes[g], n * BYTES[ACT]))
            else:
                out.append(comm("dp.grad_sync", "all_reduce", g, sizes[g], n * wire, p.compression.grad_sync))
        return tuple(out)

    def optimizer_op(self, stage: int) -> Op:
        """Adam on the local shard: read grad+master+m+v, write master+m+v+bf16 param (~30 B/param)."""
        L, p = self.layout, self.plan
        sizes = {"dp_sp": L.dp * L.sp, "edp": L.edp}
        params = sum(n / (sizes[g] if p.distributed_optimizer else 1) for g, n in self.stage_params(stage).items())
        return Op("optim.step", "fwd", "memory", bytes=params * 30, dtype="fp32")

    # ------------------------------------------------------------- accounting
    def tokens_per_iteration(self) -> int:
        return self.plan.global_batch * self.model.seq_len

    def model_flops_per_iteration(self) -> float:
        """Useful FLOPs of one iteration (GEMM + attention, fwd + bwd, no recomputation), all ranks."""
        L = self.layout
        kinds = [self._kind(i) for i in range(self.model.layers)]
        per_mb = sum(kinds.count(k) * self.layer_flops(k) for k in set(kinds))
        per_mb += sum(op.flops for op in self.head_ops if op.phase != "recompute")
        return per_mb * L.microbatches * L.dp * L.tp * L.sp

    def layer_flops(self, kind: str) -> float:
        """FLOPs of one layer per rank per micro-batch (mean routing: skew removed)."""
        skew = self.model.moe.routing_skew if (self.model.moe and self.layout.ep > 1) else 1.0
        total = 0.0
        for op in self.layers[kind].ops:
            if op.phase == "recompute" or op.kind not in ("gemm", "attention"):
                continue
            total += op.flops / skew if op.name in ("moe.fc1", "moe.fc2") else op.flops
        return total


def build(model: ModelSpec, plan: PlanSpec, world: int) -> OpGraph:
    return OpGraph(model, plan, world)
