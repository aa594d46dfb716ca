"""The one list of op names, shared by the op graph, the simulator, the runtime
(`record_function` names) and calibration. Extend it, never fork it.

A traced/simulated event is named `<op>/<phase>`, e.g. `moe.fc1/wgrad`.
"""

OP_NAMES: tuple[str, ...] = (
    "embed.lookup",
    "attn.norm", "attn.tp_ag", "attn.qkv", "attn.sp_a2a_in", "attn.core", "attn.sp_a2a_out",
    "attn.proj", "attn.tp_rs",
    "moe.norm", "moe.router", "moe.aux_ar", "moe.permute", "moe.dispatch_counts", "moe.dispatch_a2a", "moe.etp_ag", "moe.fc1", "moe.act",
    "moe.fc2", "moe.etp_rs", "moe.combine_a2a", "moe.unpermute", "moe.shared",
    "ffn.norm", "ffn.tp_ag", "ffn.fc1", "ffn.act", "ffn.fc2", "ffn.tp_rs",  # dense (non-MoE) layers
    "head.norm", "head.proj", "head.loss",
    # FP8 compression around the token all-to-alls (quantize before sending, dequantize after)
    "moe.dispatch_quant", "moe.dispatch_dequant", "moe.combine_quant", "moe.combine_dequant",
    # precision: fp8 -- the cast of each FP8 GEMM's input (fwd: amax/scale, quantize, transposed copy;
    # dgrad: the same for its output gradient) and the per-step FP8 copies of the weights
    "attn.qkv_quant", "attn.proj_quant", "moe.fc1_quant", "moe.fc2_quant", "moe.shared_quant",
    "ffn.fc1_quant", "ffn.fc2_quant", "optim.fp8_cast",
    "dp.grad_sync", "dp.param_gather", "pp.send", "pp.recv", "optim.step",
)
PHASES: tuple[str, ...] = ("fwd", "dgrad", "wgrad", "recompute")
OP_KINDS: tuple[str, ...] = ("gemm", "attention", "memory", "comm")
COLLECTIVES: tuple[str, ...] = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce", "send_recv")
# dp_sp: ranks holding replicas of the non-expert weights (same tp coordinate and stage)
# tp_sp: ranks holding shards of the same sequences (same dp coordinate and stage)
GROUP_KINDS: tuple[str, ...] = ("tp", "sp", "dp", "pp", "ep", "etp", "edp", "dp_sp", "tp_sp")


def event_name(op: str, phase: str) -> str:
    assert op in OP_NAMES, op
    return f"{op}/{phase}"


def split_event_name(name: str) -> tuple[str, str] | None:
    """`moe.fc1/wgrad` -> ("moe.fc1", "wgrad"); None for names outside the list."""
    op, _, phase = name.partition("/")
    if op in OP_NAMES and (phase in PHASES or phase == ""):
        return op, phase or "fwd"
    return None
