"""Per-GPU memory of a plan: weights, gradients, optimizer state, activations, comm buffers.

All counts are per rank of one pipeline stage; `estimate_memory` reports the stage that
needs the most (the first stage holds the most in-flight microbatches, the last the
logits). Conventions (Megatron-Core mixed precision, Adam):

* weights: bf16, 2 bytes/param. Attention, dense FFN, shared experts and the (vocab-
  parallel) embeddings are split over tp; routed experts over ep (whole experts) and etp
  (each expert's FFN width); norms and the router are replicated.
* gradients: the main-grad buffer, fp32 (4 bytes/param), bf16 (2) when the plan
  compresses grad_sync to bf16; never sharded.
* optimizer: fp32 master weights + Adam m and v = 12 bytes/param; with
  `distributed_optimizer` sharded over the param's data-parallel group: expert params over
  edp, the others over dp*sp (SP ranks hold replicas of the attention weights).
* activations (bf16, FlashAttention: no s^2 terms), after Korthikanti et al., "Reducing
  Activation Recomputation in Large Transformer Models" (arXiv 2205.05198), adapted to
  GQA/MLA, SwiGLU, RMSNorm and MoE. Each rank holds n = seq_len*micro_batch/(tp*sp)
  tokens outside attention (sequence sharded over tp*sp; inside attention the heads are
  sharded instead, the same bytes). Routed-expert tensors hold n*top_k*routing_skew*etp
  tokens (the hottest rank; etp ranks all see their group's tokens) at width f/etp.
  - none: everything a backward reads is stored.
  - selective: norm outputs and SwiGLU outputs are recomputed (not stored).
  - full: only each layer's input (2nh bytes) is stored, plus one layer's full working set
    while it is recomputed.
  In-flight microbatches on stage s: min(pp - s, microbatches) for 1F1B; interleaved
  multiplies by 1 + (pp-1)/(pp*vpp) (Narayanan et al., arXiv 2104.04473); ZB-V holds pp on
  every rank (Qi et al., arXiv 2401.10241: peak p*M_B), DualPipeV pp + 1/2 (DeepSeek-V3
  Table 2: PP+1 chunks of half a stage). Each rank counts the layers its layout gives it
  (perfmodel.pplayout; uneven stages), so every stage is estimated and the worst reported.
* precision fp8: the FP8-GEMM weights also have an FP8 copy and a transposed FP8 copy (+2
  bytes/param); the inputs those GEMMs save for wgrad are kept in FP8 (1 byte, + a 4-byte
  scale per 128 values for blockwise). The last stage
  adds the logits (bf16) and their fp32 softmax for the loss, one microbatch.
* buffers: one MoE layer's all-to-all send+recv buffers for dispatch and combine (1 byte +
  a 4-byte scale per 128 values for fp8, 2 bytes for bf16) and the SP all-to-all buffers;
  they are transient, so one layer's worth is counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from perfmodel import pplayout
from perfmodel.layout import Layout, plan_layout
from perfmodel.specs import ModelSpec, PlanSpec, ProfileSpec

GiB = float(2**30)
BF16 = 2
FP32 = 4
ADAM_BYTES = 12  # fp32 master + m + v


@dataclass(frozen=True)
class MemoryEstimate:
    weights_GiB: float
    grads_GiB: float
    optimizer_GiB: float
    activations_GiB: float
    buffers_GiB: float
    total_GiB: float
    capacity_GiB: float
    fits: bool
    short_GiB: float  # how much is missing (0 when it fits)
    stage: int = 0  # the pipeline stage these numbers are for (the one needing the most)

    def as_dict(self) -> dict[str, float | bool | int]:
        return asdict(self)


# ----------------------------------------------------------------------------- layers
def _moe_upto(model: ModelSpec, n: int) -> int:
    """Number of MoE layers among layers [0, n)."""
    if model.moe is None:
        return 0
    after = max(0, n - model.moe.first_dense_layers)
    return -(-after // model.moe.moe_layer_freq)


def stage_layers(model: ModelSpec, plan: PlanSpec, stage: int) -> tuple[int, int]:
    """(MoE layers, dense layers) held by a pipeline rank (all its virtual stages; perfmodel.pplayout)."""
    layout = pplayout.resolve(model.layers, plan)
    moe = total = 0
    for v in layout.stages_of(stage):
        lo, hi = layout.ranges[v]
        moe += _moe_upto(model, hi) - _moe_upto(model, lo)
        total += hi - lo
    return moe, total - moe


def _ends(model: ModelSpec, plan: PlanSpec, stage: int) -> tuple[bool, bool]:
    """(holds the embedding, holds the head and loss): virtual stages 0 and n-1 (both on rank 0 in a V)."""
    layout = pplayout.resolve(model.layers, plan)
    return layout.rank_of(0) == stage, layout.rank_of(layout.n_stages - 1) == stage


def fp8_gemm_params(model: ModelSpec, plan: PlanSpec, stage: int) -> float:
    """Weights of the FP8 GEMMs on one rank (attention projections, FFNs, experts): under precision
    fp8 each also has an FP8 copy and a transposed FP8 copy (Transformer Engine keeps both)."""
    if plan.precision != "fp8":
        return 0.0
    n_moe, n_dense = stage_layers(model, plan, stage)
    h, tp = model.hidden, plan.tp
    attn = (model.attn_in_params + model.attn_out_params) / tp
    mats = model.ffn_matrices
    dense = n_dense * (attn + mats * h * (model.dense_ffn_hidden or 0) / tp)
    moe = n_moe * (attn + mats * h * model.shared_ffn_hidden / tp)
    if model.moe:
        moe += n_moe * (model.moe.experts / plan.ep) * model.expert_params / plan.etp
    return dense + moe


# ----------------------------------------------------------------------------- params
def stage_params(model: ModelSpec, plan: PlanSpec, stage: int) -> tuple[float, float]:
    """(non-expert params, routed-expert params) on one rank of `stage`."""
    h, tp = model.hidden, plan.tp
    n_moe, n_dense = stage_layers(model, plan, stage)
    attn = (model.attn_in_params + model.attn_out_params) / tp + h  # + norm
    mats = model.ffn_matrices
    dense = n_dense * (attn + h + mats * h * (model.dense_ffn_hidden or 0) / tp)
    expert = 0.0
    if model.moe:
        moe_rest = attn + h + h * model.moe.experts + mats * h * model.shared_ffn_hidden / tp
        dense += n_moe * moe_rest
        expert = n_moe * (model.moe.experts / plan.ep) * model.expert_params / plan.etp
    emb = model.vocab * h / tp
    first, last = _ends(model, plan, stage)
    if first:
        dense += emb
    if last:
        dense += h  # final norm
        if not model.tie_embeddings or plan.pp > 1:
            dense += emb  # output layer (a tied copy lives on the last stage when pp > 1)
    return dense, expert


# ------------------------------------------------------------------------ activations
def _tokens(model: ModelSpec, lay: Layout) -> float:
    return model.seq_len * lay.micro_batch / (lay.tp * lay.sp)


def _attn_widths(model: ModelSpec, lay: Layout) -> tuple[int, int, int, int]:
    """(q, k, v, o) widths of one token summed over all heads a rank's share is taken of."""
    kvh = min(model.heads, max(model.kv_heads, lay.tp * lay.sp))  # kv heads replicate when fewer than ranks
    return (model.heads * model.qk_head_dim, kvh * model.qk_head_dim, kvh * model.v_head_dim, model.q_dim)


