"""Memory Budget: predict the peak activation memory of one UNet forward, and pick slices that fit.

Two parts:
- what one layer holds at its peak, per sample (its working set): laws read off each layer's operator
  sequence and checked layer by layer against measured peaks (docs/budget_calibration.md,
  `python tools/calibrate_budget.py`). Attention kernels differ: ComfyUI's sub-quadratic attention (its
  CPU default) materialises the attention scores, PyTorch's SDPA (its CUDA default) does not;
- a walk over the UNet's blocks in execution order that keeps what the forward keeps alive around each
  layer: skip tensors, block inputs, output buffers, and one chunk's working set. It follows either
  ComfyUI's own forward (config None) or the streamlined forward (families/unet/forward.py);
- with skip offload (config.offload_skips, core/offload.py) the walk keeps on the device only the skips
  the offloaded forward keeps there: the latest one on the way down, the deepest one until the first
  output block reads it, and on the way up the rows of the skip each frame chunk joins (and the next
  chunk's rows, on their way), or, in ADE's GroupNorm-over-videos mode, the whole skip and the next one;
- with feature offload too (config.offload_features) a block's output that the next block's first group
  reads chunk by chunk is in host memory from the moment it is written: that group holds its rows (this
  chunk's and the next chunk's) instead of the whole of it, and the rest of the block holds none of it.
Nothing is fitted to whole-UNet peaks: those are the check (tests/test_budget.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

from .plan_search import ALLOCATOR_HEADROOM, Fit, PlanSearch, cheapest_fit, format_bytes
from .slicing import SliceConfig, frame_chunk_size, spatial_chunk_size


@dataclass(frozen=True)
class Layer:
    kind: str  # "res" | "attn" | "motion" | "up" | "down" | "out" | "other"
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
    video_length: int  # frames per video: what the motion modules attend over
    height: int  # latent
    width: int
    context_tokens: int = 77
    dtype_bytes: int = 4
    # AnimateDiff-Evolved's GroupNorm over whole videos (v1, PIA): the sliced forward gives each layer
    # that starts with a GroupNorm a group of its own and runs no Upsample inside the next block
    video_norm: bool = False


@dataclass(frozen=True)
class WorkingSets:
    """Values a layer holds at its peak per value it touches: its input not counted, its output counted.
    ResBlocks, up/downsampling and the output head follow from their operator sequence exactly (see
    _Walk.layer_values); these are the transformer laws, measured layer by layer."""

    feed_forward: float = 20.0  # spatial transformer, per position x channel: GEGLU's 8C projection, 4C gate, 4C product
    self_attention: float = 6.0  # per position x channel (q, k, v, per-head copies), plus the scores
    cross_attention: float = 5.0  # per position x channel, plus `cross_context` per context token x channel
    cross_context: float = 4.0  # keys and values of the context and their per-head copies
    scores: float = 2.0  # per attention score (scores and softmax); 0 where the kernel never materialises them
    motion: float = 20.0  # a motion module run whole (AnimateDiff-Evolved's forward), per token x channel
    motion_chunk: float = 21.0  # one spatial chunk of the sliced motion module, per token x channel
    motion_attention: float = 8.0  # temporal attention phase, per token x channel, plus the scores


# ComfyUI's sub-quadratic attention (its default on the CPU) and PyTorch SDPA (its default on CUDA).
SUB_QUADRATIC = WorkingSets()
SDPA = WorkingSets(self_attention=6.0, cross_attention=6.0, cross_context=2.0, scores=0.0, motion_attention=6.0)


# -- laws of the layers both UNets share (SD's here, SVD's in families/svd/laws.py), values per sample -------


def res_block_values(ci: int, co: int, p: int) -> float:
    """A ResBlock on p positions: GroupNorm + SiLU on the input, GroupNorm + SiLU + conv on h, skip conv, sum."""
    return p * max(2 * ci, ci + co, 3 * co)


def transformer_block_values(laws: WorkingSets, c: int, heads: int, p: int, context_tokens: int) -> float:
    """A BasicTransformerBlock on p tokens of c channels: the largest of its feed-forward, self-attention
    and cross-attention phases (scores as the attention kernel holds them)."""
    return max(laws.feed_forward * p * c, laws.self_attention * p * c + laws.scores * heads * p * p,
               laws.cross_attention * p * c + laws.cross_context * context_tokens * c + laws.scores * heads * p * context_tokens)


def conv_layer_values(kind: str, ci: int, co: int, p: int, p_below: int) -> float:
    """The UNet's other per-frame layers on p positions (p_below: the positions one level down)."""
    if kind == "up":  # nearest x2, then a conv: both at 4x the positions
        return 4 * p * (ci + co)
    if kind == "down":
        return p_below * co
    if kind == "out":  # GroupNorm, SiLU, conv
        return p * max(2 * ci, ci + co)
    return p * co


