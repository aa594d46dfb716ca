"""The decoder-only MoE transformer, built per pipeline stage from a ModelSpec.

A `Stage` holds a contiguous range of layers (global indices, so parameter names are the same
under every plan), plus the embedding on the first stage and final norm + LM head on the last.
Without pipeline parallelism there is one stage with everything. Token activations are
sequence-sharded across tp*sp ranks everywhere outside attention ([B, S/(tp*sp), H]).

The loss is the token cross-entropy *summed* and divided by the global token count of the
iteration, so summing gradients over micro-batches and ranks gives exactly the one-process
gradient (no averaging factors that depend on the plan).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from perfmodel import pplayout
from perfmodel.specs import ModelSpec, MoESpec, PlanSpec, SpecError
from runtime.attention import Attention
from runtime.groups import Parallel
from runtime.moe import MoE, SwiGLU, get_expert_fn
from runtime.params import Placement, make_param
from runtime.spans import span


class RMSNorm(nn.Module):
    def __init__(self, name: str, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = make_param(name, (dim,), 0, None, Placement(reduce=("tp", "sp"), shard_group="dp", decay=False))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, plan: PlanSpec, par: Parallel, i: int, seed: int):
        super().__init__()
        p = f"layers.{i}"
        self.attn_norm = RMSNorm(f"{p}.attn_norm", spec.hidden)
        fp8 = (plan.precision, plan.fp8_recipe)  # FP8 GEMMs of attention and FFNs (runtime.fp8_linear)
        self.attn = Attention(spec, par, f"{p}.attn", seed, plan.recompute == "selective", *fp8)
        self.ffn_norm = RMSNorm(f"{p}.ffn_norm", spec.hidden)
        self.is_moe = spec.is_moe_layer(i)
        if self.is_moe:
            wire = (plan.compression.dispatch, plan.compression.combine)
            ov = plan.overlap
            chunks = ov.chunks if ov.intra_op != "none" else 1  # tile runs as chunk
            self.ffn: nn.Module = MoE(spec, par, f"{p}.moe", seed, plan.global_batch, get_expert_fn(plan.kernels),
                                      wire, plan.kernels, chunks, ov.inter_op, *fp8)
        else:
            self.ffn = SwiGLU(f"{p}.ffn", spec.hidden, spec.dense_ffn_hidden or 0, spec.layers, seed, *fp8)
        self.full_recompute = plan.recompute == "full"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with span("attn.norm/fwd"):
            a = self.attn_norm(x)
        x = x + self.attn(a)
        with span("moe.norm/fwd" if self.is_moe else "ffn.norm/fwd"):
            f = self.ffn_norm(x)
        return x + self.ffn(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.full_recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class Stage(nn.Module):
    """Layers [lo, hi) of the model (possibly none); `first` adds the embedding, `last` the norm and LM head.

    `first`/`last` say whether this is the first / last *virtual* stage of the pipeline (build_stages
    passes them: under a V placement both sit on pp rank 0, and with an uneven layout a stage next to
    an empty one also starts at layer 0 or ends at the last layer); omitted, they follow lo and hi.
    """

    def __init__(self, spec: ModelSpec, plan: PlanSpec, par: Parallel, lo: int, hi: int, seed: int,
                 first: bool | None = None, last: bool | None = None):
        super().__init__()
        self.first = lo == 0 if first is None else first
        self.last = hi == spec.layers if last is None else last
        if spec.tie_embeddings and not (self.first and self.last):
            raise SpecError("model.tie_embeddings: not supported with pipeline parallelism (pp>1); untie them")
        if not spec.gated_ffn:
            raise SpecError("model.gated_ffn: false (two-matrix FFN) is simulated only; the runtime builds SwiGLU "
                            "FFNs: set gated_ffn: true to run it")
        if self.first:
            self.embed = make_param("embed", (spec.vocab, spec.hidden), seed, 0.02)
        self.layers = nn.ModuleDict({str(i): Block(spec, plan, par, i, seed) for i in range(lo, hi)})
        if self.last:
            self.norm = RMSNorm("norm", spec.hidden)
            self.head = self.embed if spec.tie_embeddings else make_param("head", (spec.vocab, spec.hidden), seed, 0.02)

    autocast: torch.dtype | None = None  # set by the trainer on GPU (bf16); the pipeline calls forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.autocast is not None:
            with torch.autocast(x.device.type, dtype=self.autocast):
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            with span("embed.lookup/fwd"):
                x = F.embedding(x, self.embed)
        for layer in self.layers.values():
            x = layer(x)
        if self.last:
            with span("head.norm/fwd"):
                x = self.norm(x)
            with span("head.proj/fwd"):
                x = F.linear(x, self.head)
        elif not self.first and not self.layers:
            # an empty interior stage: give its output a graph node of its own rather than hand back the
            # received buffer (the pipeline detaches a stage's outputs in place after their backward;
            # torch 2.13 also copes with the bare identity, the copy keeps it from depending on that)
            x = x.clone()
        return x

    def moe_layers(self) -> dict[int, MoE]:
        """Global layer index -> MoE module, for this stage's MoE layers."""
        return {int(i): b.ffn for i, b in self.layers.items() if isinstance(b.ffn, MoE)}


