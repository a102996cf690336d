"""What a Streamline-patched model did in one sampling run, said once at the end of the run: in the log
and on the node that patched the model.

Per latent shape the UNet saw (cond and uncond batched or not, context windows): how many calls, the
slicing they ran with (the automatic sizes resolved), the peak activation memory the planner predicts
with that slicing and for ComfyUI's own forward, and on CUDA the peak measured around the first call of
that shape: core/meter.py's window in the allocator's active bytes, read and never reset (ComfyUI's and
every tool's whole-process peaks stay whole). A first call that stays under an earlier peak of the
process cannot be seen in those counters: the report then says "at most" and gives that bound.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from torch import Tensor

from ..core.plan_search import format_bytes
from ..core.meter import Peak, PeakWindow, measure_peak
from ..core.slicing import SliceConfig
from ..families import registry as families
from ..host.log import logger

REPORT_EVENT = "streamline.report"  # websocket event web/streamline.js shows on the node: {"node", "text"}


@dataclass
class ShapeRecord:
    """The calls of one run with one latent shape."""

    shape: tuple[int, ...]
    config: SliceConfig
    slices: str  # the slice sizes at full resolution, automatic sizes resolved
    predicted: int | None  # bytes, with the slicing; None: the planner cannot describe this UNet
    unpatched: int | None  # bytes, ComfyUI's own forward
    video_norm: bool
    calls: int = 0
    measured: Peak | None = None  # the first call's window (CUDA only): bytes above what was held before it
    moved: int | None = None  # skip offload: bytes copied out and back in the latest call
    host: int | None = None  # skip offload: peak bytes held in host memory in that call

    def text(self) -> str:
        mode = ", whole-video GroupNorm mode" if self.video_norm else ""
        line = f"{'x'.join(map(str, self.shape))} ({self.calls} call{'s' * (self.calls != 1)}{mode}): {self.slices}"
        if self.predicted is not None and self.unpatched is not None:
            line += (f"; predicted peak activation {format_bytes(self.predicted)}, ComfyUI's forward "
                     f"{format_bytes(self.unpatched)} ({self.unpatched / max(self.predicted, 1):.1f}x less)")
        if self.measured is not None:
            m = self.measured
            line += (f"; measured {format_bytes(m.bytes)} (CUDA active bytes, first call)" if m.exact else
                     f"; measured at most {format_bytes(m.upper or 0)} (CUDA active bytes, first call: it stayed "
                     f"under an earlier peak of the process, which the meter does not reset)")
        if self.moved is not None:
            line += (f"; skips offloaded to host memory: {format_bytes(self.moved)} moved per call, "
                     f"{format_bytes(self.host or 0)} held in host memory at most")
        return line


def slice_sizes(unet, x: Tensor, context: Tensor | None, config: SliceConfig) -> str:
    """The slices a forward of `x` runs with at full resolution: what automatic (0) resolves to."""
    return families.family_of(unet).slice_text(unet, x, context, config)


def predicted_peaks(unet, x: Tensor, context: Tensor | None, config: SliceConfig,
                    video_norm: bool, video_length: int | None = None) -> tuple[int | None, int | None]:
    """(sliced, unpatched) peak activation bytes the planner predicts for a forward of `x`."""
    try:
        return families.family_of(unet).peaks(unet, x, context, config, video_norm, video_length)
    except Exception as e:  # a structure the planner does not describe: the report says so
        logger.debug(f"Streamline: no memory prediction for this UNet ({e!r})")
        return None, None


@dataclass
class RunReport:
    """Collects one run's calls (a fresh one per run: StreamlineState.for_run)."""

    records: dict = field(default_factory=dict)
    unchanged: str | None = None  # why the model ran unchanged, if it did

    @staticmethod
    def _key(x: Tensor, video_norm: bool) -> tuple:
        return tuple(x.shape), x.dtype, video_norm

    def measure(self, x: Tensor, video_norm: bool) -> PeakWindow | None:
        """A measurement window for this call: on CUDA, for the first call of its shape this run (the
        allocator's counters only: a call that raises drops its window, nothing is left open)."""
        if x.device.type != "cuda" or self._key(x, video_norm) in self.records:
            return None
        return measure_peak(x.device)

    def record(self, unet, x: Tensor, context: Tensor | None, config: SliceConfig, video_norm: bool,
               peak: PeakWindow | None = None, transfers=None, video_length: int | None = None) -> None:
        """transfers: the call's core.offload.Transfers when it offloaded its skips; video_length: SVD's
        frames per video."""
        key = self._key(x, video_norm)
        entry = self.records.get(key)
        if entry is None or entry.config != config:  # new shape, or an out-of-memory retry settled finer
            calls = entry.calls if entry is not None else 0
            entry = self.records[key] = ShapeRecord(tuple(x.shape), config, slice_sizes(unet, x, context, config),
                                                    *predicted_peaks(unet, x, context, config, video_norm, video_length),
                                                    video_norm, calls)
        entry.calls += 1
        if peak is not None:
            entry.measured = peak.stop()
        if transfers is not None:
            entry.moved, entry.host = transfers.moved_bytes, transfers.peak_host_bytes

    def text(self, source: str) -> str:
        if self.unchanged is not None:
            return f"{source}: {self.unchanged}"
        if not self.records:
            return f"{source}: no UNet call this run"
        lines = [f"{source}, this run:"] + [f"- {r.text()}" for r in self.records.values()]
        return "\n".join(lines)


def publish(text: str, node_id: str | None, log: bool = True) -> None:
    """Log `text` and show it on the node `node_id` in the browser (when a ComfyUI server runs)."""
    if log:
        logger.info(text)
    server_module = sys.modules.get("server")  # ComfyUI's; absent in scripts and tests without a server
    server = getattr(getattr(server_module, "PromptServer", None), "instance", None)
    if server is None or node_id is None:
        return
    try:
        server.send_sync(REPORT_EVENT, {"node": str(node_id), "text": text}, getattr(server, "client_id", None))
    except Exception as e:  # the report is information: a closed socket must not fail the run
        logger.debug(f"Streamline: report not sent to node {node_id} ({e!r})")