@dataclass
class _Walk:
    shape: UNetShape
    work: Workload
    config: SliceConfig | None  # None: ComfyUI's plain forward
    laws: WorkingSets
    peak: float = 0.0
    skips: list[float] = field(default_factory=list)
    top_on_device: bool = True  # offload: the latest skip has not left the device (nothing popped yet)

    @property
    def offload(self) -> bool:
        return self.config is not None and self.config.offload_skips

    @property
    def offload_features(self) -> bool:
        """Feature offload (never in the GroupNorm-over-videos mode: its groups read whole videos)."""
        return self.offload and self.config.offload_features and not self.work.video_norm

    def resident_skips(self) -> float:
        """Skip values on the device between blocks."""
        if not self.offload:
            return sum(self.skips)
        return self.skips[-1] if self.skips and self.top_on_device else 0.0

    def positions(self, level: int) -> int:
        return max(1, (self.work.height >> level) * (self.work.width >> level))

    def see(self, values: float) -> None:
        self.peak = max(self.peak, values)

    def layer_values(self, layer: Layer, level: int) -> float:
        """Values one sample holds inside a per-frame layer whose input is at `level` (output included)."""
        p, ci, co = self.positions(level), layer.channels_in, layer.channels_out
        if layer.kind == "res":
            return res_block_values(ci, co, p)
        if layer.kind == "attn":
            return transformer_block_values(self.laws, ci, layer.heads, p, self.work.context_tokens)
        return conv_layer_values(layer.kind, ci, co, p, self.positions(level + 1))

    def motion_values(self, layer: Layer, level: int, positions: int) -> float:
        """Values a motion module holds over `positions` positions of every sample: all of them
        (AnimateDiff-Evolved's own forward) or one spatial chunk of the sliced module."""
        k, tokens = self.laws, self.work.batch * positions
        per_token = k.motion if positions >= self.positions(level) else k.motion_chunk
        attention = k.motion_attention * layer.channels_in + k.scores * layer.heads * self.work.video_length
        return tokens * max(per_token * layer.channels_in, attention)

    def next_level(self, layer: Layer, level: int) -> int:
        return level - 1 if layer.kind == "up" else level + 1 if layer.kind == "down" else level

    # -- ComfyUI's forward ------------------------------------------------------------------------------

    def plain_block(self, layers: Iterable[Layer], level: int, channels: int, held: float) -> tuple[int, int]:
        """forward_timestep_embed: `held` is the block's input when it is no skip (the concatenation);
        each layer's input is alive while it runs."""
        b, outside, current = self.work.batch, sum(self.skips) + held, 0.0
        for layer in layers:
            if layer.kind == "motion":
                inside = self.motion_values(layer, level, self.positions(level))
            else:
                inside = b * self.layer_values(layer, level)
            self.see(outside + current + inside)
            level, channels = self.next_level(layer, level), layer.channels_out
            current = b * channels * self.positions(level)
        return level, channels

    def walk_plain(self) -> None:
        b, level, channels = self.work.batch, 0, self.shape.input_blocks[0].layers[0].channels_in
        for block in self.shape.input_blocks:
            level, channels = self.plain_block(block.layers, level, channels, 0.0)  # input: the last skip
            self.skips.append(b * channels * self.positions(level))
        level, channels = self.plain_block(self.shape.middle.layers, level, channels, 0.0)
        for block in self.shape.output_blocks:
            skip, h = self.skips.pop(), b * channels * self.positions(level)
            joined = b * (channels + block.skip_channels) * self.positions(level)
            self.see(sum(self.skips) + skip + h + joined)  # torch.cat([h, skip])
            level, channels = self.plain_block(block.layers, level, channels + block.skip_channels, joined)
        self.plain_block((self.out_layer(channels),), level, channels, b * channels * self.positions(level))

    def out_layer(self, channels: int) -> Layer:
        return Layer("out", channels, self.shape.out_channels)

    # -- the streamlined forward ------------------------------------------------------------------------

    def frame_chunk(self, channels: int, level: int, attends: bool) -> int:
        """StreamlinedForward.frames_chunk."""
        ctx = 2 * self.work.context_tokens
        sample = channels * (self.positions(level) + (ctx if attends else 0))
        top = self.shape.model_channels * (self.positions(0) + ctx)
        return frame_chunk_size(self.config, self.work.batch, sample, top)

    def sliced_frames(self, layers: list[Layer], level: int, channels_in: int, outside: float,
                      pending: Layer | None, joins_skip: bool, streamed_skip: int = 0,
                      streamed_input: int = 0) -> tuple[int, int]:
        """StreamlinedForward.run_frames: chunk by chunk, the previous block's Upsample (`pending`, its
        input one level deeper), the concatenation with the skip, then `layers`, into one buffer.
        streamed_skip: channels of an offloaded skip whose rows come from host memory per chunk;
        streamed_input: channels of the group's input when its rows come from host memory (feature
        offload; at `pending`'s input level when there is one)."""
        b = self.work.batch
        n = self.frame_chunk(channels_in, level, any(layer.kind == "attn" for layer in layers))
        # per sample: the peak; the group's input when the chunk made it (its rows from host memory,
        # upsampled, joined with the skip), which stays referenced until the group returns; the previous
        # layer's output
        chunk, chunk_input, alive = 0.0, 0.0, 0.0
        # an offloaded skip's rows: this chunk's, alive while it is joined, and the next chunk's, arriving;
        # the same for an offloaded input
        rows = streamed_skip * self.positions(level)
        input_rows = streamed_input * self.positions(level + (pending is not None))
        incoming = rows + input_rows if n < b else 0.0
        chunk_input = input_rows
        if pending is not None:
            chunk = input_rows + self.layer_values(pending, level + 1) + incoming
            chunk_input = pending.channels_out * self.positions(level)
        if joins_skip:
            joined = channels_in * self.positions(level)
            chunk, chunk_input = max(chunk, chunk_input + rows + incoming + joined), joined
        channels = channels_in
        for layer in layers:
            chunk = max(chunk, chunk_input + alive + incoming + self.layer_values(layer, level))
            level, channels = self.next_level(layer, level), layer.channels_out
            alive = channels * self.positions(level)
        self.see(outside + (b * alive if n < b else 0.0) + n * chunk)
        return level, channels

    def sliced_block(self, layers: tuple[Layer, ...], level: int, channels: int, held: float,
                     skip: Block | None = None, skip_values: float = 0.0,
                     pending: Layer | None = None, streamed_skip: int = 0,
                     streamed_input: int = 0) -> tuple[int, int]:
        """StreamlinedForward.run_block. `held`: the block's input when it is no skip; `skip`: the
        output block whose skip joins the first group (`skip_values` of it on the device, or its rows per
        chunk: `streamed_skip` channels); streamed_input: channels of the block's input when it is in
        host memory (feature offload), read by rows by the first group only."""
        b = self.work.batch
        outside = self.resident_skips() + held + skip_values
        current, owned, segment = 0.0, False, []  # current: h inside the block, once it is not the input
        channels_in = channels + (skip.skip_channels if skip else 0)
        for layer in layers + (Layer("end", 0, 0),):
            if layer.kind not in ("motion", "end") and not (segment and self.starts_group(layer)):
                segment.append(layer)
                continue
            if segment:
                level, channels = self.sliced_frames(segment, level, channels_in, outside + current, pending,
                                                     joins_skip=skip is not None,
                                                     streamed_skip=streamed_skip if skip is not None else 0,
                                                     streamed_input=streamed_input)
                current, owned, pending, skip, segment = b * channels * self.positions(level), True, None, None, []
                streamed_input = 0
                channels_in = channels
            if layer.kind not in ("motion", "end"):  # a layer that starts a group of its own
                segment.append(layer)
                continue
            if layer.kind == "motion":
                p = self.positions(level)
                s = spatial_chunk_size(self.config, b, p, layer.channels_in, self.shape.model_channels)
                if s >= p:  # runs whole, through AnimateDiff-Evolved's forward: a new output
                    self.see(outside + current + self.motion_values(layer, level, p))
                else:  # in place on a buffer of this forward, else into a new one
                    self.see(outside + current + (0.0 if owned else b * channels * p)
                             + self.motion_values(layer, level, s))
                current, owned = b * channels * p, True
        return level, channels

    def starts_group(self, layer: Layer) -> bool:
        """In the GroupNorm-over-videos mode a layer that starts with a GroupNorm needs its input whole."""
        return self.work.video_norm and layer.kind in ("res", "attn")

    def walk_sliced(self) -> None:
        b, level, channels = self.work.batch, 0, self.shape.input_blocks[0].layers[0].channels_in
        inputs, outputs = self.shape.input_blocks, self.shape.output_blocks
        streamed = 0  # channels of the block's input, in host memory (feature offload)
        for k, block in enumerate(inputs):
            level, channels = self.sliced_block(block.layers, level, channels, 0.0, streamed_input=streamed)
            self.skips.append(b * channels * self.positions(level))
            # feature offload: a skip the next block reads by chunks leaves at once, the deepest stays
            leaves = self.offload_features and k + 1 < len(inputs) and layers_join_in_chunks(inputs[k + 1])
            self.top_on_device = not leaves
            streamed = channels if leaves else 0
        level, channels = self.sliced_block(self.shape.middle.layers, level, channels, 0.0)
        leaves = self.offload_features and layers_join_in_chunks(outputs[0])  # the middle's output
        pending = None
        for i, block in enumerate(outputs):
            skip = self.skips.pop()
            streamed = 0
            if self.offload and not self.top_on_device:  # the skip comes back from host memory
                if self.work.video_norm:  # whole, and the next one whole, one block ahead
                    skip += self.skips[-1] if self.skips else 0.0
                elif layers_join_in_chunks(block):
                    skip, streamed = 0.0, block.skip_channels
            self.top_on_device = False
            h = b * channels * self.positions(level + (pending is not None))
            layers = block.layers
            # the sliced forward runs a block's trailing Upsample per chunk inside the next block
            defer = layers[-1].kind == "up" and i + 1 < len(self.shape.output_blocks) and not self.work.video_norm
            level, channels = self.sliced_block(layers[:-1] if defer else layers, level, channels,
                                                0.0 if leaves else h, block, skip, pending, streamed,
                                                streamed_input=channels if leaves else 0)
            pending = layers[-1] if defer else None
            if defer:  # h stays one level deeper until the next block upsamples it per chunk
                level -= 1
            # feature offload: this block's output leaves when the next block (or the head) reads it by chunks
            leaves = self.offload_features and (i + 1 == len(outputs) or layers_join_in_chunks(outputs[i + 1]))
        h = b * channels * self.positions(level)
        self.sliced_frames([self.out_layer(channels)], level, channels, 0.0 if leaves else h, pending,
                           joins_skip=False, streamed_input=channels if leaves else 0)

    def walk(self) -> float:
        if self.config is None:
            self.walk_plain()
        else:
            self.walk_sliced()
        return self.peak * self.work.dtype_bytes


