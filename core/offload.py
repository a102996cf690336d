"""Skip offload: the UNet's skip tensors wait in host memory between the input block that makes them and
the output block that reads them.

A skip leaves the device once the block after the one that made it has run (that block reads it as its
input, so it is alive until then anyway; an in-place change to it, as ComfyUI's hs would see, is copied
too). The deepest skip never leaves: it is the first one the output blocks read. On the way up a skip
comes back either whole, one block ahead of its use (ControlNet residuals and output-block patches such
as FreeU need it whole), or in the rows (samples) of each frame chunk that joins it, the next chunk's rows
on their way while the current chunk runs.

CUDA: copies run on the device's side stream (`side_stream`: one per device, made once and used by every
forward; from PyTorch's high-priority stream pool, so never one of the priority-0 streams ComfyUI's async
weight offload draws), ordered with events: a device-to-host copy waits for the event recorded where the
skip was made and the skip's memory is marked used by the side stream (`record_stream`), so the allocator
does not reuse it before the copy is done; a copy back goes into memory allocated on the compute stream,
which waits for the copy's event before it reads it.
Host buffers come from `HOST_POOL` (`HostPool`), by byte size and device: a buffer a skip or feature leaves
is used again by the next one of its size, in the same forward or a later one of the run (every copy into
or out of it runs on the one side stream, in order). They are pinned through ComfyUI's own pinned-memory
API (`comfy.model_management.pin_memory`: registered, counted in ComfyUI's TOTAL_PINNED_MEMORY), page by
page, so exactly their bytes are pinned; with `--disable-pinned-memory`, or past ComfyUI's pinned-memory
limit (MAX_PINNED_MEMORY: offload never evicts ComfyUI's own pins for its buffers), they are plain pageable
memory and their copies are blocking (the same bytes; the log says so once per run). `end_run()` (the
OUTER_SAMPLE wrapper's finally, techniques/slicing.py) waits for the side streams, unpins and drops every
buffer: nothing stays pinned between runs.
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

import logging
import errno
import math
import mmap
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .memtrace import counted_as_host

logger = logging.getLogger("ComfyUI-Streamline")  # the pack's logger (host/log.py)

PAGE = mmap.PAGESIZE  # pinned buffers take whole pages: two registrations never share one


class HostMemoryError(MemoryError):
    """Host memory ran out for an offload buffer. The forward that asked can run again with offload off
    (families/unet/forward.py's retry): the output is the same, the skips stay on the device."""


def host_allocation_failed(e: BaseException) -> bool:
    """Whether `e` says a host allocation failed: Python's MemoryError, torch's CPU allocator ("can't
    allocate memory"), or an mmap refused for want of memory."""
    if isinstance(e, MemoryError):
        return True
    if isinstance(e, OSError) and e.errno == errno.ENOMEM:
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def _comfy_model_management():
    """ComfyUI's model management where ComfyUI is loaded (None for core used on its own)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return None
    return mm


def pinning_disabled() -> bool:
    """ComfyUI's `--disable-pinned-memory`."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return False
    return bool(getattr(args, "disable_pinned_memory", False))


# -- the side stream ---------------------------------------------------------------------------------------


def device_key(device) -> torch.device:
    """`device` with its index (a CUDA device without one: the current device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def new_side_stream(device: torch.device) -> "torch.cuda.Stream":
    """A stream for offload's copies on `device`: from PyTorch's high-priority pool (torch.cuda.Stream always
    takes one of PyTorch's pooled streams; ComfyUI's async weight offload takes its streams from the
    priority-0 pool), and never the compute stream or one ComfyUI already uses."""
    mm = _comfy_model_management()
    taken = {torch.cuda.current_stream(device).cuda_stream}
    for streams in (getattr(mm, "STREAMS", None) or {}).values():
        taken.update(getattr(s, "cuda_stream", None) for s in streams)
    for _ in range(64):  # the pool is a ring of 32 per priority
        stream = torch.cuda.Stream(device, priority=-1)
        if stream.cuda_stream not in taken:
            break
    return stream


class SideStreams:
    """One side stream per device, made once by `factory` (device -> stream) and then used by every forward
    on that device."""

    def __init__(self, factory: Callable = new_side_stream):
        self.factory = factory
        self._streams: dict[torch.device, object] = {}
        self._lock = threading.Lock()

    def get(self, device):
        key = device_key(device)
        with self._lock:
            stream = self._streams.get(key)
            if stream is None:
                stream = self._streams[key] = self.factory(key)
        return stream

    def streams(self) -> list:
        with self._lock:
            return list(self._streams.values())


SIDE_STREAMS = SideStreams()


def side_stream(device) -> "torch.cuda.Stream":
    return SIDE_STREAMS.get(device)


# -- host buffers ------------------------------------------------------------------------------------------


def pin(buffer: Tensor) -> bool:
    """Pin `buffer` (whole pages) through ComfyUI's API (it registers it and counts it in its
    TOTAL_PINNED_MEMORY); without ComfyUI, register it with the CUDA runtime."""
    mm = _comfy_model_management()
    if mm is not None and hasattr(mm, "pin_memory"):
        return bool(mm.pin_memory(buffer))
    return torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.nbytes, 0) == 0


def unpin(buffer: Tensor) -> None:
    mm = _comfy_model_management()
    if mm is not None and hasattr(mm, "unpin_memory"):
        mm.unpin_memory(buffer)
    else:
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


DISABLED = "--disable-pinned-memory"


def pinning_refused(nbytes: int) -> str | None:
    """Why `nbytes` more may not be pinned now (None: they may): `--disable-pinned-memory`, or ComfyUI's
    pinned-memory limit (MAX_PINNED_MEMORY against TOTAL_PINNED_MEMORY, which counts the pool's own pins)."""
    if pinning_disabled():
        return DISABLED
    mm = _comfy_model_management()
    limit = getattr(mm, "MAX_PINNED_MEMORY", None)
    if limit is None:
        return None
    if limit <= 0:
        return "ComfyUI pins no memory on this host"
    total = getattr(mm, "TOTAL_PINNED_MEMORY", 0)
    if total + nbytes > limit:
        return (f"ComfyUI's pinned-memory limit: {total / 2**20:.0f} of {limit / 2**20:.0f} MiB pinned, "
                f"{nbytes / 2**20:.1f} MiB more asked")
    return None


class HostPool:
    """Host buffers for offload's copies, by device and byte size: a buffer given back (its skip or feature
    gone) is handed out again for the next tensor of its size, in the same forward or a later one of the run;
    `release()` (the end of the run) unpins and drops them all.

    A new buffer is pinned (`pin`, whole pages) unless `refused(nbytes)` says why not, or pinning fails: then
    it is pageable memory, and the log says so once per run. Accounting: `held_bytes` (every buffer the pool
    holds, handed out or idle), `pinned_bytes` (of them, pinned), `lent_bytes` (handed out now)."""

    def __init__(self, pin: Callable[[Tensor], bool] = pin, unpin: Callable[[Tensor], None] = unpin,
                 refused: Callable[[int], "str | None"] = pinning_refused):
        self.pin, self.unpin, self.refused = pin, unpin, refused
        self._idle: dict[tuple[str, int], list[Tensor]] = {}
        self._lent: dict[int, tuple[tuple[str, int], Tensor]] = {}  # data_ptr -> (key, buffer)
        self._pinned: dict[int, Tensor] = {}  # storage address -> pinned buffer
        self.held_bytes = self.pinned_bytes = self.lent_bytes = 0
        self.pageable_reason: str | None = None  # this run's (logged once)
        self._lock = threading.Lock()

    def take(self, device, shape, dtype: torch.dtype) -> Tensor:
        """An uninitialised host tensor of `shape` and `dtype` for a copy from `device`."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        key = (str(device_key(device)), nbytes)
        with self._lock:
            idle = self._idle.get(key)
            buffer = idle.pop() if idle else None
        if buffer is None:
            buffer = self._new(nbytes)
        with self._lock:
            self._lent[buffer.data_ptr()] = (key, buffer)
            self.lent_bytes += buffer.nbytes
        return buffer[:nbytes].view(dtype).view(shape)

    def give_back(self, host: Tensor) -> None:
        """`host` (from `take`) is no longer read: its buffer is idle (ignored if the pool was released)."""
        with self._lock:
            lent = self._lent.pop(host.data_ptr(), None)
            if lent is not None:
                key, buffer = lent
                self.lent_bytes -= buffer.nbytes
                self._idle.setdefault(key, []).append(buffer)

    def _new(self, nbytes: int) -> Tensor:
        size = -(-nbytes // PAGE) * PAGE
        reason = self.refused(size)
        if reason is None:
            # an anonymous mapping: whole pages of its own, the storage starting where the pinned range does
            buffer = torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)
            if self.pin(buffer):
                with self._lock:
                    self._pinned[buffer.untyped_storage().data_ptr()] = buffer
                    self.pinned_bytes += size
                    self.held_bytes += size
                return buffer
            reason = "pinning failed"
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            self.held_bytes += nbytes
            said, self.pageable_reason = self.pageable_reason, self.pageable_reason or reason
        if said is None:  # once per run; a chosen --disable-pinned-memory is no warning
            say = logger.info if reason == DISABLED else logger.warning
            say(f"Streamline: offload falls back to pageable host memory this run ({reason}): those copies wait "
                "for the host (slower; the output is the same).")
        return buffer

    def is_pinned(self, host: Tensor) -> bool:
        """Whether `host` (from `take`, or rows of it) lies in a buffer this pool pinned."""
        with self._lock:
            return host.untyped_storage().data_ptr() in self._pinned

    def release(self) -> None:
        """The end of a run: unpin and drop every buffer (the caller has waited for the copies in flight).
        Buffers still handed out stay valid as pageable memory, and are not taken back."""
        with self._lock:
            pinned, self._pinned = list(self._pinned.values()), {}
            self._idle, self._lent = {}, {}
            self.held_bytes = self.pinned_bytes = self.lent_bytes = 0
            self.pageable_reason = None
        for buffer in pinned:
            self.unpin(buffer)


HOST_POOL = HostPool()


def pool_for(device: torch.device) -> HostPool | None:
    """The pool a forward's host buffers come from: CUDA's pinned pool; none without CUDA (the plain
    copies of the CPU path)."""
    return HOST_POOL if device.type == "cuda" else None


def end_run() -> None:
    """A sampling run is over (the OUTER_SAMPLE wrapper's finally): the copies still in flight on the side
    streams finish, then the pool unpins and drops its buffers."""
    if torch.cuda.is_initialized():
        for stream in SIDE_STREAMS.streams():
            try:
                stream.synchronize()
            except RuntimeError as e:  # a failed CUDA run: it is already being reported
                logger.debug(f"Streamline: offload's side stream at the end of the run: {e}")
    HOST_POOL.release()


# -- one forward's copies ----------------------------------------------------------------------------------


@dataclass
class Incoming:
    """A tensor on its way to the device; `event` (CUDA) is recorded when it has arrived."""

    tensor: Tensor
    event: "torch.cuda.Event | None" = None


@dataclass
class Transfers:
    """The copies of one UNet forward, and what they moved (for the run's report). `pool`: where the host
    buffers come from (default `pool_for(device)`); none: a new storage for each."""

    device: torch.device
    moved_bytes: int = 0  # out and back
    host_bytes: int = 0  # held in host memory now
    peak_host_bytes: int = 0
    pool: HostPool | None = field(default=None, repr=False)

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.pool is None:
            self.pool = pool_for(self.device)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def side_stream(self) -> "torch.cuda.Stream":
        return side_stream(self.device)

    def host_buffer(self, t: Tensor) -> Tensor:
        """A host tensor for a copy of `t`; HostMemoryError when host memory has run out."""
        try:
            if self.pool is not None:
                return self.pool.take(t.device, t.shape, t.dtype)
            return torch.empty(t.shape, dtype=t.dtype, device="cpu" if self.cuda else t.device)
        except Exception as e:  # noqa: BLE001 — only a failed host allocation is renamed
            if not host_allocation_failed(e) or isinstance(e, HostMemoryError):
                raise
            raise HostMemoryError(f"no host memory for a {t.numel() * t.element_size() / 2**20:.1f} MiB offload "
                                  f"buffer ({type(e).__name__}: {e})") from e

    def to_host(self, t: Tensor) -> Tensor:
        """A host copy of `t`; the caller drops `t` afterwards (CUDA: its memory is reused only once the
        copy has run)."""
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            host = self.host_buffer(t)
            pinned = host.is_pinned()  # else pageable (--disable-pinned-memory, the pinned limit): a blocking copy
            side = self.side_stream()
            with torch.cuda.stream(side):
                side.wait_event(ready)
                host.copy_(t, non_blocking=pinned)
            if pinned:
                t.record_stream(side)
        else:
            with counted_as_host():
                host = self.host_buffer(t)
            host.copy_(t)
        nbytes = host.numel() * host.element_size()
        self.moved_bytes += nbytes
        self.host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        return host

    def released(self, host: Tensor) -> None:
        """`host` (from `to_host`) is no longer read: its buffer goes back to the pool."""
        self.host_bytes -= host.numel() * host.element_size()
        if self.pool is not None:
            self.pool.give_back(host)

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
            out.copy_(host, non_blocking=host.is_pinned())  # pageable: blocking
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
        weakref.finalize(self, transfers.released, self.host)

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
