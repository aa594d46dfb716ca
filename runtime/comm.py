"""Compressed and overlappable collectives for the MoE runtime (gloo on CPU, NCCL on GPU).

- ``all_to_all(x, in_splits, out_splits, group, wire=...)``: token dispatch/combine with uneven
  row splits.  ``wire="fp8"`` quantizes each row (or 1 x ``block`` group) to e4m3 with fp32
  scales and ships payload + scales as raw bytes (gloo has no fp8 dtype, and a byte buffer
  keeps one code path for both backends); ``"bf16"`` ships bf16; ``"native"`` the input dtype.
  ``all_to_all_fp8`` / ``all_to_all_bf16`` are shorthands.
- ``reduce_scatter(grad, group, wire=...)`` / ``all_reduce(...)``: gradient sync of fp32 grads;
  ``wire=torch.bfloat16`` sends bf16 and sums in fp32 (MegaScale-MoE's FP32 -> BF16 compression):
  reduce-scatter is an all-to-all of bf16 shards followed by a local fp32 sum, all-reduce adds an
  all-gather of the bf16-rounded shard.  ``reduce_scatter_bf16`` / ``all_reduce_bf16`` are shorthands.
- ``all_to_all_autograd``: differentiable all-to-all (fp8/bf16 forward, grads sent back with
  swapped splits in ``grad_wire``), what the dispatcher calls inside the model;
  ``all_to_all_autograd_async`` returns a handle whose ``wait()`` gives the differentiable output.
- Every ``*_async`` variant returns a ``Pending`` whose ``wait()`` gives the result, so the
  caller can compute (shared expert, another micro-batch chunk) while bytes move.

Byte accounting: every call adds to a ``CommStats`` (the module-level ``STATS`` unless one is
passed) the bytes this rank puts on the wire to *other* ranks: payload plus scales, its own
chunk excluded.  For ring-equivalent collectives that is (W-1)/W of the buffer per phase,
which is what the simulator prices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from runtime.spans import span

WIRES = ("native", "bf16", "fp8")


@dataclass
class CommStats:
    """Bytes sent (and calls made) per op name; ``bytes_sent[name]`` is what tests and traces read."""

    bytes_sent: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, nbytes: int) -> None:
        self.bytes_sent[name] = self.bytes_sent.get(name, 0) + int(nbytes)
        self.calls[name] = self.calls.get(name, 0) + 1

    def total(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()


STATS = CommStats()


@dataclass
class Pending:
    """An in-flight collective: ``wait()`` blocks, post-processes (dequantize, sum) and returns."""

    work: object | None
    finish: Callable[[], torch.Tensor]
    bytes_sent: int

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.finish()


def _rank_world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _splits(s: Sequence[int] | torch.Tensor) -> list[int]:
    return [int(v) for v in (s.tolist() if isinstance(s, torch.Tensor) else s)]


def exchange_splits(in_splits: Sequence[int] | torch.Tensor, group=None,
                    stats: CommStats | None = None) -> list[int]:
    """Rows this rank sends to each peer -> rows it will receive from each (a tiny all-to-all)."""
    _, world = _rank_world(group)
    send = torch.tensor(_splits(in_splits), dtype=torch.int64)
    if send.numel() != world:
        raise ValueError(f"exchange_splits: {send.numel()} splits for a group of {world} ranks")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    send = send.to(device) if device is not None else send
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    (stats or STATS).add("exchange_splits", 8 * (world - 1))
    return _splits(recv.cpu())


# ------------------------------------------------------------------ all-to-all


def _kernel_backend(backend: str, device: torch.device) -> str:
    """The fp8 (de)quantization backend of a wire: "auto" means the compiled Triton kernels on CUDA
    and torch everywhere else.  It never picks the Triton CPU *interpreter*, even when
    TRITON_INTERPRET=1 is set (the kernel tests set it, and every process they start inherits it):
    interpreting the kernels costs seconds per call, which turns a few-second CPU training step into
    minutes that look like a hang.  Pass backend="triton" to interpret them on purpose."""
    return "torch" if backend == "auto" and device.type != "cuda" else backend


def _pack(x: torch.Tensor, wire: str, block: int | None, backend: str) -> tuple[torch.Tensor, int]:
    """Rows of x -> a [rows, bytes_per_row] uint8 buffer in the wire format; returns it and bytes/row."""
    if wire == "fp8":
        from runtime.kernels.fp8 import quantize_fp8

        q, scale = quantize_fp8(x, block, _kernel_backend(backend, x.device))
        groups = 1 if block is None else -(-x.shape[1] // block)
        scale = scale.reshape(x.shape[0], groups).contiguous()
        buf = torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], dim=1)
    else:
        y = x.to(torch.bfloat16) if wire == "bf16" else x
        buf = y.contiguous().view(torch.uint8)  # [rows, cols * element_size]
    return buf, buf.shape[1]


def _unpack(buf: torch.Tensor, cols: int, dtype: torch.dtype, wire: str, block: int | None,
            backend: str, keep: list | None = None) -> torch.Tensor:
    rows = buf.shape[0]
    if wire == "fp8":
        from runtime.kernels.fp8 import FP8_DTYPE, dequantize_fp8

        q = buf[:, :cols].contiguous().view(FP8_DTYPE)
        scale = buf[:, cols:].contiguous().view(torch.float32)
        scale = scale.reshape(rows) if block is None else scale
        if keep is not None:  # the receiver's FP8 GEMM reads payload and scales as they came
            keep.append((q, scale))
        return dequantize_fp8(q, scale, block, dtype, _kernel_backend(backend, buf.device))
    wire_dtype = torch.bfloat16 if wire == "bf16" else dtype
    return buf.contiguous().view(wire_dtype).to(dtype)


def all_to_all_async(x: torch.Tensor, in_splits, out_splits, group=None, wire: str = "native",
                     block: int | None = None, stats: CommStats | None = None, name: str = "all_to_all",
                     backend: str = "auto", keep: list | None = None) -> Pending:
    """Start an all-to-all of the rows of x [rows, H]; ``in_splits[j]`` rows go to rank j.
    ``keep`` (fp8 wire): ``wait()`` also appends the received (e4m3 payload, fp32 scales) to it."""
    if wire not in WIRES:
        raise ValueError(f"wire must be one of {WIRES}, got {wire!r}")
    if x.dim() != 2:
        raise ValueError(f"all_to_all: x must be [rows, H], got {tuple(x.shape)}")
    ins, outs = _splits(in_splits), _splits(out_splits)
    rank, world = _rank_world(group)
    if len(ins) != world or len(outs) != world or sum(ins) != x.shape[0]:
        raise ValueError(f"all_to_all: splits {ins} -> {outs} do not fit {x.shape[0]} rows on {world} ranks")
    cols, dtype = x.shape[1], x.dtype
    quant, dequant = _quant_spans(name, wire)
    with span(quant):
        buf, row_bytes = _pack(x, wire, block, backend)
    out = torch.empty(sum(outs), row_bytes, dtype=torch.uint8, device=x.device)
    work = dist.all_to_all_single(out, buf, outs, ins, group=group, async_op=True)
    nbytes = (sum(ins) - ins[rank]) * row_bytes
    (stats or STATS).add(name, nbytes)

    def finish() -> torch.Tensor:
        with span(dequant):
            return _unpack(out, cols, dtype, wire, block, backend, keep)

    return Pending(work, finish, nbytes)


# the op graph prices fp8 (de)quantization as memory ops of their own: profiled under these names
# (nested in the all-to-all's span; the trace reader counts time exclusively) they calibrate as such
_QUANT_OPS = {"moe.dispatch_a2a": ("moe.dispatch_quant", "moe.dispatch_dequant"),
              "moe.combine_a2a": ("moe.combine_quant", "moe.combine_dequant")}


def _quant_spans(name: str, wire: str) -> tuple[str | None, str | None]:
    op, _, phase = name.partition("/")
    if wire != "fp8" or op not in _QUANT_OPS or phase not in ("fwd", ""):
        return None, None
    return tuple(f"{n}/fwd" for n in _QUANT_OPS[op])  # type: ignore[return-value]


def all_to_all(x: torch.Tensor, in_splits, out_splits, group=None, wire: str = "native",
               block: int | None = None, stats: CommStats | None = None, name: str = "all_to_all",
               backend: str = "auto") -> tuple[torch.Tensor, int]:
    """Blocking all-to-all -> (received rows [sum(out_splits), H] in x.dtype, bytes sent)."""
    p = all_to_all_async(x, in_splits, out_splits, group, wire, block, stats, name, backend)
    return p.wait(), p.bytes_sent


def all_to_all_fp8(x, in_splits, out_splits, group=None, block: int | None = None,
                   stats: CommStats | None = None, name: str = "all_to_all_fp8", backend: str = "auto"):
    """FP8 e4m3 payload + fp32 scales per token (or per ``block`` columns) -> (y, bytes_sent)."""
    return all_to_all(x, in_splits, out_splits, group, "fp8", block, stats, name, backend)


def all_to_all_bf16(x, in_splits, out_splits, group=None, stats: CommStats | None = None,
                    name: str = "all_to_all_bf16"):
    return all_to_all(x, in_splits, out_splits, group, "bf16", None, stats, name)


class _AllToAllFunction(torch.autograd.Function):
    """y = all_to_all(x) in ``wire``; backward sends dy back along the reversed splits in ``grad_wire``.

    FP8 rounding is treated as straight-through: its derivative is zero almost everywhere, and the
    gradient of the dequantized activations is what the sender's graph needs.
    """

    @staticmethod
    def forward(ctx, x, in_splits, out_splits, group, wire, grad_wire, block, stats, name, backend, keep=None):
        ctx.meta = (in_splits, out_splits, group, grad_wire, stats, name, backend)
        y = all_to_all_async(x, in_splits, out_splits, group, wire, block, stats, name + "/fwd", backend,
                             keep).wait()
        return y

    @staticmethod
    def backward(ctx, dy):
        in_splits, out_splits, group, grad_wire, stats, name, backend = ctx.meta
        dx, _ = all_to_all(dy.contiguous(), out_splits, in_splits, group, grad_wire, None, stats,
                           name + "/bwd", backend)
        return dx, *([None] * 10)


def all_to_all_autograd(x: torch.Tensor, in_splits, out_splits, group=None, wire: str = "fp8",
                        grad_wire: str = "bf16", block: int | None = None, stats: CommStats | None = None,
                        name: str = "all_to_all", backend: str = "auto", keep: list | None = None) -> torch.Tensor:
    """Differentiable all-to-all; bytes land in stats under ``name/fwd`` and ``name/bwd``; ``keep``:
    see all_to_all_async."""
    if grad_wire == "fp8":
        raise ValueError("grad_wire='fp8' is not supported: gradients go as bf16 or native")
    return _AllToAllFunction.apply(x, _splits(in_splits), _splits(out_splits), group, wire, grad_wire, block,
                                   stats or STATS, name, backend, keep)


@dataclass
class _InFlight:
    """What the start half of an async autograd all-to-all hands to the wait half."""

    pending: Pending | None = None


class _AllToAllStart(torch.autograd.Function):
    """Launches the forward all-to-all and returns the (not yet filled) output buffer; its
    backward is the reverse all-to-all of the gradient, as in _AllToAllFunction."""

    @staticmethod
    def forward(ctx, x, in_splits, out_splits, group, wire, grad_wire, block, stats, name, backend, state):
        ctx.meta = (in_splits, out_splits, group, grad_wire, stats, name, backend)
        state.pending = all_to_all_async(x, in_splits, out_splits, group, wire, block, stats, name + "/fwd", backend)
        return x.new_empty(sum(out_splits), x.shape[1])

    @staticmethod
    def backward(ctx, dy):
        return _AllToAllFunction.backward(ctx, dy)[:1] + (None,) * 10


class _AllToAllWait(torch.autograd.Function):
    """Waits, fills the buffer in place (so autograd links it to the start half); identity backward."""

    @staticmethod
    def forward(ctx, buf, state):
        buf.copy_(state.pending.wait())
        state.pending = None
        ctx.mark_dirty(buf)
        return buf

    @staticmethod
    def backward(ctx, dy):
        return dy, None


@dataclass
class AllToAllHandle:
    """An in-flight differentiable all-to-all: compute something independent, then ``wait()``."""

    buf: torch.Tensor
    state: _InFlight

    def wait(self) -> torch.Tensor:
        return _AllToAllWait.apply(self.buf, self.state)


def all_to_all_autograd_async(x: torch.Tensor, in_splits, out_splits, group=None, wire: str = "fp8",
                              grad_wire: str = "bf16", block: int | None = None, stats: CommStats | None = None,
                              name: str = "all_to_all", backend: str = "auto") -> AllToAllHandle:
    """Like all_to_all_autograd, but returns at once; the forward transfer overlaps whatever the
    caller computes before ``handle.wait()`` (e.g. the shared expert).  Backward stays blocking."""
    if grad_wire == "fp8":
        raise ValueError("grad_wire='fp8' is not supported: gradients go as bf16 or native")
    state = _InFlight()
    buf = _AllToAllStart.apply(x, _splits(in_splits), _splits(out_splits), group, wire, grad_wire, block,
                               stats or STATS, name, backend, state)
    return AllToAllHandle(buf, state)


# ------------------------------------------------------------------ gradient sync


def _wire_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def reduce_scatter_async(grad: torch.Tensor, group=None, wire_dtype: torch.dtype = torch.float32,
                         stats: CommStats | None = None, name: str = "reduce_scatter") -> Pending:
    """Start a reduce-scatter of a flat fp32 gradient; ``wait()`` gives this rank's summed shard.

    Shard r covers elements [r*S, (r+1)*S) of grad zero-padded to W*S, S = ceil(numel / W).
    Done as an all-to-all of wire-dtype chunks + an fp32 sum, so the compressed and uncompressed
    variants move exactly wire-size bytes and sum identically (gloo also lacks reduce-scatter
    on older torch).
    """
    rank, world = _rank_world(group)
    flat = grad.reshape(-1)
    shard = -(-flat.numel() // world)
    padded = torch.zeros(world * shard, dtype=wire_dtype, device=flat.device)
    padded[: flat.numel()] = flat.to(wire_dtype)
    send = _wire_bytes(padded)
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    nbytes = (world - 1) * shard * padded.element_size()
    (stats or STATS).add(name, nbytes)

    def finish() -> torch.Tensor:
        chunks = recv.view(wire_dtype).view(world, shard)
        return chunks.to(torch.float32).sum(dim=0).to(grad.dtype)

    return Pending(work, finish, nbytes)


def reduce_scatter(grad: torch.Tensor, group=None, wire_dtype: torch.dtype = torch.float32,
                   stats: CommStats | None = None, name: str = "reduce_scatter") -> tuple[torch.Tensor, int]:
    p = reduce_scatter_async(grad, group, wire_dtype, stats, name)
    return p.wait(), p.bytes_sent


def reduce_scatter_bf16(grad: torch.Tensor, group=None, stats: CommStats | None = None,
                        name: str = "reduce_scatter_bf16") -> tuple[torch.Tensor, int]:
    return reduce_scatter(grad, group, torch.bfloat16, stats, name)


def all_reduce_async(grad: torch.Tensor, group=None, wire_dtype: torch.dtype = torch.float32,
                     average: bool = False, stats: CommStats | None = None, name: str = "all_reduce") -> Pending:
    """Start an all-reduce; ``wait()`` gives the full summed (or averaged) tensor in grad's dtype/shape.

    fp32 wire: the backend's native all-reduce (ring-equivalent bytes recorded).  bf16 wire:
    reduce-scatter of bf16 chunks with an fp32 sum, then an all-gather of the bf16-rounded shards.
    """
    rank, world = _rank_world(group)
    st = stats or STATS
    shard = -(-grad.numel() // world)
    elem = torch.empty((), dtype=wire_dtype).element_size()
    nbytes = 2 * (world - 1) * shard * elem
    if wire_dtype == grad.dtype:
        buf = grad.detach().clone().contiguous()
        work = dist.all_reduce(buf, group=group, async_op=True)
        st.add(name, nbytes)
        return Pending(work, lambda: buf / world if average else buf, nbytes)
    rs = reduce_scatter_async(grad, group, wire_dtype, CommStats(), name)

    def finish() -> torch.Tensor:
        mine = rs.wait().to(wire_dtype)
        gathered = [torch.empty_like(_wire_bytes(mine)) for _ in range(world)]
        dist.all_gather(gathered, _wire_bytes(mine), group=group)
        full = torch.cat([g.view(wire_dtype) for g in gathered])[: grad.numel()].to(grad.dtype)
        full = full.view_as(grad)
        return full / world if average else full

    st.add(name, nbytes)
    return Pending(None, finish, nbytes)


def all_reduce(grad: torch.Tensor, group=None, wire_dtype: torch.dtype = torch.float32, average: bool = False,
               stats: CommStats | None = None, name: str = "all_reduce") -> tuple[torch.Tensor, int]:
    p = all_reduce_async(grad, group, wire_dtype, average, stats, name)
    return p.wait(), p.bytes_sent


def all_reduce_bf16(grad: torch.Tensor, group=None, average: bool = False, stats: CommStats | None = None,
                    name: str = "all_reduce_bf16") -> tuple[torch.Tensor, int]:
    return all_reduce(grad, group, torch.bfloat16, average, stats, name)


def step_bytes(stats: CommStats | None = None, device=None) -> dict[str, int]:
    """Bytes the whole job sent since ``stats`` was last reset (summed over ranks when distributed):
    ``a2a_bytes`` (MoE dispatch + combine all-to-alls, forward and backward), ``a2a_fwd_bytes``
    (forward only: where fp8 applies) and ``grad_sync_bytes`` (data-parallel gradient sync)."""
    b = (stats or STATS).bytes_sent
    a2a = [v for k, v in b.items() if k.startswith(("moe.dispatch_a2a", "moe.combine_a2a"))]
    fwd = [v for k, v in b.items() if k.startswith(("moe.dispatch_a2a", "moe.combine_a2a")) and k.endswith("/fwd")]
    t = torch.tensor([sum(a2a), sum(fwd), b.get("dp.grad_sync", 0)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return {"a2a_bytes": int(t[0]), "a2a_fwd_bytes": int(t[1]), "grad_sync_bytes": int(t[2])}