def layers_join_in_chunks(block: Block) -> bool:
    """Whether the streamlined forward joins an output block's skip per frame chunk (its first layer is
    a per-frame one), so an offloaded skip comes back by rows."""
    return bool(block.layers) and block.layers[0].kind not in ("motion",)


def predict_peak_bytes(shape: UNetShape, work: Workload, config: SliceConfig | None,
                       laws: WorkingSets = SUB_QUADRATIC) -> int:
    """Peak activation bytes of one forward: patched with `config`, or ComfyUI's plain forward (None)."""
    return int(_Walk(shape, work, config, laws).walk())


@dataclass(frozen=True)
class Traffic:
    """What offload moves in one forward: bytes held in (pinned) host memory at most, bytes copied
    out and back."""

    host_bytes: int
    moved_bytes: int


def offload_traffic(shape: UNetShape, work: Workload, features: bool = False) -> Traffic:
    """Skip offload: every skip but the deepest leaves the device and comes back once. Feature offload
    (`features`, as _Walk.walk_sliced has it) adds: each of those skips comes back by rows once more, for
    the block after the one that made it; the middle's and each output block's output (before a deferred
    Upsample) leaves and comes back once. The host holds at most the skips not yet popped plus the latest
    output (the one before it and the popped skip are released by then)."""
    b, level, channels, skips = work.batch, 0, shape.input_blocks[0].layers[0].channels_in, []

    def values(channels: int, level: int) -> int:
        return b * channels * max(1, (work.height >> level) * (work.width >> level))

    def through(layers: Iterable[Layer], level: int, channels: int) -> tuple[int, int]:
        for layer in layers:
            level = level - 1 if layer.kind == "up" else level + 1 if layer.kind == "down" else level
            channels = layer.channels_out
        return level, channels

    inputs, outputs = shape.input_blocks, shape.output_blocks
    for block in inputs:
        level, channels = through(block.layers, level, channels)
        skips.append(values(channels, level))
    host = peak = sum(skips[:-1])
    moved = 2 * host
    if features and not work.video_norm:
        moved += sum(s for k, s in enumerate(skips[:-1]) if layers_join_in_chunks(inputs[k + 1]))
        level, channels = through(shape.middle.layers, level, channels)
        on_host = skips[:-1]
        for i, block in enumerate((None,) + outputs):  # the middle, then each output block
            if block is not None:
                on_host = on_host[:-1] if i > 1 else on_host  # output block 0 pops the deepest (on the device)
                defer = block.layers[-1].kind == "up" and i < len(outputs)
                level, channels = through(block.layers[:-1] if defer else block.layers, level, channels)
            if i == len(outputs) or layers_join_in_chunks(outputs[i]):
                feature = values(channels, level)
                peak, moved = max(peak, sum(on_host) + feature), moved + 2 * feature
            if block is not None and defer:
                level -= 1
    return Traffic(int(peak * work.dtype_bytes), int(moved * work.dtype_bytes))


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
    traffic: Traffic | None = None  # skip (and feature) offload, when the plan offloads

    def text(self) -> str:
        offload = ""
        if self.config.offload_skips and self.traffic is not None:
            what = "skips and block outputs" if self.config.offload_features else "skips"
            offload = (f", {what} offloaded to host memory ({format_bytes(self.traffic.host_bytes)} held there, "
                       f"{format_bytes(self.traffic.moved_bytes)} moved per forward)")
        return (f"frame_chunk {self.config.frame_chunk}, spatial_chunk {self.config.spatial_chunk}{offload}: predicted "
                f"peak activation {format_bytes(self.predicted_peak_bytes)} (unpatched "
                f"{format_bytes(self.baseline_peak_bytes)})")


