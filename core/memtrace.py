"""Count the bytes of tensors that are alive during a computation, on any device (CPU included).

CUDA has max_memory_allocated; the CPU has nothing like it. This dispatch mode sees every tensor an
operator creates, follows its storage, and keeps a running total of the storages still referenced by
a live tensor. Tensors created before the mode (weights, inputs) and views of them are not counted,
so the peak is the activation memory of the traced code.

Device and host: on the CPU both are the same memory, so a storage made inside `counted_as_host()` (the
pack's skip offload without CUDA, core/offload.py) is counted apart, in `host_bytes`: it is a real copy
out of the "device" tensors, which are released, and `peak_bytes` counts device storages only.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class _Storage:
    nbytes: int
    live_tensors: int = 0
    host: bool = False


@dataclass
class LiveTensorMeter(TorchDispatchMode):
    """Use as a context manager; read `peak_bytes` (and `live_bytes`) afterwards: device storages.
    Storages made under `counted_as_host()` count in `host_bytes` / `peak_host_bytes` instead."""

    live_bytes: int = 0
    peak_bytes: int = 0
    host_bytes: int = 0
    peak_host_bytes: int = 0
    _storages: dict[int, _Storage] = field(default_factory=dict)
    _host_depth: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Inside the mode a view's `_base` is not set yet: an output that shares a storage with an
        # input is an alias (view, in-place result), not an allocation.
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, input_storages: set[int] = frozenset()) -> None:
        key = _storage_key(t)
        if key == 0:
            return
        entry = self._storages.get(key)
        if entry is None:
            # An alias of a tensor made outside the mode (an input, a weight) is not activation memory.
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or key in input_storages or t._base is not None:
                return
            entry = _Storage(storage.nbytes(), host=self._host_depth > 0)
            self._storages[key] = entry
            if entry.host:
                self.host_bytes += entry.nbytes
                self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
            else:
                self.live_bytes += entry.nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        elif entry.live_tensors == 0:
            return
        entry.live_tensors += 1
        weakref.finalize(t, self._release, key, entry)

    def _release(self, key: int, entry: _Storage) -> None:
        entry.live_tensors -= 1
        if entry.live_tensors == 0 and self._storages.get(key) is entry:
            del self._storages[key]
            if entry.host:
                self.host_bytes -= entry.nbytes
            else:
                self.live_bytes -= entry.nbytes


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):  # sparse, meta-like tensors
        return 0


@contextmanager
def counted_as_host() -> Iterator[None]:
    """Storages created inside count as host memory in every active LiveTensorMeter (no-op without one)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    meters = [m for m in _get_current_dispatch_mode_stack() if isinstance(m, LiveTensorMeter)]
    for meter in meters:
        meter._host_depth += 1
    try:
        yield
    finally:
        for meter in meters:
            meter._host_depth -= 1
