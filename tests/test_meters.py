"""core/meter.py on the CPU: CUDA's allocator counters simulated (torch.cuda.memory_stats and its kin
replaced by a fake allocator), so the window arithmetic is checked without a GPU: a window that sets a new
peak of the process is exact, one under an earlier peak says it is not and gives its bound, op-boundary
samples and the ballast, active bytes held by a side-stream copy. No meter may reset a peak counter."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from comfyui_streamline.core import meter
from comfyui_streamline.core.meter import GpuMemorySampler, measure_peak

MiB = 2**20
ROOT = Path(__file__).resolve().parents[1]


class FakeAllocator:
    """CUDA's caching-allocator statistics as torch.cuda.memory_stats reports them (the "all" pool)."""

    def __init__(self, held: int = 0):
        self.allocated = self.active = held
        self.allocated_peak = self.active_peak = held
        self.reserved_peak = held
        self.pending = 0  # freed while a side-stream copy still reads it: allocated no more, active still
        self.resets = 0

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.active += n
        self.allocated_peak = max(self.allocated_peak, self.allocated)
        self.active_peak = max(self.active_peak, self.active)
        self.reserved_peak = max(self.reserved_peak, self.active)

    def free(self, n: int, side_stream: bool = False) -> None:
        self.allocated -= n
        if side_stream:
            self.pending += n
        else:
            self.active -= n

    def copies_done(self) -> None:
        self.active -= self.pending
        self.pending = 0

    def memory_stats(self, device=None) -> dict:
        return {"active_bytes.all.current": self.active, "active_bytes.all.peak": self.active_peak,
                "allocated_bytes.all.current": self.allocated, "allocated_bytes.all.peak": self.allocated_peak,
                "reserved_bytes.all.current": self.active, "reserved_bytes.all.peak": self.reserved_peak}

    def reset_peak_memory_stats(self, device=None) -> None:
        self.resets += 1
        raise AssertionError("a meter reset the process's peak counters")


class Block:
    """The ballast's block in the fake allocator, freed when the meter drops it."""

    def __init__(self, allocator: FakeAllocator, n: int):
        self.allocator, self.n = allocator, n
        allocator.alloc(n)

    def __del__(self):
        self.allocator.free(self.n)


@pytest.fixture
def cuda(monkeypatch):
    fake = FakeAllocator(held=1000 * MiB)  # the weights
    monkeypatch.setattr(torch.cuda, "memory_stats", fake.memory_stats)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: fake.allocated_peak)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: fake.allocated)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset_peak_memory_stats)
    monkeypatch.setattr(torch.cuda, "reset_max_memory_allocated", fake.reset_peak_memory_stats)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(meter, "_allocate", lambda device, n: Block(fake, n))
    yield fake
    assert fake.resets == 0


def test_a_window_that_sets_a_new_peak_is_exact(cuda):
    with measure_peak("cuda") as window:
        cuda.alloc(300 * MiB)
        cuda.alloc(200 * MiB)
        cuda.free(500 * MiB)
    assert window.peak.exact and window.peak.bytes == 500 * MiB and window.peak.allocated == 500 * MiB
    assert window.peak.meter == "CUDA active bytes"


def test_a_window_under_an_earlier_peak_says_so_and_bounds_it(cuda):
    cuda.alloc(4000 * MiB)  # model loading, a larger call before: the process's peak
    cuda.free(4000 * MiB)
    with measure_peak("cuda") as window:
        cuda.alloc(700 * MiB)
        cuda.alloc(64 * MiB)  # the output, still held at the end
        cuda.free(700 * MiB)
    peak = window.peak
    assert not peak.exact and peak.upper == 4000 * MiB
    assert peak.bytes == 64 * MiB  # what the counters still show at the end: a lower bound, not the peak
    assert "at most" in peak.text()


def test_op_boundary_samples_see_what_the_counters_cannot(cuda):
    cuda.alloc(4000 * MiB)
    cuda.free(4000 * MiB)
    with measure_peak("cuda", sample=True) as window:
        cuda.alloc(700 * MiB)
        torch.zeros(4) + 1  # an op: the sampler reads the allocator after it
        cuda.free(700 * MiB)
        torch.zeros(4) + 1
    assert not window.peak.exact and window.peak.sampled and window.peak.bytes == 700 * MiB
    assert window.peak.upper == 4000 * MiB
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    assert not _get_current_dispatch_mode_stack()  # the sampler is closed


def test_the_ballast_makes_a_window_under_an_earlier_peak_exact(cuda):
    cuda.alloc(4000 * MiB)
    cuda.free(4000 * MiB)
    with measure_peak("cuda", ballast=True) as window:
        assert cuda.active == 5000 * MiB  # held up to the earlier peak
        cuda.alloc(700 * MiB)
        cuda.free(700 * MiB)
    assert window.peak.exact and window.peak.bytes == 700 * MiB
    assert cuda.active == 1000 * MiB  # the ballast is gone