def candidate_configs(work) -> list[SliceConfig]:
    """Chunk settings from coarse (fast) to fine (small), for a UNet's or SVD's work (batch, height, width)."""
    positions = work.height * work.width
    frame_chunks = sorted({work.batch, *(f for f in (32, 16, 8, 4, 2, 1) if f < work.batch)}, reverse=True)
    spatial = sorted({positions, *(s for s in (4096, 2048, 1024, 512, 256, 128, 64, 32, 16) if s < positions)},
                     reverse=True)
    return [SliceConfig(frame_chunk=f, spatial_chunk=s) for f in frame_chunks for s in spatial]


def chunk_count(work, config: SliceConfig) -> float:
    """A proxy for slowdown: kernel launches grow with the number of chunks at full resolution."""
    sample_chunks = -(-work.batch // config.frame_chunk)
    position_chunks = -(-(work.height * work.width) // config.spatial_chunk)
    return sample_chunks + 0.25 * position_chunks


# Skip offload's time, in the unit of chunk_count: its copies run on a side stream, overlapped with the
# compute, and cost about as much as this many more frame chunks. Not calibrated on a GPU yet
# (tools/gpu_evidence.py measures it); offload is planned only where slicing alone cannot fit, or where
# it fits the same budget with at least this many fewer chunks. Feature offload costs in proportion to
# the bytes it moves (offload_cost_chunks).
OFFLOAD_COST_CHUNKS = 2.0


def offload_cost_chunks(shape: UNetShape, work: Workload, config: SliceConfig) -> float:
    """Offload's cost in the unit of chunk_count: OFFLOAD_COST_CHUNKS for skip offload's traffic, scaled
    by the bytes moved (feature offload moves more)."""
    if not config.offload_skips:
        return 0.0
    skips = offload_traffic(shape, work).moved_bytes
    return OFFLOAD_COST_CHUNKS * offload_traffic(shape, work, config.offload_features).moved_bytes / max(skips, 1)


def offload_choices(sliced: SliceConfig, offload: bool) -> tuple[SliceConfig, ...]:
    """A slicing without offload, with skip offload, with skip and feature offload."""
    if not offload:
        return (sliced,)
    return sliced, replace(sliced, offload_skips=True), replace(sliced, offload_skips=True, offload_features=True)


def plan(shape: UNetShape, work: Workload, budget_bytes: int, laws: WorkingSets = SUB_QUADRATIC,
         headroom: float = ALLOCATOR_HEADROOM, offload: bool = False) -> Plan:
    """The coarsest slicing (fewest, largest chunks: the least slowdown) predicted to fit `headroom`
    of the budget (core/plan_search.py; BudgetError when none does). offload: skip offload, and skip and
    feature offload, may be planned (a device with host memory apart: CUDA); each is chosen when its slicing
    plus its cost (offload_cost_chunks) is cheaper than every fitting plan with less offload."""
    candidates = [config for sliced in candidate_configs(work) for config in offload_choices(sliced, offload)]
    search = PlanSearch(budget_bytes, f"{work.batch} samples at {work.height}x{work.width} latent", headroom)
    fit: Fit[SliceConfig] = cheapest_fit(
        candidates, lambda config: predict_peak_bytes(shape, work, config, laws), search,
        cost=lambda config: chunk_count(work, config) + offload_cost_chunks(shape, work, config))
    return Plan(fit.candidate, int(fit.peak_bytes), predict_peak_bytes(shape, work, None, laws),
                plan_traffic(shape, work, fit.candidate))


def plan_traffic(shape: UNetShape, work: Workload, config: SliceConfig) -> Traffic | None:
    """What a forward with `config` moves to host memory and back (None without offload)."""
    return offload_traffic(shape, work, config.offload_features) if config.offload_skips else None