def fp8_saved_bytes(plan: PlanSpec) -> float:
    """Bytes per element of a saved FP8-GEMM input: FP8 under precision fp8 (the wgrad reads the FP8
    copy; blockwise adds one fp32 scale per 1x128 tile), else bf16."""
    if plan.precision != "fp8":
        return BF16
    return 1 + (FP32 / 128 if plan.fp8_recipe == "blockwise" else 0.0)


def layer_activation_bytes(model: ModelSpec, lay: Layout, moe_layer: bool, recompute: str,
                           gemm_in: float = BF16) -> float:
    """Bytes one layer stores for one microbatch on one rank (before pipeline in-flight factors).
    `gemm_in`: bytes per element of the saved inputs of FP8-capable GEMMs (fp8_saved_bytes)."""
    n, h = _tokens(model, lay), model.hidden
    if recompute == "full":
        return BF16 * n * h
    sel = recompute == "selective"
    up = model.ffn_matrices - 1  # fc1 output widths: gate and up (gated) or up alone
    q, k, v, o = _attn_widths(model, lay)
    # attention: norm input, [norm output = qkv input], q k v, output (proj input), fp32 softmax stats
    b = BF16 * n * (h + q + k + v) + gemm_in * n * ((0 if sel else h) + o) + FP32 * n * model.heads
    if model.mla:
        m = model.mla
        b += BF16 * n * (m.q_lora_rank + m.kv_lora_rank + m.qk_rope_head_dim)  # latent up-proj inputs
    b += BF16 * n * (h + (0 if sel else h))  # FFN norm input, [norm output]
    if moe_layer and model.moe:
        moe = model.moe
        te = n * moe.top_k * moe.routing_skew * lay.etp
        f = moe.expert_ffn_hidden / lay.etp
        b += FP32 * n * moe.experts  # router logits/probs
        b += gemm_in * te * (h + (0 if sel else f)) + BF16 * te * up * f  # fc1 input, [act out]; fc1 out
        b += BF16 * n * moe.top_k * h  # expert outputs back home, read by unpermute's backward
        fs = model.shared_ffn_hidden
    else:
        fs = model.dense_ffn_hidden or 0
    if fs:
        b += BF16 * n * up * fs + gemm_in * n * (0 if sel else fs)  # fc1 out (gate, up | up), [act out]; input = norm out
    return b


