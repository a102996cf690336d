"""Peak GPU memory, measured one way for the run report, the benches and the evidence tools (torch only).

No meter here resets a peak counter (torch.cuda.reset_peak_memory_stats): a process's peaks since its
start stay ComfyUI's and every other tool's to read. Four figures, each from one meter:

- **A window** (`measure_peak`: one UNet call, one forward of a bench), on CUDA from the caching
  allocator's counters (torch.cuda.memory_stats), in *active* bytes: a block freed while a side-stream copy
  still reads it (the skip offload's copies to host memory, record_stream) stays active until the copy is
  done, and cannot be reused before; allocated bytes drop at the free and would flatter the offload.
  At the start: synchronize, read `base` (active bytes now) and `before` (the process's active-bytes peak
  so far). At the end: synchronize, read `after` (that peak now). The running peak only rises when the
  window sets a new maximum, so
    - `after > before`: the window's own peak is `after`: **exact**, `bytes = after - base`;
    - `after == before`: the window stayed under an earlier peak of the process, and its own peak is not
      in the counters: `exact` is False, `upper = before - base` is the most it can have been, and `bytes`
      the most the meter saw from below: the largest op-boundary sample with `sample=True` (active bytes
      read after every aten op of the window, inputs and outputs alive; a kernel's internal workspace is
      not seen), else only what is still held at the end.
  `ballast=True` (benches, in processes of their own) makes every window exact: when the process's peak
  is above `base`, the window first holds `before - base` bytes in one block, so any allocation of the
  window sets a new maximum, and `bytes` is measured above the ballast. It raises the process's own peak,
  so it is never used where a whole-process figure is read (the run report, tools/paper_metric.py).
  `allocated` is the same window in allocated bytes, for comparison.
- **Live tensors** (any other device: the CPU): core/memtrace.py's LiveTensorMeter, the bytes of the
  storages the window created that a live tensor still references; exact for what it counts (tensors, no
  allocator rounding, no workspaces).
- **The process's allocator peak** (`process_peaks`): active / allocated / reserved bytes since the
  process started, valid because nothing resets them.
- **NVML** (`GpuMemorySampler`): what nvidia-smi shows, the CUDA context and every cached segment included,
  polled on a thread (the process's own entry where the driver lists it, else the device's used memory less
  what was used before this process initialised CUDA); through pynvml (nvidia-ml-py) if importable, else
  torch.cuda.device_memory_used, else cudaMemGetInfo once CUDA is up.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .memtrace import LiveTensorMeter

ACTIVE, ALLOCATED, RESERVED = "active_bytes.all", "allocated_bytes.all", "reserved_bytes.all"
_TORCH_MEMORY_STATS = torch.cuda.memory_stats  # torch's own (a test replaces the public one with a fake)


def _format(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Peak:
    """What one window measured: its peak above the memory held at its start."""

    bytes: int
    exact: bool  # False: the counters could not see this window's own peak (see `upper`)
    meter: str  # "CUDA active bytes" or "live tensors"
    upper: int | None = None  # not exact: the most it can have been (the process's earlier peak above the start)
    allocated: int | None = None  # CUDA: the same window in allocated bytes (None where that peak did not rise)
    sampled: bool = False  # not exact: `bytes` is the largest op-boundary sample
    host_bytes: int | None = None  # live tensors: peak bytes counted as host memory (core/memtrace.py)

    def text(self) -> str:
        if self.exact:
            return f"{_format(self.bytes)} ({self.meter})"
        seen = f"at least {_format(self.bytes)} (op-boundary samples), " if self.sampled else ""
        return f"{seen}at most {_format(self.upper or 0)} ({self.meter}; an earlier peak of the process was higher)"


class _OpSampler(TorchDispatchMode):
    """After every aten op (its inputs and outputs still alive), the allocator's active bytes: the
    largest is a lower bound of the window's peak that misses only a kernel's internal workspace."""

    def __init__(self, read):
        super().__init__()
        self.read, self.largest = read, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.largest = max(self.largest, self.read())
        return out


def _stats(device) -> dict:
    return torch.cuda.memory_stats(device)


def _active_now(device):
    """A reader of the current active bytes, cheap enough to call after every op."""
    index = device.index if isinstance(device, torch.device) else device
    fast = getattr(torch._C, "_cuda_memoryStats", None)
    if fast is not None and torch.cuda.memory_stats is _TORCH_MEMORY_STATS:
        index = torch.cuda.current_device() if index is None else index
        return lambda: fast(index)["active_bytes"]["all"]["current"]
    return lambda: _stats(device).get(f"{ACTIVE}.current", 0)


def _allocate(device, nbytes: int):
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


class PeakWindow:
    """One measurement window; `measure_peak` makes it. A context manager (read `.peak` after it), or,
    on CUDA without `sample`, started at construction and closed with `stop()`: it holds nothing open, so
    the run report's window of a call that raises is simply dropped. Off CUDA or with `sample=True` a
    dispatch mode is open until the window closes: use the context manager, which always closes it."""

    def __init__(self, device, ballast: bool = False, sample: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.peak: Peak | None = None
        self._ballast = self._sampler = self._meter = None
        if not self.cuda:
            self._meter = LiveTensorMeter()
            self._meter.__enter__()
            return
        torch.cuda.synchronize(self.device)
        s = _stats(self.device)
        if ballast:
            need = max(s.get(f"{ACTIVE}.peak", 0) - s.get(f"{ACTIVE}.current", 0),
                       s.get(f"{ALLOCATED}.peak", 0) - s.get(f"{ALLOCATED}.current", 0))
            if need > 0:
                try:
                    self._ballast = _allocate(self.device, need)
                except torch.OutOfMemoryError:  # no room for it: the window falls back to counters (and samples)
                    self._ballast = None
                torch.cuda.synchronize(self.device)
                s = _stats(self.device)
        self._start = {k: s.get(k, 0) for k in (f"{ACTIVE}.current", f"{ACTIVE}.peak", f"{ALLOCATED}.current",
                                                 f"{ALLOCATED}.peak")}
        if sample:
            self._sampler = _OpSampler(_active_now(self.device))
            self._sampler.__enter__()

    def stop(self) -> Peak:
        if self.peak is not None:
            return self.peak
        if not self.cuda:
            meter, self._meter = self._meter, None
            meter.__exit__(None, None, None)
            self.peak = Peak(meter.peak_bytes, True, "live tensors", host_bytes=meter.peak_host_bytes)
            return self.peak
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.__exit__(None, None, None)
        torch.cuda.synchronize(self.device)
        s = _stats(self.device)
        start = self._start
        base, before, after = start[f"{ACTIVE}.current"], start[f"{ACTIVE}.peak"], s.get(f"{ACTIVE}.peak", 0)
        alloc_base, alloc_before = start[f"{ALLOCATED}.current"], start[f"{ALLOCATED}.peak"]
        alloc_after = s.get(f"{ALLOCATED}.peak", 0)
        allocated = alloc_after - alloc_base if alloc_after > alloc_before else None
        self._ballast = None  # released; the allocator keeps its block cached
        if after > before:
            self.peak = Peak(after - base, True, "CUDA active bytes", allocated=allocated)
        else:  # under an earlier peak: what was seen from below, and the most it can have been
            seen = max(s.get(f"{ACTIVE}.current", 0), sampler.largest if sampler is not None else 0) - base
            upper = before - base
            self.peak = Peak(max(0, min(seen, upper)), seen >= upper, "CUDA active bytes", upper=upper,
                             allocated=allocated, sampled=sampler is not None)
        return self.peak

    def __enter__(self) -> "PeakWindow":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # an error in the window: close what is open, measure nothing
            if self._sampler is not None:
                self._sampler.__exit__(*exc)
            if self._meter is not None:
                self._meter.__exit__(*exc)
            self._sampler = self._meter = self._ballast = None
            return
        self.stop()


def measure_peak(device, *, ballast: bool = False, sample: bool = False) -> PeakWindow:
    """The peak memory of a window on `device`, above what was held at its start (the module's docstring
    says exactly what each device's meter counts). CUDA: the allocator's counters, never reset; `sample`
    adds op-boundary samples for windows that stay under an earlier peak; `ballast` makes every window
    exact by raising the process's own peak (bench processes only). Other devices: live tensors.

        with measure_peak(x.device, ballast=True) as window:
            out = forward()
        window.peak.bytes
    """
    return PeakWindow(device, ballast=ballast, sample=sample)


# -- the whole process ------------------------------------------------------------------------------------


def process_peaks(device=None) -> dict:
    """The caching allocator's peaks since the process started (nothing resets them): active, allocated
    and reserved bytes; an empty dict where CUDA was never used."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    s = _stats(device)
    return {"active_peak": s.get(f"{ACTIVE}.peak", 0), "allocated_peak": s.get(f"{ALLOCATED}.peak", 0),
            "reserved_peak": s.get(f"{RESERVED}.peak", 0)}


@dataclass
class GpuMemorySampler:
    """What nvidia-smi shows for this process, polled on a thread every `interval_s`; start it before CUDA
    is initialised (then the device's memory used before this process counts as `baseline`).

    `source` says what was read: "nvml process" (the driver lists this pid: its used memory), "nvml device"
    (the device's used memory less `baseline`: containers often hide the pid), "cuda device" (cudaMemGetInfo,
    once CUDA is up, less `baseline` when one was read) or None (nothing readable). `peak` and `last` are
    bytes of that figure; a spike shorter than the interval can be missed (the allocator's reserved peak,
    process_peaks, is the unsampled companion)."""

    index: int = 0
    interval_s: float = 0.02
    source: str | None = None
    baseline: int | None = None
    peak: int | None = None
    last: int | None = None
    samples: int = 0
    peaks: dict = field(default_factory=dict)  # source: its peak
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _nvml: object = None
    _handle: object = None

    def start(self) -> "GpuMemorySampler":
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self.baseline = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except Exception:  # no NVML (no pynvml, no driver): torch's readers, below
            self._nvml = None
        self.read()
        self._thread = threading.Thread(target=self._run, name="gpu-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def read(self) -> int | None:
        value, source = self._read()
        if value is not None:
            self.last, self.samples = value, self.samples + 1
            self.peaks[source] = max(self.peaks.get(source, value), value)
            # the process's own entry where the driver ever listed it, else the device's figure
            self.source = next(s for s in ("nvml process", "nvml device", "cuda device") if s in self.peaks)
            self.peak = self.peaks[self.source]
        return value

    def _read(self) -> tuple[int | None, str | None]:
        import os

        if self._nvml is not None:
            try:
                for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                    for p in getattr(self._nvml, getter)(self._handle):
                        if p.pid == os.getpid() and p.usedGpuMemory is not None and p.usedGpuMemory < 2**62:
                            return int(p.usedGpuMemory), "nvml process"
                used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
                return used - (self.baseline or 0), "nvml device"
            except Exception:
                return None, None
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None, None
        try:
            used = torch.cuda.device_memory_used(self.index)  # pynvml underneath, where torch finds it
        except Exception:
            free, total = torch.cuda.mem_get_info(self.index)
            used = total - free
        return used - (self.baseline or 0), "cuda device"

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.read()

    def stop(self) -> "GpuMemorySampler":
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.read()
        return self

    def as_dict(self) -> dict:
        return {"nvml_peak": self.peak, "nvml_last": self.last, "nvml_source": self.source,
                "nvml_baseline": self.baseline, "nvml_samples": self.samples, "nvml_peaks": dict(self.peaks)}


def synchronized_seconds(device=None) -> float:
    """time.perf_counter() after the device's queued work is done (CUDA), for timing a short run."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
