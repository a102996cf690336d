"""Skip offload: the UNet's skip tensors wait in host memory between the input block that makes them and
the output block that reads them.

A skip leaves the device once the block after the one that made it has run (that block reads it as its
input, so it is alive until then anyway; an in-place change to it, as ComfyUI's hs would see, is copied
too). The deepest skip never leaves: it is the first one the output blocks read. On the way up a skip
comes back either whole, one block ahead of its use (ControlNet residuals and output-block patches such
as FreeU need it whole), or in the rows (samples) of each frame chunk that joins it, the next chunk's rows
on their way while the current chunk runs.

CUDA: copies run on a side stream, ordered with events: a device-to-host copy waits for the event
recorded where the skip was made and the skip's memory is marked used by the side stream
(`record_stream`), so the allocator does not reuse it before the copy is done; host buffers are pinned
(PyTorch's caching host allocator keeps them until their copies finish); a copy back goes into memory
allocated on the compute stream, which waits for the copy's event before it reads it.
No CUDA: the copies are plain copies into new storages, made under memtrace.counted_as_host(), so the
live-tensor counter sees the skips leave the device count; the device-side tensors are released.
Copies are exact: the forward's output is bit-identical with and without offload.

Feature offload (SliceConfig.offload_features) moves the whole-batch features between blocks the same
way: a block's output that the next block's first group reads chunk by chunk leaves the device as soon
as it is written and comes back by the rows of each chunk (`HostTensor.rows`, the next chunk's rows on
their way). On the way down those outputs are the skips themselves: a skip then leaves at once instead
of after the next block (`SkipStack.append(..., now=True)`), comes back by rows for the next block, and
again for the output block that joins it. A feature that the next op needs whole stays on the device.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .memtrace import counted_as_host


@dataclass
class Incoming:
    """A tensor on its way to the device; `event` (CUDA) is recorded when it has arrived."""

    tensor: Tensor
    event: "torch.cuda.Event | None" = None


@dataclass
class Transfers:
    """The copies of one UNet forward, and what they moved (for the run's report)."""

    device: torch.device
    moved_bytes: int = 0  # out and back
    host_bytes: int = 0  # held in host memory now
    peak_host_bytes: int = 0
    _stream: "torch.cuda.Stream | None" = field(default=None, repr=False)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def side_stream(self) -> "torch.cuda.Stream":
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def to_host(self, t: Tensor) -> Tensor:
        """A host copy of `t`; the caller drops `t` afterwards (CUDA: its memory is reused only once the
        copy has run)."""
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            side = self.side_stream()
            with torch.cuda.stream(side):
                side.wait_event(ready)
                host.copy_(t, non_blocking=True)
            t.record_stream(side)
        else:
            with counted_as_host():
                host = torch.empty(t.shape, dtype=t.dtype, device=t.device)
            host.copy_(t)
        nbytes = host.numel() * host.element_size()
        self.moved_bytes += nbytes
        self.host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        return host

    def released(self, nbytes: int) -> None:
        self.host_bytes -= nbytes

    def to_device(self, host: Tensor) -> Incoming:
        """Start copying `host` (a host tensor or rows of one) to the device."""
        self.moved_bytes += host.numel() * host.element_size()
        if not self.cuda:
            out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            out.copy_(host)
            return Incoming(out)
        compute, side = torch.cuda.current_stream(self.device), self.side_stream()
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device)  # memory of the compute stream
        allocated = torch.cuda.Event()
        allocated.record(compute)
        with torch.cuda.stream(side):
            side.wait_event(allocated)
            out.copy_(host, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(side)
        out.record_stream(side)  # a prefetch dropped unread must not have its memory reused mid-copy
        return Incoming(out, arrived)

    def arrive(self, incoming: Incoming) -> Tensor:
        """The tensor, once its copy is done (the compute stream waits for it; no host synchronisation)."""
        if incoming.event is not None:
            torch.cuda.current_stream(self.device).wait_event(incoming.event)
        return incoming.tensor


class HostTensor:
    """A skip or a feature in host memory: brought back whole (`prefetch`, `whole`) or by rows (`rows`)."""

    def __init__(self, transfers: Transfers, t: Tensor):
        self.transfers = transfers
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.host = transfers.to_host(t)
        self.fetched: Incoming | None = None
        self.next_rows: tuple[int, int, Incoming] | None = None
        weakref.finalize(self, transfers.released, self.host.numel() * self.host.element_size())

    def prefetch(self) -> None:
        """Start bringing the whole skip back (one block ahead of its use)."""
        if self.fetched is None:
            self.fetched = self.transfers.to_device(self.host)

    def whole(self) -> Tensor:
        self.prefetch()
        return self.transfers.arrive(self.fetched)

    def rows(self, start: int, end: int) -> Tensor:
        """Samples [start, end) on the device; the next range of the same size starts coming meanwhile.
        All rows at once come back uncached (a feature stays in host memory after its reader)."""
        if self.fetched is not None:
            return self.whole()[start:end]
        if start == 0 and end >= self.shape[0]:
            return self.transfers.arrive(self.transfers.to_device(self.host))
        if self.next_rows is not None and self.next_rows[:2] == (start, end):
            incoming = self.next_rows[2]
        else:
            incoming = self.transfers.to_device(self.host[start:end])
        self.next_rows = None
        if end < self.shape[0]:
            following = (end, min(self.shape[0], 2 * end - start))
            self.next_rows = (*following, self.transfers.to_device(self.host[following[0]:following[1]]))
        return self.transfers.arrive(incoming)


def whole(t: "Tensor | HostTensor") -> Tensor:
    return t.whole() if isinstance(t, HostTensor) else t


def rows(t: "Tensor | HostTensor", start: int, end: int) -> Tensor:
    return t.rows(start, end) if isinstance(t, HostTensor) else t[start:end]


class SkipStack:
    """The forward's skip tensors (ComfyUI's `hs`), offloaded: append, pop and [-1] as on a list. The top
    stays on the device (the block after it reads it, Step Rehash reads the deepest shallow one); a skip
    goes to host memory when the next one is appended, or at once (`now`: feature offload)."""

    def __init__(self, transfers: Transfers):
        self.transfers = transfers
        self.items: list[Tensor | HostTensor] = []

    def append(self, t: Tensor, now: bool = False) -> "Tensor | HostTensor":
        """Push `t`; with `now` it goes to host memory at once: the caller reads it back by rows
        through what this returns (and drops `t`)."""
        if self.items and isinstance(self.items[-1], Tensor):
            self.items[-1] = HostTensor(self.transfers, self.items[-1])
        self.items.append(HostTensor(self.transfers, t) if now else t)
        return self.items[-1]

    def pop(self) -> "Tensor | HostTensor":
        return self.items.pop()

    def prefetch_top(self) -> None:
        """The next skip to be read will be needed whole: start bringing it back now."""
        if self.items and isinstance(self.items[-1], HostTensor):
            self.items[-1].prefetch()

    def __getitem__(self, index: int) -> "Tensor | HostTensor":
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)
