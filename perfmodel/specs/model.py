"""The model spec: transformer shape, MoE (routing, groups), MLA."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from perfmodel.specs.base import NonNegFloat, NonNegInt, PosInt, Strict


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
