"""Count the bytes of tensors that are alive during a computation, on any device (CPU included).

CUDA has max_memory_allocated; the CPU has nothing like it. This dispatch mode sees every tensor an
operator creates, follows its storage, and keeps a running total of the storages still referenced by
a live tensor. Tensors created before the mode (weights, inputs) and views of them are not counted,
so the peak is the activation memory of the traced code.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class _Storage:
    nbytes: int
    live_tensors: int = 0


@dataclass
class LiveTensorMeter(TorchDispatchMode):
    """Use as a context manager; read `peak_bytes` (and `live_bytes`) afterwards."""

    live_bytes: int = 0
    peak_bytes: int = 0
    _storages: dict[int, _Storage] = field(default_factory=dict)

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
            entry = _Storage(storage.nbytes())
            self._storages[key] = entry
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
            self.live_bytes -= entry.nbytes


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):  # sparse, meta-like tensors
        return 0
