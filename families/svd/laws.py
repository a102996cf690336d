"""Memory Budget for SVD's video UNet: the peak activation memory of one forward, and slices that fit.

The same two parts as core/budget.py, for the layers of Stable Video Diffusion:
- working sets per layer, in values per sample (batch x frames) over its positions, read off the operator
  sequences of ComfyUI's forward (VideoResBlock.forward, SpatialVideoTransformer.forward) and of the
  sliced one (families/svd/forward.py), and checked layer by layer against the live-tensor counter
  (tests/test_svd_budget.py):
  * VideoResBlock, whole: the spatial ResBlock (core/budget.py's law), then the time_stack and time_mixer
    on the spatial output: spatial output, temporal output, the two weighted terms and their sum (5 per
    value). Sliced: the spatial ResBlock per frame chunk into one output buffer, then over position
    slices: the buffer (written in place), the first-pass buffer of the time_stack's hidden feature, and
    4 per value of one slice (GroupNorm, SiLU, convolution, sum);
  * SpatialVideoTransformer, whole: the time_context repeated for every position (ComfyUI repeats it for
    the temporal blocks: tokens x context_dim per position and video), the token feature and the spatial
    block's working set (core/budget.py's transformer laws: GEGLU feed-forward 20 per value, attention
    scores where the kernel keeps them). Sliced: the spatial block per frame chunk into a token buffer
    (+1), then the temporal block per position slice: 20 per value of the slice plus its repeated
    time_context, next to the token buffer and the layer's output;
- a walk over the blocks in execution order, keeping the skips, the block input, the output buffers
  and one chunk's working set: ComfyUI's forward (config None) or the sliced one, where per-frame layers
  of one block (and the next block's held-back Upsample and its concatenation with the skip) run as
  one group chunk by chunk.
Nothing is fitted to whole forwards: those are the check.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ...core.budget import (SDPA, SUB_QUADRATIC, Plan, WorkingSets, candidate_configs, chunk_count, conv_layer_values,
                           res_block_values, transformer_block_values)
from ...core.plan_search import ALLOCATOR_HEADROOM, PlanSearch, cheapest_fit
from ...core.slicing import SliceConfig, frame_chunk_size, spatial_chunk_size

__all__ = ["SVDLayer", "SVDStructure", "SVDWork", "predict_svd_peak_bytes", "plan_svd", "SUB_QUADRATIC", "SDPA"]

VIDEO_RES_WHOLE = 5.0  # time_stack output, spatial output, alpha * x_spatial, (1 - alpha) * x_temporal, the sum
VIDEO_RES_SLICE = 4.0  # per value of a position slice: GroupNorm, SiLU, conv3d, + emb / skip + h, mixer terms
TRANSFORMER_BASE = 1.0  # ComfyUI's forward: the token feature (proj_in output) beside a block's working set
TEMPORAL_BLOCK = 20.0  # VideoTransformerBlock (ff_in, self- and cross-attention over frames, GEGLU), per value


@dataclass(frozen=True)
class SVDLayer:
    kind: str  # "conv" | "video_res" | "video_transformer" | "down" | "up" | "out"
    channels_in: int
    channels_out: int
    heads: int = 0


@dataclass(frozen=True)
class SVDStructure:
    """An SVD UNet as the walk sees it: blocks of layers; output blocks with their skip's channels."""

    model_channels: int
    input_blocks: tuple[tuple[SVDLayer, ...], ...]
    middle: tuple[SVDLayer, ...]
    output_blocks: tuple[tuple[SVDLayer, ...], ...]
    skip_channels: tuple[int, ...]  # per output block
    context_dim: int = 1024


@dataclass(frozen=True)
class SVDWork:
    batch: int  # videos x frames (cond/uncond batched: 2 videos)
    video_length: int  # frames per video
    height: int  # latent
    width: int
    context_tokens: int = 1  # SVD: one CLIP-image token
    dtype_bytes: int = 4


