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
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse, meta-like tensors
            return
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self._storages.get(key)
        if entry is None:
            # A storage not seen before that was not created by a traced op would be a view of an
            # untracked tensor; a new storage has no other tensor referencing it yet.
            if storage.nbytes() == 0 or t._base is not None:
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