def test_memory_a_side_stream_copy_still_reads_counts_until_the_copy_is_done(cuda):
    """The skip offload frees a skip while its copy to host memory runs: allocated bytes drop at once, the
    block stays active (not reusable) until the copy is done; the meter reports active bytes."""
    with measure_peak("cuda") as window:
        cuda.alloc(300 * MiB)  # a skip
        cuda.free(300 * MiB, side_stream=True)  # offloaded: its copy is still running
        cuda.alloc(300 * MiB)  # the next level's working tensor
        cuda.copies_done()
        cuda.free(300 * MiB)
    assert window.peak.bytes == 600 * MiB and window.peak.allocated == 300 * MiB


def test_an_error_in_the_window_closes_it_and_measures_nothing(cuda):
    with pytest.raises(RuntimeError):
        with measure_peak("cuda", sample=True) as window:
            cuda.alloc(10 * MiB)
            raise RuntimeError("out of memory, say")
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    assert window.peak is None and not _get_current_dispatch_mode_stack()


def test_the_run_report_measures_first_calls_without_resetting(cuda, monkeypatch):
    """techniques/report.py: a window per first call of a shape, from the fake counters, exact or "at most"."""
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.techniques import report as run_report

    monkeypatch.setattr(run_report, "slice_sizes", lambda *a: "slices")
    monkeypatch.setattr(run_report, "predicted_peaks", lambda *a, **k: (None, None))
    report = run_report.RunReport()

    def call(shape, bytes_):
        x = types.SimpleNamespace(shape=shape, dtype=torch.float16, device=torch.device("cuda", 0))
        window = report.measure(x, False)
        cuda.alloc(bytes_)
        cuda.free(bytes_)
        report.record(None, x, None, SliceConfig(), False, window)
        return window

    assert call((32, 4, 64, 64), 900 * MiB) is not None
    assert call((32, 4, 64, 64), 900 * MiB) is None  # measured once per shape and run
    call((2, 4, 64, 64), 100 * MiB)  # a smaller shape later: under the first call's peak
    first, second = report.records.values()
    assert first.measured.exact and first.measured.bytes == 900 * MiB and first.calls == 2
    assert not second.measured.exact and second.measured.upper == 900 * MiB
    text = report.text("Streamline Model Patch")
    assert "measured 900.0 MiB (CUDA active bytes, first call)" in text
    assert "measured at most 900.0 MiB" in text


def test_the_cpu_window_is_the_live_tensor_counter():
    from comfyui_streamline.core.memtrace import LiveTensorMeter

    with measure_peak("cpu") as window, LiveTensorMeter() as reference:
        a = torch.ones(1000, 1000)
        b = a @ a
        del a, b
    assert window.peak.exact and window.peak.bytes == reference.peak_bytes == 8_000_000
    assert window.peak.meter == "live tensors"


EVIDENCE_TOOLS = ["gpu_evidence.py", "paper_metric.py", "bench.py", "bench_svd.py", "bench_wan.py", "bench_rehash.py"]


def test_no_meter_of_the_pack_resets_a_peak_counter():
    """The nodes, core/ and every tool (the evidence tools and the demo included)."""
    files = [p for folder in ("core", "nodes", "tools") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert {ROOT / "tools" / name for name in EVIDENCE_TOOLS + ["demo.py"]} <= set(files)
    found = [f"{p.relative_to(ROOT)}:{i + 1}" for p in files
             for i, line in enumerate(p.read_text().splitlines())
             if re.search(r"reset_(peak_memory_stats|max_memory_allocated)\s*\(", line)]
    assert found == []


class FakeNvml(types.ModuleType):
    def __init__(self, used: list[int], pids: dict[int, int]):
        super().__init__("pynvml")
        self.used, self.pids = used, pids

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=self.used[0])

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.pids.items()]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return []


def test_nvml_reads_the_process_where_listed_else_the_device_less_its_baseline(monkeypatch):
    import os

    nvml = FakeNvml([600 * MiB], {})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    sampler = GpuMemorySampler(interval_s=0.001).start()  # baseline 600 MiB: others' use before this process
    nvml.used[0] = 600 * MiB + 3000 * MiB
    sampler.read()
    assert (sampler.source, sampler.peak, sampler.baseline) == ("nvml device", 3000 * MiB, 600 * MiB)
    nvml.pids[os.getpid()] = 3500 * MiB  # the driver lists this process: its own figure from now on
    sampler.read()
    nvml.pids[os.getpid()] = 2000 * MiB
    sampler.stop()
    assert sampler.source == "nvml process" and sampler.peak == 3500 * MiB and sampler.last == 2000 * MiB


def test_without_nvml_and_cuda_the_sampler_reads_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sampler = GpuMemorySampler().start().stop()
    assert sampler.peak is None and sampler.source is None
