"""GQA attention with RoPE and causal SDPA, under sequence and/or tensor parallelism.

Activations enter and leave sequence-sharded: [B, S/(tp*sp), H] per rank.
- Tensor parallelism (Megatron with sequence parallelism): all-gather the sequence over tp,
  column-parallel q/k/v (heads split over tp), row-parallel output, reduce-scatter back.
- Sequence parallelism (Ulysses, as MegaScale-MoE runs attention): project q/k/v on the local
  sequence shard, all-to-all to trade the sequence shard for a head shard, run full-sequence
  causal attention on heads/sp, all-to-all back. Attention weights stay whole on every sp rank
  (their gradients are summed over sp), so no weight traffic, only activations.
MLA models (DeepSeek) are run as plain GQA with the spec's heads/kv_heads/head_dim: the runtime
measures the parallel structure, not MLA's low-rank projections (documented assumption).
precision fp8: q/k/v and the output projection are FP8 GEMMs (runtime.fp8_linear; x cast once for
q, k and v); the attention core stays 16-bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from perfmodel.specs import ModelSpec
from runtime import fp8_linear
from runtime import parallel_ops as comm
from runtime.groups import Parallel
from runtime.params import REPLICATED, Placement, make_param
from runtime.spans import span


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of x [B, S, heads, D] at absolute positions [S]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    ang = positions.to(torch.float32)[:, None] * inv[None, :]  # [S, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rot = torch.cat([-x2, x1], -1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


def _core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA on [B, S, h, D] (k/v already repeated to h heads)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, par: Parallel, prefix: str, seed: int, selective_recompute: bool = False,
                 precision: str = "bf16", fp8_recipe: str = "tensorwise"):
        super().__init__()
        self.fp8 = fp8_linear.recipe_of(precision, fp8_recipe)
        self.par, self.seq_len = par, spec.seq_len
        nh, nkv, d, h = spec.heads, spec.kv_heads, spec.head_dim, spec.hidden
        tp, ti = par.size("tp"), par.index("tp")
        self.d, self.nhl = d, nh // tp
        col = Placement(reduce=("sp",), shard_group="dp", shard=(0, ti, tp))
        std = 0.02
        self.wq = make_param(f"{prefix}.wq", (nh * d, h), seed, std, col)
        # kv heads split over tp when they divide it; otherwise (tp a multiple of kv_heads) every tp
        # rank computes all kv heads and keeps the one its q heads use, so k/v weights are
        # replicated over tp and their gradients summed there
        self.kv_sharded = nkv % tp == 0
        kv_place = col if self.kv_sharded else REPLICATED
        self.wk = make_param(f"{prefix}.wk", (nkv * d, h), seed, std, kv_place)
        self.wv = make_param(f"{prefix}.wv", (nkv * d, h), seed, std, kv_place)
        group = nh // nkv
        if self.kv_sharded:
            self.kv_slice = (0, nkv // tp)
        else:
            self.kv_slice = ((ti * self.nhl) // group, ((ti + 1) * self.nhl - 1) // group + 1)
        row = Placement(reduce=("sp",), shard_group="dp", shard=(1, ti, tp))
        self.wo = make_param(f"{prefix}.wo", (h, nh * d), seed, std / (2 * spec.layers) ** 0.5, row)
        self.selective_recompute = selective_recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        par = self.par
        tp_pg, sp_pg, sp = par.pg("tp"), par.pg("sp"), par.size("sp")
        with span("attn.tp_ag/fwd"):
            x = comm.all_gather(x, 1, tp_pg)  # [B, S/sp, H]
        b, s, _ = x.shape
        with span("attn.qkv/fwd"):
            xq = fp8_linear.cast_input(x, self.fp8, "attn.qkv") if self.fp8 else None
            q = self._linear(x, self.wq, "attn.qkv", xq).view(b, s, self.nhl, self.d)
            k = self._linear(x, self.wk, "attn.qkv", xq).view(b, s, -1, self.d)[:, :, self.kv_slice[0]:self.kv_slice[1]]
            v = self._linear(x, self.wv, "attn.qkv", xq).view(b, s, -1, self.d)[:, :, self.kv_slice[0]:self.kv_slice[1]]
            pos = torch.arange(s, device=x.device) + par.index("sp") * s
            q, k = rope(q, pos), rope(k, pos)
            nkvl = k.shape[2]
            if nkvl % sp:  # too few kv heads to split over sp: repeat them up to the q heads
                k = k.repeat_interleave(self.nhl // nkvl, dim=2)
                v = v.repeat_interleave(self.nhl // nkvl, dim=2)
        with span("attn.sp_a2a_in/fwd"):
            q, k, v = _qkv_to_heads(q, k, v, sp_pg, sp)  # [B, S, heads/sp, D]
        with span("attn.core/fwd"):
            rep = q.shape[2] // k.shape[2]
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
            if self.selective_recompute and torch.is_grad_enabled():
                o = checkpoint(_core, q, k, v, use_reentrant=False)
            else:
                o = _core(q, k, v)
        with span("attn.sp_a2a_out/fwd"):
            o = comm.heads_to_seq(o, sp_pg)  # [B, S/sp, heads_local, D]
        with span("attn.proj/fwd"):
            y = self._linear(o.reshape(b, s, self.nhl * self.d), self.wo, "attn.proj")  # partial sums over tp
        with span("attn.tp_rs/fwd"):
            return comm.reduce_scatter(y, 1, tp_pg)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, op: str, xq: fp8_linear.FP8Act | None = None) -> torch.Tensor:
        return fp8_linear.linear(x, w, self.fp8, op, xq) if self.fp8 else F.linear(x, w)


def _qkv_to_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, n: int):
    """Ulysses for q, k and v in ONE all-to-all (one synchronisation, not three): peer i's chunk is
    its q heads, then its k heads, then its v heads; pure data movement, so results are identical."""
    if n == 1:
        return q, k, v
    b, s, _, d = q.shape
    widths = [t.shape[2] // n for t in (q, k, v)]
    packed = torch.cat([t.reshape(b, s, n, w, d) for t, w in zip((q, k, v), widths, strict=True)], dim=3)
    y = comm.seq_to_heads(packed.reshape(b, s, n * sum(widths), d), group)  # [B, S*n, sum(widths), D]
    return y.split(widths, dim=2)
