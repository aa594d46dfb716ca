"""Compressed collectives on 2 and 4 gloo ranks (spawned processes, 60 s limit each)."""

import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runtime import comm

H = 256  # row width: fp8 rows cost H + 4 bytes against 2H for bf16 and 4H for fp32
TIMEOUT_S = 180  # spawning 4 torch ranks takes a minute on 2 cores when the suite shares them


def _split_matrix(world: int) -> torch.Tensor:
    """splits[i][j] = rows rank i sends rank j; every rank derives the same matrix, with zeros."""
    g = torch.Generator().manual_seed(1234)
    m = torch.randint(0, 9, (world, world), generator=g)
    m[0, world - 1] = 0
    m[world - 1, 0] = 0
    return m


def _rows(rank: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    # magnitudes spread over 6 decades so per-token scales matter
    return torch.randn(n, H, generator=g) * torch.logspace(-3, 3, max(n, 1))[:n, None]


def _grad(rank: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + rank))


def _within_fp8(y: torch.Tensor, ref: torch.Tensor) -> bool:
    scale = ref.abs().amax(dim=1, keepdim=True) / 448.0
    return bool(torch.all((y - ref).abs() <= 2.0**-4 * ref.abs() + 2.0**-10 * scale + 1e-30))


def _check_all_to_all(rank: int, world: int) -> None:
    sm = _split_matrix(world)
    ins, outs = sm[rank].tolist(), sm[:, rank].tolist()
    x = _rows(rank, sum(ins))
    # expected: rank i's block for me, in rank order
    parts = []
    for i in range(world):
        xi = _rows(i, int(sm[i].sum()))
        start = int(sm[i, :rank].sum())
        parts.append(xi[start:start + int(sm[i, rank])])
    expected = torch.cat(parts)
    stats = comm.CommStats()
    assert comm.exchange_splits(ins, stats=stats) == outs
    y32, b32 = comm.all_to_all(x, ins, outs, stats=stats, name="a2a_fp32")
    y16, b16 = comm.all_to_all_bf16(x, ins, outs, stats=stats, name="a2a_bf16")
    y8, b8 = comm.all_to_all_fp8(x, ins, outs, stats=stats, name="a2a_fp8", backend="torch")
    y8b, b8b = comm.all_to_all_fp8(x, ins, outs, block=128, stats=stats, name="a2a_fp8_b128", backend="torch")
    assert torch.equal(y32, expected)
    assert torch.allclose(y16, expected, rtol=2.0**-8, atol=0)
    assert _within_fp8(y8, expected) and _within_fp8(y8b, expected)
    sent_rows = sum(ins) - ins[rank]
    assert (b32, b16, b8, b8b) == (sent_rows * H * 4, sent_rows * H * 2, sent_rows * (H + 4), sent_rows * (H + 8))
    assert stats.bytes_sent["a2a_fp8"] == b8 and stats.calls["a2a_fp32"] == 1
    if sent_rows:
        assert b8 / b16 <= 0.5 + 2 / H + 1e-9  # half of bf16, plus the fp32 scale per token
        assert b8 / b32 <= 0.25 + 1 / H + 1e-9
    # async gives the same answer once waited on
    pend = comm.all_to_all_async(x, ins, outs, wire="fp8", stats=stats, backend="torch")
    assert torch.equal(pend.wait(), y8)


