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

from dataclasses import dataclass
from functools import cached_property

from perfmodel.sim.ops import (  # noqa: F401 (Op and its builders are used through this module too)
    ACT,
    BYTES,
    FP8_BLOCK,
    FP8_GEMMS,
    FP8_SCALE_BYTES_PER_TOKEN,
    NO_GRAD,
    QUANT_OPS,
    SELECTIVE,
    Builder,
    Op,
    backward_of,
    comm,
    fp8_cast_bytes,
    gemm,
    mem,
)
from perfmodel.specs import ModelSpec, PlanSpec
from perfmodel.specs.layout import Layout, plan_layout

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

    def _gemm(self, b: Builder, name: str, m: float, n: float, k: float, groups: int = 1,
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
        """Layer kinds of virtual stage v (pipeline order; perfmodel.specs.pplayout)."""
        return list(self._memo(("v", v), lambda: tuple(self._kind(i) for i in range(*self.layout.stages.ranges[v]))))

    def stage_layer_kinds(self, stage: int) -> list[str]:
        """Layer kinds held by pipeline rank `stage` (all its virtual stages)."""
        return list(self._memo(("s", stage), lambda: tuple(self._kind(i) for i in self.layout.stages.layers_of(stage))))

    def holds_embedding(self, stage: int) -> bool:
        return self.layout.stages.rank_of(0) == stage

    def holds_head(self, stage: int) -> bool:
        return self.layout.stages.rank_of(self.layout.stages.n_stages - 1) == stage

    def _attention(self, b: Builder) -> None:
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

    def _moe(self, b: Builder) -> None:
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

    def _dense_ffn(self, b: Builder) -> None:
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
        b = Builder()
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
        ops = tuple(b.fwd) + tuple(backward_of(b.fwd, self.plan.recompute))
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
        b = Builder()
        b.add(mem("head.norm", self.t_seq * m.hidden * BYTES[ACT] * 3))
        b.add(gemm("head.proj", self.t_attn, m.vocab / L.tp, m.hidden))
        b.add(mem("head.loss", self.t_attn * m.vocab / L.tp * 4 * 3))
        return tuple(b.fwd) + tuple(backward_of(b.fwd, "none"))

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
