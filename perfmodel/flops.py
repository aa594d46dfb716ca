"""Training FLOPs per token under the counting conventions published runs use.

A paper that reports MFU or TFLOP/s per GPU divided a FLOP count it chose by the step time; to
turn its figure back into tokens/s (perfmodel.published) the same count must be used. Every
convention counts one token of a full training step (forward + backward = 3x the forward
GEMMs), without recomputation. The simulator's own count of useful FLOPs is
`OpGraph.model_flops_per_iteration` (op by op); these are the closed forms of the papers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from perfmodel.specs import ModelSpec

FlopConvention = Literal["megatron-lm", "palm", "6n-active"]


def _ffn_widths(model: ModelSpec) -> float:
    """Sum over layers of the FFN width a token passes through (routed top_k experts + shared, or dense)."""
    moe_width = 0.0
    if model.moe:
        moe_width = model.moe.top_k * model.moe.expert_ffn_hidden + model.shared_ffn_hidden
    return model.n_moe_layers * moe_width + model.n_dense_layers * (model.dense_ffn_hidden or 0)


def megatron_lm(model: ModelSpec) -> float:
    """Megatron-LM's `num_floating_point_operations` (training.py, releases core_r0.8..core_r0.11, 2024 -
    early 2025), per token:
        12 L h^2 [ (1 + g/a + s/h) q/h  +  gl * ffn topk / h  +  gl * shared / h  +  V / (2 L h) ]
    with q = heads x head_dim (query projection), g/a = kv_heads / heads, s = sequence length (the
    attention score term counted non-causal: the full s x s matrix), gl = 3/2 for a gated (SwiGLU) FFN
    else 1, the logits counted, the router and norms not. Source: github.com/NVIDIA/Megatron-LM
    megatron/training/training.py (core_r0.10.0); arXiv 2104.04473 appendix for the 12x. The release of
    March 2025 onward halves the s/h term (causal); the papers using this count predate it.
    Layers of different FFNs (dense first layers, MoE every k-th) are summed layer by layer (the old
    formula assumed identical layers; for those it is the same number). MLA is counted as multi-head
    attention with the model's heads x head_dim (Megatron's MLA terms came later)."""
    L, h, s = model.layers, model.hidden, model.seq_len
    q = model.heads * model.head_dim
    gated = 1.5 if model.gated_ffn else 1.0
    attn = L * (1 + model.kv_heads / model.heads + s / h) * q / h
    ffn = gated * _ffn_widths(model) / h
    logits = model.vocab / (2 * h)
    return 12 * h * h * (attn + ffn + logits)


def palm(model: ModelSpec) -> float:
    """PaLM's 6N + 12 L H Q T (arXiv 2204.02311 appendix B), as torchtitan computes it
    (torchtitan/models/utils.py get_num_flop_per_token, arXiv 2410.06511): N = the parameters a token
    touches except the input embedding (the output projection counted), H heads, Q head dim, T the
    sequence length (attention counted non-causal)."""
    n = model.params_active - model.vocab * model.hidden
    return 6 * n + 12 * model.layers * model.heads * model.head_dim * model.seq_len


def six_n_active(model: ModelSpec) -> float:
    """Plain 6N with N the activated parameters (embeddings included), the count MoE reports quote as
    "N activated parameters" (e.g. DeepSeek-V3's 37B); attention's s x s work not counted."""
    return 6.0 * model.params_active


CONVENTIONS: dict[str, Callable[[ModelSpec], float]] = {
    "megatron-lm": megatron_lm,
    "palm": palm,
    "6n-active": six_n_active,
}


def flops_per_token(model: ModelSpec, convention: str) -> float:
    """Training FLOPs per token of `model` under a named convention (KeyError for an unknown name)."""
    return CONVENTIONS[convention](model)