def _check_autograd(rank: int, world: int) -> None:
    sm = _split_matrix(world)
    ins, outs = sm[rank].tolist(), sm[:, rank].tolist()
    x = _rows(rank, sum(ins)).requires_grad_()
    w = torch.randn(sum(outs), H, generator=torch.Generator().manual_seed(7 + rank))
    stats = comm.CommStats()
    y = comm.all_to_all_autograd(x, ins, outs, wire="fp8", grad_wire="native", stats=stats, name="dispatch",
                                 backend="torch")
    (y * w).sum().backward()
    # the gradient of x is w sent back along the reversed splits (fp8 is straight-through)
    back, _ = comm.all_to_all(w, outs, ins)
    assert torch.equal(x.grad, back)
    assert set(stats.bytes_sent) == {"dispatch/fwd", "dispatch/bwd"}
    # the async form: same output and gradient, with compute allowed between start and wait
    x2 = x.detach().clone().requires_grad_()
    handle = comm.all_to_all_autograd_async(x2, ins, outs, wire="fp8", grad_wire="native", stats=stats,
                                            name="dispatch_async", backend="torch")
    independent = torch.randn(64, 64) @ torch.randn(64, 64)  # stands in for the shared expert
    y2 = handle.wait()
    assert torch.equal(y2, y.detach()) and independent.shape == (64, 64)
    (y2 * w).sum().backward()
    assert torch.equal(x2.grad, back)
    assert stats.bytes_sent["dispatch_async/fwd"] == stats.bytes_sent["dispatch/fwd"]


def _check_grad_sync(rank: int, world: int) -> None:
    n = 1000 + 3  # not a multiple of the world size: exercises padding
    g = _grad(rank, n)
    total = sum(_grad(i, n).double() for i in range(world))
    stats = comm.CommStats()
    shard = -(-n // world)
    lo, hi = rank * shard, min((rank + 1) * shard, n)
    rs32, b32 = comm.reduce_scatter(g, stats=stats)
    rs16, b16 = comm.reduce_scatter_bf16(g, stats=stats)
    assert rs32.shape == (shard,) and torch.allclose(rs32[: hi - lo].double(), total[lo:hi], atol=1e-5)
    # bf16 rounding of each addend: <= 2^-9 relative each, summed exactly in fp32
    bound = world * 2.0**-8 * max(_grad(i, n).abs().max() for i in range(world))
    assert (rs16[: hi - lo].double() - total[lo:hi]).abs().max() <= bound
    assert b16 * 2 == b32 == (world - 1) * shard * 4
    ar32, a32 = comm.all_reduce(g, stats=stats)
    ar16, a16 = comm.all_reduce_bf16(g, average=True, stats=stats)
    assert torch.allclose(ar32.double(), total, atol=1e-5)
    assert (ar16.double() - total / world).abs().max() <= 2 * bound / world
    assert a16 * 2 == a32 == 2 * (world - 1) * shard * 4
    assert stats.bytes_sent["all_reduce_bf16"] == a16


def _worker(rank: int, world: int, init_file: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=TIMEOUT_S))
    try:
        _check_all_to_all(rank, world)
        _check_autograd(rank, world)
        _check_grad_sync(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, timeout_s: float = TIMEOUT_S) -> None:
    """Spawn ``world`` gloo ranks running fn(rank, world, init_file); fail (not hang) past the timeout."""
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(fn, args=(world, os.path.join(d, "init")), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    pytest.fail(f"{world} ranks did not finish within {timeout_s} s")
        finally:  # timeout, a failed rank, pytest-timeout or Ctrl-C: no rank outlives the test
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_on_gloo_ranks(world):
    run_ranks(_worker, world)


def test_comm_stats_accumulates_per_name():
    s = comm.CommStats()
    s.add("a", 10)
    s.add("a", 5)
    s.add("b", 1)
    assert s.bytes_sent == {"a": 15, "b": 1} and s.calls == {"a": 2, "b": 1} and s.total() == 16
    s.reset()
    assert s.total() == 0


def test_unknown_wire_is_rejected():
    with pytest.raises(ValueError, match="wire must be one of"):
        comm.all_to_all_async(torch.zeros(1, 1), [1], [1], wire="int4")


def test_fp8_wire_never_picks_the_triton_interpreter():
    # "auto" on a CPU tensor is torch even under TRITON_INTERPRET=1 (set by the kernel tests and inherited
    # by the ranks they launched: the interpreted kernels made a 30-step fp8 run take tens of minutes)
    assert comm._kernel_backend("auto", torch.device("cpu")) == "torch"
    assert comm._kernel_backend("auto", torch.device("cuda", 0)) == "auto"  # compiled Triton on GPU
    assert comm._kernel_backend("triton", torch.device("cpu")) == "triton"  # asked for explicitly