def set_precision(modules: list[nn.Module], precision: str, fp8_recipe: str = "tensorwise") -> None:
    """Switch built stages to another plan.precision / fp8_recipe in place (the FP8 GEMMs of attention,
    experts and FFNs read it at every forward): a benchmark sweeps precisions on one model."""
    from runtime import fp8_linear

    recipe = fp8_linear.recipe_of(precision, fp8_recipe)
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, (Attention, MoE, SwiGLU)):
                m.fp8 = recipe


def check_supported(plan: PlanSpec, microbatches: int | None = None) -> None:
    """Plan features the runtime does not execute and cannot silently ignore."""
    if microbatches is not None and plan.schedule == "1f1b" and 1 < plan.pp and microbatches < plan.pp:
        raise SpecError(f"plan.global_batch: the runtime's 1f1b (torch Schedule1F1B) needs at least pp={plan.pp} "
                        f"micro-batches per replica, got {microbatches}; raise global_batch or lower micro_batch")
    if plan.etp != 1:
        raise SpecError(f"plan.etp: {plan.etp}: expert tensor parallelism is not supported by the runtime; use etp: 1")
    if plan.dispatcher != "alltoall":
        raise SpecError(f"plan.dispatcher: {plan.dispatcher}: the runtime dispatches with all-to-all only (the "
                        f"node-deduplicating deepep dispatcher is simulated, not run); use dispatcher: alltoall")
    if plan.schedule in pplayout.V_SCHEDULES and plan.overlap.inter_op:
        # the split backward recomputes weight gradients through autograd from each weight's first
        # consumer node; the deferred-wgrad expert Function (runtime.overlap.experts) returns None for
        # its weights and writes .grad itself, so that pass fails ("not used in the graph")
        raise SpecError(f"plan.overlap.inter_op: not supported by the runtime with schedule: {plan.schedule} (its "
                        f"split input/weight backward cannot run the deferred expert weight gradients; the "
                        f"schedule defers weight gradients itself); use inter_op: false")
    if plan.overlap.intra_op == "tile" and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"moeperf run: overlap.intra_op: tile has no tile-level GEMM+communication kernel in this runtime; "
              f"running it as chunk ({plan.overlap.chunks} token chunks)", file=sys.stderr, flush=True)


def build_stages(spec: ModelSpec, plan: PlanSpec, par: Parallel, seed: int) -> list[tuple[int, Stage]]:
    """(virtual stage index, module) for every virtual stage this rank runs, in chunk order.

    The layers of each virtual stage and the pp rank it runs on come from the one shared layout,
    `perfmodel.pplayout.resolve` (uneven and explicit `pp_layout`s, loop or V placement); the
    embedding belongs to virtual stage 0 and the final norm + head to the last one.
    """
    layout = pplayout.resolve(spec.layers, plan)
    if layout.pp != par.size("pp"):
        raise SpecError(f"plan.pp: {plan.pp} but the pipeline group has {par.size('pp')} ranks")
    last = layout.n_stages - 1
    return [(v, Stage(spec, plan, par, *layout.ranges[v], seed, first=v == 0, last=v == last))
            for v in layout.stages_of(par.index("pp"))]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, global_tokens: int) -> torch.Tensor:
    """This micro-batch's share of the iteration's mean token cross-entropy."""
    with span("head.loss/fwd"):
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction="sum") / global_tokens


def _round(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def scale(spec: ModelSpec, factor: float, layers: int | None = None, seq_len: int | None = None) -> ModelSpec:
    """A smaller model of the same structure: widths (hidden, head_dim, FFNs) times `factor`;
    experts, top_k, shared experts, heads and kv_heads (so the GQA ratio) and the dense/MoE
    layer pattern unchanged. MLA is dropped (run as GQA); vocab is kept >= 256 for byte data."""
    if not 0 < factor <= 1:
        raise SpecError(f"--scale: {factor} must be in (0, 1]")
    data = spec.model_dump(mode="python")
    data["head_dim"] = _round(spec.head_dim * factor, 8)
    data["hidden"] = _round(spec.hidden * factor, 8)
    data["vocab"] = max(256, _round(spec.vocab * factor, 64)) if factor < 1 else spec.vocab
    if spec.dense_ffn_hidden:
        data["dense_ffn_hidden"] = _round(spec.dense_ffn_hidden * factor, 8)
    if spec.moe:
        m: MoESpec = spec.moe
        data["moe"]["expert_ffn_hidden"] = _round(m.expert_ffn_hidden * factor, 8)
        if m.shared_expert_ffn_hidden:
            data["moe"]["shared_expert_ffn_hidden"] = _round(m.shared_expert_ffn_hidden * factor, 8)
    if factor < 1:
        data["mla"] = None
    if layers:
        data["layers"] = layers
        if spec.moe:
            data["moe"]["first_dense_layers"] = min(spec.moe.first_dense_layers, layers - 1)
    if seq_len:
        data["seq_len"] = seq_len
    data["name"] = f"{spec.name}@{factor:g}"
    return ModelSpec.model_validate(data)
