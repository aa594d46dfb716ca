"""An op of the op graph (a GEMM, attention core, memory-bound kernel or collective on a representative
rank, one micro-batch), the builders of the forward ops, and how a layer's backward (dgrad, wgrad,
recompute) derives from its forward. perfmodel.sim.opgraph assembles the layers from these."""

from __future__ import annotations

from dataclasses import dataclass, field

from perfmodel.specs.opnames import OP_NAMES

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
class Builder:
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


def backward_of(fwd: list[Op], recompute: str) -> list[Op]:
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