def in_flight(plan: PlanSpec, stage: int, microbatches: int) -> float:
    """Micro-batches' worth of a rank's layers whose activations are held at the peak."""
    if plan.schedule == "zero-bubble":  # ZB-V: pp micro-batches on every rank (Qi et al.: peak p*M_B)
        return float(min(plan.pp, microbatches))
    if plan.schedule == "dualpipev":  # DeepSeek-V3 Table 2: PP+1 chunks of half a stage = pp + 1/2
        return min(plan.pp + 0.5, float(microbatches))
    out = float(min(plan.pp - stage, microbatches))
    if plan.schedule == "interleaved" and plan.pp > 1:
        out *= 1 + (plan.pp - 1) / (plan.pp * plan.vpp)
    return out


def stage_activation_bytes(model: ModelSpec, plan: PlanSpec, lay: Layout, stage: int,
                           per_layer: dict[bool, float] | None = None) -> float:
    """`per_layer`: layer_activation_bytes of a MoE (True) and a dense (False) layer, when the
    caller has them (estimate_stages computes them once for every stage)."""
    n_moe, n_dense = stage_layers(model, plan, stage)
    if per_layer is None:
        per_layer = _per_layer(model, plan, lay)
    per_mb = n_moe * per_layer[True] + n_dense * per_layer[False]
    total = per_mb * in_flight(plan, stage, lay.microbatches)
    if plan.recompute == "full":  # one layer's working set while it is recomputed
        kinds = [k for k, c in ((True, n_moe), (False, n_dense)) if c]
        total += max((layer_activation_bytes(model, lay, k, "none") for k in kinds), default=0.0)
    if _ends(model, plan, stage)[1]:  # bf16 logits + fp32 softmax for the loss, vocab-parallel
        total += (BF16 + FP32) * _tokens(model, lay) * model.vocab
    return total


def _per_layer(model: ModelSpec, plan: PlanSpec, lay: Layout) -> dict[bool, float]:
    g = fp8_saved_bytes(plan)
    return {k: layer_activation_bytes(model, lay, k, plan.recompute, g) for k in (True, False)}


def buffer_bytes(model: ModelSpec, plan: PlanSpec, lay: Layout) -> float:
    n, h = _tokens(model, lay), model.hidden
    buf = 0.0
    if lay.sp > 1:  # SP all-to-all in and out of attention: send + recv of q, k, v and of o
        q, k, v, o = _attn_widths(model, lay)
        buf = max(buf, 2 * BF16 * n * max(q + k + v, o))
    if model.moe and lay.ep > 1:
        moe = model.moe

        def width(dtype: str) -> float:
            return 1 + 4 / 128 if dtype == "fp8" else BF16

        out_tok = n * moe.top_k  # tokens a rank sends out (dispatch) / gets back (combine)
        in_tok = out_tok * moe.routing_skew  # the hottest rank receives more
        a2a = (width(plan.compression.dispatch) + width(plan.compression.combine)) * (out_tok + in_tok) * h
        buf = max(buf, a2a)
    return buf


# ------------------------------------------------------------------------------ total
def _estimate_stage(model: ModelSpec, plan: PlanSpec, lay: Layout, profile: ProfileSpec, stage: int,
                    per_layer: dict[bool, float] | None = None) -> MemoryEstimate:
    dense, expert = stage_params(model, plan, stage)
    grad_bytes = BF16 if plan.compression.grad_sync == "bf16" else FP32
    if plan.distributed_optimizer:
        opt = ADAM_BYTES * (dense / (lay.dp * lay.sp) + expert / lay.edp)
    else:
        opt = ADAM_BYTES * (dense + expert)
    parts = [
        (BF16 * (dense + expert) + 2 * fp8_gemm_params(model, plan, stage)) / GiB,
        grad_bytes * (dense + expert) / GiB,
        opt / GiB,
        stage_activation_bytes(model, plan, lay, stage, per_layer) / GiB,
        buffer_bytes(model, plan, lay) / GiB,
    ]
    total = sum(parts)
    cap = profile.memory_GiB
    return MemoryEstimate(*parts, total_GiB=total, capacity_GiB=cap, fits=total <= cap,
                          short_GiB=max(0.0, total - cap), stage=stage)


def estimate_stages(model: ModelSpec, plan: PlanSpec, world: int, profile: ProfileSpec) -> list[MemoryEstimate]:
    """One estimate per pipeline stage. Raises SpecError for a plan that cannot be laid out."""
    lay = plan_layout(plan, model, world)
    per_layer = _per_layer(model, plan, lay)
    return [_estimate_stage(model, plan, lay, profile, s, per_layer) for s in range(plan.pp)]


def estimate_memory(model: ModelSpec, plan: PlanSpec, world: int, profile: ProfileSpec) -> MemoryEstimate:
    """Per-GPU memory of the stage that needs the most; `fits`/`short_GiB` against the profile."""
    return max(estimate_stages(model, plan, world, profile), key=lambda e: e.total_GiB)