def svd_structure(model_channels: int = 320, channel_mult=(1, 2, 4, 4), head_channels: int = 64,
                  in_channels: int = 8, out_channels: int = 4) -> SVDStructure:
    """SVD's layout (2 VideoResBlocks + SpatialVideoTransformers per level, none at the deepest; middle
    VideoResBlock, SpatialVideoTransformer, VideoResBlock; 3 output blocks per level, Upsample at the
    end of each level but the top), without a model."""
    def pair(ci: int, co: int, attends: bool) -> tuple[SVDLayer, ...]:
        return (SVDLayer("video_res", ci, co),) + ((SVDLayer("video_transformer", co, co, co // head_channels),)
                                                    if attends else ())

    inputs, skips, c = [(SVDLayer("conv", in_channels, model_channels),)], [model_channels], model_channels
    last = len(channel_mult) - 1
    for level, mult in enumerate(channel_mult):
        for _ in range(2):
            inputs.append(pair(c, model_channels * mult, level < last))
            c = model_channels * mult
            skips.append(c)
        if level < last:
            inputs.append((SVDLayer("down", c, c),))
            skips.append(c)
    middle = pair(c, c, True) + (SVDLayer("video_res", c, c),)
    outputs, skip_channels = [], []
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(3):
            skip = skips.pop()
            block = pair(c + skip, model_channels * mult, level < last)
            c = model_channels * mult
            if level > 0 and i == 2:
                block += (SVDLayer("up", c, c),)
            outputs.append(block)
            skip_channels.append(skip)
    return SVDStructure(model_channels, tuple(inputs), middle, tuple(outputs), tuple(skip_channels))


@dataclass
class _SVDWalk:
    s: SVDStructure
    work: SVDWork
    config: SliceConfig | None
    laws: WorkingSets
    peak: float = 0.0
    skips: list[float] = field(default_factory=list)

    def positions(self, level: int) -> int:
        return max(1, -(-self.work.height // 2**level)) * max(1, -(-self.work.width // 2**level))

    def see(self, values: float) -> None:
        self.peak = max(self.peak, values)

    def next_level(self, layer: SVDLayer, level: int) -> int:
        return level - 1 if layer.kind == "up" else level + 1 if layer.kind == "down" else level

    # -- laws, per sample ---------------------------------------------------------------------------

    def frame_values(self, layer: SVDLayer, level: int) -> float:
        """A per-frame layer (or a VideoResBlock's spatial part) at `level`, output included, input not."""
        p, ci, co = self.positions(level), layer.channels_in, layer.channels_out
        if layer.kind == "video_res":
            return res_block_values(ci, co, p)
        return conv_layer_values(layer.kind, ci, co, p, self.positions(level + 1))

    def spatial_block_values(self, layer: SVDLayer, p: int) -> float:
        """One BasicTransformerBlock on a sample's p tokens (output included), as core/budget.py's laws."""
        return transformer_block_values(self.laws, layer.channels_in, layer.heads, p, self.work.context_tokens)

    def time_context_values(self, p: int) -> float:
        """The time_context repeated for p positions of each video, per sample (einops makes the repeat
        a view, no copy, for a single video)."""
        if self.work.batch <= self.work.video_length:
            return 0.0
        return p * self.work.context_tokens * self.s.context_dim / self.work.video_length

    def whole_values(self, layer: SVDLayer, level: int) -> float:
        """ComfyUI's forward of one layer, per sample (output included, input not)."""
        p, co = self.positions(level), layer.channels_out
        if layer.kind == "video_res":
            return max(res_block_values(layer.channels_in, co, p), VIDEO_RES_WHOLE * p * co)
        if layer.kind == "video_transformer":
            return (TRANSFORMER_BASE * p * co + self.time_context_values(p)
                    + max(self.spatial_block_values(layer, p), TEMPORAL_BLOCK * p * co))
        return self.frame_values(layer, level)

    # -- ComfyUI's forward --------------------------------------------------------------------------

    def plain_block(self, layers, level: int, channels: int, held: float) -> tuple[int, int]:
        b, outside, current = self.work.batch, sum(self.skips) + held, 0.0
        for layer in layers:
            self.see(outside + current + b * self.whole_values(layer, level))
            level, channels = self.next_level(layer, level), layer.channels_out
            current = b * channels * self.positions(level)
        return level, channels

    def walk_plain(self) -> None:
        b, level, channels = self.work.batch, 0, 0
        for block in self.s.input_blocks:
            level, channels = self.plain_block(block, level, channels, 0.0)
            self.skips.append(b * channels * self.positions(level))
        level, channels = self.plain_block(self.s.middle, level, channels, 0.0)
        for block, skip_channels in zip(self.s.output_blocks, self.s.skip_channels):
            skip, h = self.skips.pop(), b * channels * self.positions(level)
            joined = b * (channels + skip_channels) * self.positions(level)
            self.see(sum(self.skips) + skip + h + joined)  # torch.cat([h, skip])
            level, channels = self.plain_block(block, level, channels + skip_channels, joined)
        out = SVDLayer("out", channels, 4)
        self.plain_block((out,), level, channels, b * channels * self.positions(level))

    # -- the sliced forward (families/svd/forward.py) -----------------------------------------------------

    def frame_chunk(self, sample_values: float) -> int:
        top = self.s.model_channels * self.positions(0)
        return frame_chunk_size(self.config, self.work.batch, int(sample_values), top)

    def group(self, ops: list[tuple[SVDLayer, int]], outside: float) -> float:
        """SVDForward.materialize: `ops` (layer, input level) chunk by chunk into one buffer (when sliced).
        Each op's input is alive while it runs; the chunk's output is counted in its last op.
        Returns the group output's values (all samples)."""
        b = self.work.batch
        peak_values = max(max(layer.channels_in * self.positions(level),
                              layer.channels_out * self.positions(self.next_level(layer, level)))
                          for layer, level in ops)
        n = self.frame_chunk(peak_values)
        chunk = max(layer.channels_in * self.positions(level) * (i > 0) + self.frame_values(layer, level)
                    for i, (layer, level) in enumerate(ops))
        last, level = ops[-1]
        out = b * last.channels_out * self.positions(self.next_level(last, level))
        self.see(outside + self.chunked(n, out, chunk))
        return out

    def chunked(self, n: int, out: float, chunk: float) -> float:
        """core/grouping.run_frame_chunked: the first chunk alone, then the output buffer (made after it)
        beside each later chunk (the largest: n samples, or the rest when there are only two)."""
        b = self.work.batch
        if n >= b:
            return n * chunk
        return max(n * chunk, out + min(n, b - n) * chunk)

    def video_res_temporal(self, layer: SVDLayer, level: int, outside: float) -> None:
        b, p, co = self.work.batch, self.positions(level), layer.channels_out
        s = spatial_chunk_size(self.config, b, p, co, self.s.model_channels)
        self.see(outside + 2 * b * co * p + VIDEO_RES_SLICE * b * co * s)

    def video_transformer(self, layer: SVDLayer, level: int, outside: float) -> None:
        b, p, c = self.work.batch, self.positions(level), layer.channels_in
        n = self.frame_chunk(c * (p + 2 * self.work.context_tokens))
        s = spatial_chunk_size(self.config, b, p, c, self.s.model_channels)
        # the layer's input (a VideoResBlock's output, owned) is written in place: no output buffer
        self.see(outside + self.chunked(n, b * c * p, self.spatial_block_values(layer, p)))
        self.see(outside + b * c * p + b * (TEMPORAL_BLOCK * s * c + self.time_context_values(s)))

    def sliced_block(self, layers, level: int, held: float, pending: list[tuple[SVDLayer, int]],
                     defer_tail: bool) -> tuple[int, float, list]:
        """SVDForward.run_block: `held` is the block input's values when no skip holds them (the
        previous output, or the deeper feature a pending Upsample reads); `pending` the per-frame ops
        waiting on it. Returns the level, the output's values and the ops still pending."""
        for layer in layers:
            if layer.kind == "video_res":  # the spatial ResBlock ends the pending group
                held = self.group(pending + [(layer, level)], sum(self.skips) + held)  # frees its input
                pending = []
                self.video_res_temporal(layer, level, sum(self.skips))  # in place on the group's output
            elif layer.kind == "video_transformer":
                if pending:
                    held, pending = self.group(pending, sum(self.skips) + held), []
                self.video_transformer(layer, level, sum(self.skips) + held)
            else:
                pending = pending + [(layer, level)]
            level = self.next_level(layer, level)
        if pending and not defer_tail:
            held, pending = self.group(pending, sum(self.skips) + held), []
        return level, held, pending

    def walk_sliced(self) -> None:
        level = 0
        for block in self.s.input_blocks:
            level, out, _ = self.sliced_block(block, level, 0.0, [], False)
            self.skips.append(out)  # hs keeps it: the next block's input is no extra
        level, held, _ = self.sliced_block(self.s.middle, level, 0.0, [], False)
        channels, pending = self.s.middle[-1].channels_out, []
        last = len(self.s.output_blocks) - 1
        for i, (block, skip_channels) in enumerate(zip(self.s.output_blocks, self.s.skip_channels)):
            # the skip stays in the list: it is alive until the block is done (read per chunk)
            concat = SVDLayer("concat", channels, channels + skip_channels)
            level, held, pending = self.sliced_block(block, level, held, pending + [(concat, level)], i < last)
            self.skips.pop()
            channels = block[-1].channels_out
        self.sliced_block((SVDLayer("out", channels, 4),), level, held, pending, False)

    def walk(self) -> float:
        (self.walk_plain if self.config is None else self.walk_sliced)()
        return self.peak


def predict_svd_peak_bytes(structure: SVDStructure, work: SVDWork, config: SliceConfig | None,
                           laws: WorkingSets = SUB_QUADRATIC) -> int:
    """Peak activation bytes of one forward: ComfyUI's (config None) or the sliced one."""
    return int(_SVDWalk(structure, work, config, laws).walk() * work.dtype_bytes)


def plan_svd(structure: SVDStructure, work: SVDWork, budget_bytes: int, laws: WorkingSets = SUB_QUADRATIC,
             headroom: float = ALLOCATOR_HEADROOM) -> Plan:
    """The coarsest slicing predicted to fit `headroom` of the budget: core/budget.py's candidates and
    chunk count, searched by core/plan_search.py (BudgetError when none fits)."""
    search = PlanSearch(budget_bytes, f"{work.batch} SVD samples at {work.height}x{work.width} latent", headroom)
    fit = cheapest_fit(candidate_configs(work), lambda config: predict_svd_peak_bytes(structure, work, config, laws),
                       search, cost=lambda config: chunk_count(work, config))
    return Plan(fit.candidate, int(fit.peak_bytes), predict_svd_peak_bytes(structure, work, None, laws))


SVD_DEFAULT_FRAMES = 14  # what the estimate assumes when a call's frame count is unknown (SVD's own default)


def svd_video_length(kwargs: dict, x: Tensor, unet) -> int:
    """Frames per video of one SVD call (the model passes num_video_frames; the batch is videos x frames)."""
    frames = kwargs.get("num_video_frames") or getattr(unet, "default_num_video_frames", None) or x.shape[0]
    return int(frames) if x.shape[0] % int(frames) == 0 else x.shape[0]


def preview_latent(width: int, height: int, clip_frames: int) -> tuple[int, ...]:
    """The latent of one sampling call with cond and uncond batched (SVD's frames are its batch)."""
    return (2 * clip_frames, 4, height // 8, width // 8)
