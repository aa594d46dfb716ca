"""Counting host round-trips (device -> host reads) in a training step, on the CPU.

On a GPU every read of a device value on the host (``.item()``, ``.tolist()``, ``.cpu()``,
``int(t)``/``float(t)``/``bool(t)``, an index taken from a tensor) stalls the host until the device
catches up; so do ops whose output size depends on the data (``nonzero``, ``bincount``,
``repeat_interleave`` without ``output_size``, boolean masks, ...). On the CPU nothing stalls, and
``torch.cuda.set_sync_debug_mode`` does nothing, so ``HostSyncCounter`` counts the calls that
WOULD stall: the Python methods (patched on torch.Tensor), plus, below autograd, the aten ops they
lower to (``_local_scalar_dense``: item/int/float/bool, also when C++ calls them; a copy to the CPU)
and the data-dependent-size ops (a TorchDispatchMode sees every op forward and backward run).
``events`` lists what was seen with the Python stack frame in the repository that caused it.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = str(Path(__file__).resolve().parents[2])
METHODS = ("tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")
# aten ops that read a device value on the host, or size their output from the data
ATEN_SYNC = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.nonzero_static.default",
             "aten.masked_select.default", "aten.bincount.default", "aten._unique2.default",
             "aten.unique_dim.default", "aten.unique_consecutive.default", "aten.histc.default",
             "aten.equal.default", "aten.is_nonzero.default"}


def _where() -> str:
    """The innermost frame of the repository's own code (runtime/, tests/) that led here."""
    for fr in reversed(traceback.extract_stack()[:-2]):
        f = fr.filename
        if f.startswith(ROOT) and "/.venv/" not in f and "site-packages" not in f and f != __file__:
            return f"{Path(f).relative_to(ROOT)}:{fr.lineno} {fr.name}"
    return "?"


class _Mode(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in ATEN_SYNC:
            self.counter.hit(f"aten:{name.removeprefix('aten.').removesuffix('.default')}")
        elif name.startswith("aten.repeat_interleave.Tensor") and kwargs.get("output_size") is None:
            self.counter.hit("aten:repeat_interleave without output_size")
        elif name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])):
            self.counter.hit("aten:index with a boolean mask")
        elif name.startswith("aten._to_copy") and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cpu":
            self.counter.hit("aten:copy to cpu")
        return func(*args, **kwargs)


class HostSyncCounter:
    """``with HostSyncCounter() as c: step()``; then ``c.count`` and ``c.events`` (kind, where)."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self._saved: dict[str, object] = {}
        self._mode = _Mode(self)
        self._inside = 0  # a patched method's own aten op is the same event

    @property
    def count(self) -> int:
        return len(self.events)

    def summary(self) -> Counter:
        return Counter(self.events)

    def hit(self, kind: str) -> None:
        if not self._inside:
            self.events.append((kind, _where()))

    def _wrap(self, name: str):
        orig = self._saved[name]
        counter = self

        def method(t, *a, **k):
            counter.hit(f"Tensor.{name}")
            counter._inside += 1
            try:
                return orig(t, *a, **k)
            finally:
                counter._inside -= 1
        return method

    def __enter__(self) -> HostSyncCounter:
        for name in METHODS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        self._saved.clear()
