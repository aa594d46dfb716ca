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
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from perfmodel.specs import ModelSpec, MoESpec, PlanSpec, SpecError
from runtime.attention import Attention
from runtime.groups import Parallel
from runtime.moe import MoE, SwiGLU, get_expert_fn
from runtime.params import Placement, make_param


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
        self.attn = Attention(spec, par, f"{p}.attn", seed, selective_recompute=plan.recompute == "selective")
        self.ffn_norm = RMSNorm(f"{p}.ffn_norm", spec.hidden)
        self.is_moe = spec.is_moe_layer(i)
        if self.is_moe:
            wire = (plan.compression.dispatch, plan.compression.combine)
            ov = plan.overlap
            chunks = ov.chunks if ov.intra_op != "none" else 1  # tile runs as chunk
            self.ffn: nn.Module = MoE(spec, par, f"{p}.moe", seed, plan.global_batch, get_expert_fn(plan.kernels),
                                      wire, plan.kernels, chunks, ov.inter_op)
        else:
            self.ffn = SwiGLU(f"{p}.ffn", spec.hidden, spec.dense_ffn_hidden or 0, spec.layers, seed)
        self.full_recompute = plan.recompute == "full"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with record_function("attn.norm/fwd"):
            a = self.attn_norm(x)
        x = x + self.attn(a)
        with record_function("moe.norm/fwd" if self.is_moe else "ffn.norm/fwd"):
            f = self.ffn_norm(x)
        return x + self.ffn(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.full_recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class Stage(nn.Module):
    """Layers [lo, hi) of the model; `first` adds the embedding, `last` the norm and LM head."""

    def __init__(self, spec: ModelSpec, plan: PlanSpec, par: Parallel, lo: int, hi: int, seed: int):
        super().__init__()
        self.first, self.last = lo == 0, hi == spec.layers
        if spec.tie_embeddings and not (self.first and self.last):
            raise SpecError("model.tie_embeddings: not supported with pipeline parallelism (pp>1); untie them")
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
            with record_function("embed.lookup/fwd"):
                x = F.embedding(x, self.embed)
        for layer in self.layers.values():
            x = layer(x)
        if self.last:
            with record_function("head.norm/fwd"):
                x = self.norm(x)
            with record_function("head.proj/fwd"):
                x = F.linear(x, self.head)
        return x

    def moe_layers(self) -> dict[int, MoE]:
        """Global layer index -> MoE module, for this stage's MoE layers."""
        return {int(i): b.ffn for i, b in self.layers.items() if isinstance(b.ffn, MoE)}


def check_supported(plan: PlanSpec) -> None:
    """Plan features the runtime does not execute and cannot silently ignore."""
    if plan.etp != 1:
        raise SpecError(f"plan.etp: {plan.etp}: expert tensor parallelism is not supported by the runtime; use etp: 1")
    if plan.overlap.intra_op == "tile" and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"moeperf run: overlap.intra_op: tile has no tile-level GEMM+communication kernel in this runtime; "
              f"running it as chunk ({plan.overlap.chunks} token chunks)", file=sys.stderr, flush=True)


def stage_ranges(layers: int, pp: int, vpp: int) -> list[tuple[int, int]]:
    """Layer range of every virtual stage, in pipeline order (stage v*pp + p lives on pp rank p)."""
    n = pp * vpp
    per = layers // n
    return [(s * per, (s + 1) * per) for s in range(n)]


def build_stages(spec: ModelSpec, plan: PlanSpec, par: Parallel, seed: int) -> list[tuple[int, Stage]]:
    """(stage index, module) for every virtual stage this rank runs."""
    pp, pi = par.size("pp"), par.index("pp")
    ranges = stage_ranges(spec.layers, pp, plan.vpp if pp > 1 else 1)
    return [(s, Stage(spec, plan, par, *ranges[s], seed)) for s in range(pi, len(ranges), pp)]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, global_tokens: int) -> torch.Tensor:
    """This micro-batch's share of the iteration's mean token cross-entropy."""
    with record_function("head.loss/fwd"):
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
