"""Memory Budget: predict the peak activation memory of one UNet forward, and pick slices that fit.

The prediction walks the UNet's blocks in execution order the way the streamlined forward (or
ComfyUI's plain forward) runs them, and keeps, at every group of layers, what is alive: the skip
tensors kept so far, the group's input and output, and one chunk's working set. Working sets are
linear in the values a layer touches, with coefficients calibrated against measured peaks
(docs/budget_calibration.md), plus attention scores where the attention kernel materialises them
(ComfyUI's split attention on CPU does; SDPA on CUDA does not).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

from .slicing import SliceConfig, frame_chunk_size, spatial_chunk_size


class BudgetError(ValueError):
    """No slicing fits the budget; the message says the smallest budget that would."""


@dataclass(frozen=True)
class Layer:
    kind: str  # "res" | "attn" | "motion" | "up" | "down" | "other"
    channels_in: int
    channels_out: int
    heads: int = 0


@dataclass(frozen=True)
class Block:
    layers: tuple[Layer, ...]
    skip_channels: int = 0  # output blocks: channels of the skip concatenated to the input


@dataclass(frozen=True)
class UNetShape:
    model_channels: int
    input_blocks: tuple[Block, ...]
    middle: Block
    output_blocks: tuple[Block, ...]
    out_channels: int = 4


@dataclass(frozen=True)
class Workload:
    batch: int  # samples per UNet call (conds x frames)
    frames: int  # video length the motion modules attend over
    height: int  # latent
    width: int
    context_tokens: int = 77
    dtype_bytes: int = 4
    attention_scores: bool = True  # the attention kernel materialises (heads x queries x keys) scores


@dataclass(frozen=True)
class Coefficients:
    """Values alive inside a layer per value it touches. Defaults: fitted to 36 measured peaks on the
    CPU (docs/budget_calibration.md; python tools/calibrate_budget.py)."""

    res_in: float = 5.664
    res_out: float = 1.778
    attn: float = 12.214
    context: float = 8.261
    scores: float = 1.265
    motion: float = 0.678
    motion_whole: float = 19.83
    motion_scores: float = 3.221
    up: float = 1.116
    plain: float = 0.989  # ComfyUI's own forward: its layer working sets relative to the sliced forward's
    plain_context: float = 2.928  # ... and its cross-attention keys/values per context token


CPU_COEFFICIENTS = Coefficients()


@dataclass
class _Walk:
    shape: UNetShape
    work: Workload
    config: SliceConfig | None  # None: ComfyUI's plain forward
    k: Coefficients
    peak: float = 0.0
    skips: list[float] = field(default_factory=list)

    def positions(self, level: int) -> int:
        return max(1, (self.work.height >> level) * (self.work.width >> level))

    def see(self, values: float) -> None:
        self.peak = max(self.peak, values)

    # per-sample values alive inside one layer, beyond its input and output
    def layer_values(self, layer: Layer, level: int) -> float:
        p, k, w = self.positions(level), self.k, self.work
        if layer.kind == "res":
            return p * (k.res_in * layer.channels_in + k.res_out * layer.channels_out)
        if layer.kind == "attn":
            scores = k.scores * layer.heads * p * max(p, w.context_tokens) if w.attention_scores else 0.0
            context = k.plain_context if self.config is None else k.context
            return p * k.attn * layer.channels_in + context * w.context_tokens * layer.channels_in + scores
        if layer.kind == "up":
            return 4 * p * k.up * layer.channels_in
        return p * layer.channels_out

    def motion_values(self, layer: Layer, positions: int, whole: bool) -> float:
        """Values alive inside a motion module run over `positions` positions of the whole batch
        (`whole`: AnimateDiff-Evolved's own forward, which keeps more full-size temporaries)."""
        w, k = self.work, self.k
        scores = k.motion_scores * layer.heads * positions * w.frames * w.batch if w.attention_scores else 0.0
        return w.batch * positions * (k.motion_whole if whole else k.motion) * layer.channels_in + scores

    def frame_chunk(self, channels: int, level: int, attends: bool) -> int:
        if self.config is None:
            return self.work.batch
        ctx = 2 * self.work.context_tokens
        sample = channels * (self.positions(level) + (ctx if attends else 0))
        top = self.shape.model_channels * (self.positions(0) + ctx)
        return frame_chunk_size(self.config, self.work.batch, sample, top)

    def run_frames(self, layers: list[Layer], level_in: int, channels_in: int, outside: float,
                   pending: Layer | None = None) -> tuple[int, int]:
        """A per-frame group; returns (level, channels) of its output. `pending`: the previous block's
        Upsample, run per chunk first (its input is one level deeper)."""
        b = self.work.batch
        attends = any(layer.kind == "attn" for layer in layers)
        n = self.frame_chunk(channels_in, level_in, attends)
        level, channels, chunk_peak = level_in, channels_in, 0.0
        current = channels_in * self.positions(level_in)  # per sample: the chunk's input (the concatenation)
        if pending is not None:
            low = pending.channels_in * self.positions(level_in + 1)
            chunk_peak = max(low + self.layer_values(pending, level_in + 1),
                             pending.channels_out * self.positions(level_in) + current)
        for layer in layers:
            inside = self.layer_values(layer, level) * (self.k.plain if self.config is None else 1.0)
            chunk_peak = max(chunk_peak, current + inside)
            if layer.kind == "up":
                level -= 1
            elif layer.kind == "down":
                level += 1
            channels = layer.channels_out
            current = channels * self.positions(level)
        out_buffer = b * current if n < b else 0.0
        self.see(outside + out_buffer + n * chunk_peak)
        return level, channels

    def run_motion(self, layer: Layer, level: int, outside: float) -> None:
        p = self.positions(level)
        if self.config is None:
            s = p
        else:
            s = spatial_chunk_size(self.config, self.work.batch, p, layer.channels_in, self.shape.model_channels)
        self.see(outside + self.motion_values(layer, s, whole=s >= p))

    def block(self, block: Block, level: int, channels: int, h_values: float, skip_values: float,
              pending: Layer | None = None) -> tuple[int, int]:
        """Run one block; `h_values`: the block input (total values), alive until the block ends."""
        outside = sum(self.skips) + h_values + skip_values
        segment: list[Layer] = []
        channels_in = channels + block.skip_channels
        for layer in block.layers + (Layer("end", 0, 0),):
            if layer.kind in ("res", "attn", "up", "down", "other"):
                segment.append(layer)
                continue
            if segment:
                level, channels = self.run_frames(segment, level, channels_in, outside, pending)
                pending = None
                channels_in = channels
                # the block's input and skip stay referenced until the block returns
                outside = sum(self.skips) + h_values + skip_values + self.work.batch * channels * self.positions(level)
                segment = []
            if layer.kind == "motion":
                self.run_motion(layer, level, outside)
        return level, channels

    def walk(self) -> float:
        b, level, channels = self.work.batch, 0, 4
        for block in self.shape.input_blocks:
            h = b * channels * self.positions(level)
            level, channels = self.block(block, level, channels, 0.0 if self.skips else h, 0.0)
            self.skips.append(b * channels * self.positions(level))
        level, channels = self.block(self.shape.middle, level, channels, 0.0, 0.0)
        pending = None
        for i, block in enumerate(self.shape.output_blocks):
            skip = self.skips.pop()
            h = b * channels * self.positions(level + (pending is not None))
            layers = block.layers
            # the sliced forward runs a block's trailing Upsample per chunk inside the next block
            defer = self.config is not None and layers[-1].kind == "up" and i + 1 < len(self.shape.output_blocks)
            if defer:
                block = replace(block, layers=layers[:-1])
            level, channels = self.block(block, level, channels, h, skip, pending)
            pending = layers[-1] if defer else None
            if defer:
                level -= 1
        return self.peak * self.work.dtype_bytes


def predict_peak_bytes(shape: UNetShape, work: Workload, config: SliceConfig | None,
                       coefficients: Coefficients = CPU_COEFFICIENTS) -> int:
    """Peak activation bytes of one forward: patched with `config`, or ComfyUI's plain forward (None)."""
    return int(_Walk(shape, work, config, coefficients).walk())


def sd15_shape(motion_modules: bool = True) -> UNetShape:
    """SD1.5's UNet (ComfyUI layout), with AnimateDiff motion modules where ADE injects them."""
    mc, heads = 320, 8
    mult = (1, 2, 4, 4)

    def mm(c: int) -> tuple[Layer, ...]:
        return (Layer("motion", c, c, 8),) if motion_modules else ()

    inputs = [Block((Layer("other", 4, mc),))]
    channels = mc
    for level, m in enumerate(mult):
        for _ in range(2):
            out = mc * m
            layers = (Layer("res", channels, out),) + ((Layer("attn", out, out, heads),) if level < 3 else ()) + mm(out)
            inputs.append(Block(layers))
            channels = out
        if level < 3:
            inputs.append(Block((Layer("down", channels, channels),)))
    middle = Block((Layer("res", 1280, 1280), Layer("attn", 1280, 1280, heads)) + mm(1280) + (Layer("res", 1280, 1280),))
    skip_channels = [b.layers[-1].channels_out if b.layers[-1].kind != "motion" else b.layers[-1].channels_in
                     for b in inputs]
    outputs = []
    for level, m in reversed(list(enumerate(mult))):
        for i in range(3):
            skip = skip_channels.pop()
            out = mc * m
            layers = (Layer("res", channels + skip, out),) + ((Layer("attn", out, out, heads),) if level < 3 else ()) + mm(out)
            if level > 0 and i == 2:
                layers += (Layer("up", out, out),)
            outputs.append(Block(layers, skip_channels=skip))
            channels = out
    return UNetShape(mc, tuple(inputs), middle, tuple(outputs))


@dataclass(frozen=True)
class Plan:
    config: SliceConfig
    predicted_peak_bytes: int
    baseline_peak_bytes: int

    def text(self) -> str:
        gib = 2**30
        return (f"frame_chunk {self.config.frame_chunk}, spatial_chunk {self.config.spatial_chunk}: predicted peak "
                f"activation {self.predicted_peak_bytes / gib:.2f} GiB (unpatched {self.baseline_peak_bytes / gib:.2f} GiB)")


def candidate_configs(work: Workload) -> Iterable[SliceConfig]:
    """Chunk settings from coarse (fast) to fine (small)."""
    positions = work.height * work.width
    frames = sorted({work.batch, *(f for f in (32, 16, 8, 4, 2, 1) if f < work.batch)}, reverse=True)
    spatial = sorted({positions, *(s for s in (4096, 2048, 1024, 512, 256, 128, 64, 32, 16) if s < positions)},
                     reverse=True)
    for f in frames:
        for s in spatial:
            yield SliceConfig(frame_chunk=f, spatial_chunk=s)


def plan(shape: UNetShape, work: Workload, budget_bytes: int,
         coefficients: Coefficients = CPU_COEFFICIENTS) -> Plan:
    """The coarsest slicing (fewest, largest chunks: the least slowdown) predicted to fit the budget."""
    baseline = predict_peak_bytes(shape, work, None, coefficients)
    best: tuple[float, Plan] | None = None
    smallest = None
    for config in candidate_configs(work):
        peak = predict_peak_bytes(shape, work, config, coefficients)
        smallest = peak if smallest is None else min(smallest, peak)
        if peak <= budget_bytes:
            chunks = _chunk_count(work, config)
            if best is None or chunks < best[0] or (chunks == best[0] and peak < best[1].predicted_peak_bytes):
                best = (chunks, Plan(config, peak, baseline))
    if best is None:
        raise BudgetError(f"no slicing fits {budget_bytes / 2**30:.2f} GiB of activation memory for "
                          f"{work.batch} samples at {work.height}x{work.width} latent; the minimum feasible budget "
                          f"is {smallest / 2**30:.2f} GiB")
    return best[1]


def _chunk_count(work: Workload, config: SliceConfig) -> float:
    """A proxy for slowdown: kernel launches grow with the number of chunks at full resolution."""
    frames = -(-work.batch // config.frame_chunk)
    positions = -(-(work.height * work.width) // config.spatial_chunk)
    return frames + 0.25 * positions
