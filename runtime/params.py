"""Parameters that know where they sit in the full (unsharded) model.

Every rank builds its parameters by generating the *full* tensor from a generator seeded
by (seed, parameter name) and keeping its slice. So a weight has the same values under
every plan, which is what makes the parallel-equivalence tests (any plan == one process)
possible, and it needs no broadcast at start-up. The cost is one full tensor at a time in
host memory during construction, which is fine for the model sizes a CPU/GPU test runs.

Each parameter carries:
  full_name   its name in the unsharded model (global layer index), used by checkpoints and tests
  shard       (dim, index, count): this rank holds chunk `index` of `count` along `dim`; None = whole
  reduce      group kinds whose gradients are summed by all-reduce (ranks holding the same slice
              but seeing different tokens, e.g. sp for attention weights)
  shard_group the data-parallel kind over which gradients are summed last and the optimizer
              state is sharded when plan.distributed_optimizer ("dp" or, for experts, "edp")
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Placement:
    reduce: tuple[str, ...]
    shard_group: str
    shard: tuple[int, int, int] | None = None
    decay: bool = True


REPLICATED = Placement(reduce=("tp", "sp"), shard_group="dp")  # same value on every rank of a stage


def full_tensor(name: str, shape: tuple[int, ...], seed: int, std: float | None) -> torch.Tensor:
    """The unsharded initial value of `name` (normal(0, std), or ones when std is None)."""
    if std is None:
        return torch.ones(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randn(shape, generator=gen) * std


def make_param(name: str, shape: tuple[int, ...], seed: int, std: float | None,
               place: Placement = REPLICATED) -> nn.Parameter:
    t = full_tensor(name, shape, seed, std)
    if place.shard is not None:
        dim, index, count = place.shard
        t = t.chunk(count, dim=dim)[index]
    p = nn.Parameter(t.contiguous())
    p.full_name = name  # type: ignore[attr-defined]
    p.place = place  # type: ignore[attr-defined]
    return p


def placement(p: nn.Parameter) -> Placement:
    return p.place  # type: ignore[attr-defined]
