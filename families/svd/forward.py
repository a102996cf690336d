"""A sliced, grouped forward for ComfyUI's SVD video UNet (UNetModel with VideoResBlock and SpatialVideoTransformer).

It computes what `UNetModel._forward` computes on Stable Video Diffusion, with the same
transformer_options patches, ControlNet residuals and transformer_index bookkeeping, but each layer's
parts run on the axis they do not mix:
- per-frame parts (the spatial ResBlock of a VideoResBlock, the spatial transformer block of a
  SpatialVideoTransformer, Downsample/Upsample, convolutions) over the (batch x frames) axis, chunk by
  chunk; consecutive ones form one group (an output block's Upsample runs per chunk at the start of the
  next block's first group, the concatenation with the skip too: neither is materialised whole);
- temporal parts over spatial positions, all frames of each video in a slice: a VideoResBlock's
  time_stack (a ResBlock whose 3D convolutions, kernel (3, 1, 1), mix frames at each position; its two
  GroupNorms take statistics over the frames and positions of each video: the first from the whole
  input, the second from a first pass whose output waits in one buffer for the second pass) and
  time_mixer; a SpatialVideoTransformer's temporal blocks (time_pos_embed, time_context), time_mixer,
  proj_out and residual (added in place into the layer's input when this forward owns it).
A layer it does not know (a subclass, an unknown module, a VideoResBlock with another structure) or
cannot honour exactly (attention patches, a context or indicator not per sample) runs whole through
ComfyUI's forward_timestep_embed, logged once. The layer forwards mirror ComfyUI's VideoResBlock.forward
(with ResBlock._forward for the time_stack) and SpatialVideoTransformer.forward: their fingerprints are in
host_fingerprints.RECORDED, and the wrapper runs this forward only where the host verdict allows it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from comfy.ldm.modules.attention import SpatialTransformer, SpatialVideoTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import (
    Downsample, ResBlock, UNetModel, Upsample, VideoResBlock, apply_control, forward_timestep_embed,
)
from comfy.ldm.modules.diffusionmodules.util import AlphaBlender, timestep_embedding
from einops import rearrange, repeat
from torch import Tensor

from ...core.grouping import run_frame_chunked
from ...core.groupnorm import channel_moments, video_group_stats
from ...core.slicing import SliceConfig, chunk_ranges, frame_chunk_size, spatial_chunk_size
from ..unet_common.group_norm import normalize
from ..unet_common.inputs import BLOCK_LEVEL_PATCHES
from ..unet_common.layer_roles import Role, role_of
from ..unet_common.prologue import middle_block_after, time_embedding
from ..unet_common.self_check import sliced_unet_self_check
from ...host import fingerprints as host_fingerprints
from ...host.log import LogOnce
from ...host.options import REHASH_CALL_KEY

FrameOp = Callable[[Tensor, int, int], Tensor]  # samples [start, end) of a feature -> their output

def svd_functions() -> dict[str, Callable]:
    return {"comfy VideoResBlock.forward": VideoResBlock.forward,
            "comfy SpatialVideoTransformer.forward": SpatialVideoTransformer.forward}


# -- layers: what the sliced path knows ---------------------------------------------------------------

def video_resblock_reason(layer: nn.Module) -> str | None:
    """Why this VideoResBlock must run whole (None: the sliced path knows its structure)."""
    if type(layer) is not VideoResBlock:
        return f"{type(layer).__name__} (a VideoResBlock subclass)"
    stack = layer.time_stack
    if type(stack) is not ResBlock or stack.updown or stack.use_scale_shift_norm or stack.skip_t_emb \
            or not stack.exchange_temb_dims:
        return "a VideoResBlock whose time_stack is not the plain 3D ResBlock"
    if not (len(stack.in_layers) == 3 and isinstance(stack.in_layers[0], nn.GroupNorm)
            and isinstance(stack.out_layers[0], nn.GroupNorm)):
        return "a VideoResBlock whose time_stack has other layers"
    if type(layer.time_mixer) is not AlphaBlender:
        return "a VideoResBlock with another time_mixer"
    return None


def video_transformer_reason(layer: nn.Module) -> str | None:
    """Why this SpatialVideoTransformer must run whole (None: the sliced path knows its structure)."""
    if type(layer) is not SpatialVideoTransformer:
        return f"{type(layer).__name__} (a SpatialVideoTransformer subclass)"
    if type(layer.time_mixer) is not AlphaBlender or len(layer.time_stack) != len(layer.transformer_blocks):
        return "a SpatialVideoTransformer with another structure"
    return None


def _next_shape(layer: nn.Module, shape: tuple[int, int, int], output_shape) -> tuple[int, int, int]:
    """(channels, height, width) after a per-frame layer, for sizing chunks (not for computing)."""
    channels, height, width = shape
    if isinstance(layer, Upsample):
        height, width = (output_shape[-2:] if output_shape is not None else (height * 2, width * 2))
    elif isinstance(layer, Downsample):
        height, width = (height + 1) // 2, (width + 1) // 2
    out = getattr(layer, "out_channels", None)
    return (out if isinstance(out, int) else channels), height, width


@dataclass
class Feature:
    """A (batch*frames, C, H, W) feature: `base`, with per-frame ops still to run on it chunk by chunk
    (a group waiting for the layer that needs it whole). `owned`: base is a tensor this forward made
    and nothing else reads, which may be written in place."""

    base: Tensor | None
    owned: bool = False
    ops: list[FrameOp] = field(default_factory=list)
    shape: tuple[int, int, int] = (0, 0, 0)  # (channels, height, width) after the ops
    peak_values: int = 0  # the most values per sample a tensor of the group holds

    @classmethod
    def of(cls, tensor: Tensor, owned: bool) -> "Feature":
        shape = tuple(tensor.shape[1:4]) if tensor.ndim == 4 else (tensor.shape[1], 1, 1)
        return cls(tensor, owned, [], shape, shape[0] * shape[1] * shape[2])

    def then(self, op: FrameOp, shape: tuple[int, int, int]) -> "Feature":
        self.ops.append(op)
        self.shape = shape
        self.peak_values = max(self.peak_values, shape[0] * shape[1] * shape[2])
        return self

    def take(self) -> Tensor:
        """The base, handed over: this object no longer keeps it alive."""
        base, self.base = self.base, None
        return base


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class SVDForward:
    """One UNet forward of an SVD UNet. Holds what every group of that forward shares."""

    def __init__(self, unet: UNetModel, config: SliceConfig, log: LogOnce, x: Tensor, emb: Tensor,
                 context: Tensor | None, transformer_options: dict, frames: int, image_only_indicator,
                 time_context):
        self.unet, self.config, self.log = unet, config, log
        self.emb, self.context, self.to = emb, context, transformer_options
        self.frames, self.indicator, self.time_context = frames, image_only_indicator, time_context
        self.batch = x.shape[0]
        self.top_channels = unet.model_channels
        self.top_sample_values = unet.model_channels * x.shape[-2] * x.shape[-1]
        self.context_tokens = context.shape[1] if context is not None and context.ndim == 3 else 0
        self.video_kwargs = dict(time_context=time_context, num_video_frames=frames,
                                 image_only_indicator=image_only_indicator)
        patches = transformer_options.get("patches", {})
        self.patched_types = tuple(cls for cls, _ in patches.get("forward_timestep_embed_patch", []))
        attention = sorted(k for k, v in patches.items() if v and k not in BLOCK_LEVEL_PATCHES)
        attention += sorted(k for k, v in transformer_options.get("patches_replace", {}).items() if v)
        self.temporal_reason = self._temporal_reason(attention)

    def _temporal_reason(self, attention_patches: list[str]) -> str | None:
        """Why no video layer of this call can be sliced (None: they can)."""
        frames, batch = self.frames, self.batch
        if not isinstance(frames, int) or frames < 1 or batch % frames:
            return f"a batch of {batch} samples is not whole videos of {frames} frames"
        if attention_patches:
            return f"attention patches ({', '.join(attention_patches)})"
        if self.emb.shape[0] != batch:
            return f"emb batch {self.emb.shape[0]} differs from the latent batch {batch}"
        if self.context is not None and (self.context.ndim != 3 or self.context.shape[0] != batch):
            return f"a context of shape {tuple(self.context.shape)}, not one per sample"
        indicator = self.indicator
        if indicator is not None and tuple(indicator.shape) != (batch // frames, frames):
            return f"an image_only_indicator of shape {tuple(indicator.shape)}, not (videos, frames)"
        return None

    # -- per-frame groups -------------------------------------------------------------------------

    def frame_chunk(self, sample_values: int) -> int:
        return frame_chunk_size(self.config, self.batch, sample_values, self.top_sample_values)

    def materialize(self, feature: Feature) -> Feature:
        """Run the feature's pending per-frame ops, chunk by chunk, into one output buffer."""
        if not feature.ops:
            return feature
        ops, base = feature.ops, feature.take()

        def group(start: int, end: int) -> Tensor:
            part = base[start:end]
            for op in ops:
                part = op(part, start, end)
            return part

        out = run_frame_chunked(group, self.batch, self.frame_chunk(feature.peak_values))
        return Feature.of(out, owned=not _same_storage(out, base))

    def frame_op(self, layer: nn.Module, role: Role, output_shape) -> FrameOp:
        if role is Role.RES_BLOCK:
            return lambda h, start, end: layer(h, self.emb[start:end])
        if role is Role.UPSAMPLE:
            return lambda h, start, end: layer(h, output_shape=output_shape)
        return lambda h, start, end: layer(h)

    def concat_op(self, skip: Tensor) -> FrameOp:
        return lambda h, start, end: torch.cat([h, skip[start:end]], dim=1)

    # -- layers -----------------------------------------------------------------------------------

    def run_whole(self, layer: nn.Module, feature: Feature, output_shape, reason: str) -> Feature:
        """One layer exactly as ComfyUI runs it (patch handlers included), logged once."""
        name = type(layer).__name__
        self.log.warn(f"svd-whole-{name}-{reason}", f"Streamline: {name} runs unsliced in this SVD UNet ({reason}).")
        h = self.materialize(feature).take()
        out = forward_timestep_embed([layer], h, self.emb, self.context, self.to, output_shape, **self.video_kwargs)
        return Feature.of(out, owned=False)

    def run_video_resblock(self, layer: VideoResBlock, feature: Feature) -> Feature:
        """VideoResBlock.forward: the spatial ResBlock joins the pending per-frame group; time_stack and
        time_mixer run over position slices, in place on the spatial part's output."""
        spatial = lambda h, start, end: ResBlock.forward(layer, h, self.emb[start:end])  # noqa: E731
        _, height, width = feature.shape
        feature = self.materialize(feature.then(spatial, (layer.out_channels, height, width)))
        x = feature.take()
        if not feature.owned:  # the spatial part always makes a new tensor; guard anyway
            x = x.clone()
        chunk = spatial_chunk_size(self.config, self.batch, height * width, x.shape[1], self.top_channels)
        out = video_resblock_temporal(layer, x, self.emb, self.frames, self.indicator, chunk)
        return Feature.of(out, owned=True)

    def run_video_transformer(self, layer: SpatialVideoTransformer, feature: Feature) -> Feature:
        """SpatialVideoTransformer.forward: each spatial block over frame chunks into a token buffer,
        each temporal block (with time_mixer, and proj_out and the residual after the last) over
        position slices."""
        feature = self.materialize(feature)
        owned = feature.owned
        return Feature.of(self._video_transformer(layer, feature.take(), owned), owned=True)

    def _video_transformer(self, layer: SpatialVideoTransformer, x_in: Tensor, owned: bool) -> Tensor:
        to, frames = self.to, self.frames
        batch, channels, height, width = x_in.shape
        positions, videos = height * width, batch // frames
        to["activations_shape"] = list(x_in.shape)
        context = self.context
        time_context, time_context_2d = self.time_context, False
        if layer.use_spatial_context:
            assert context.ndim == 3, f"n dims of spatial context should be 3 but are {context.ndim}"
            time_context = (context if time_context is None else time_context)[::frames]
        elif time_context is not None:
            time_context_2d = time_context.ndim == 2

        def temporal_context(count: int) -> Tensor | None:
            """time_context as ComfyUI repeats it for every position, for `count` positions of each video."""
            if time_context is None:
                return None
            out = repeat(time_context, "b ... -> (b n) ...", n=count)
            return rearrange(out, "b c -> b 1 c") if time_context_2d else out

        def spatial_in(block: nn.Module) -> FrameOp:
            def op(h: Tensor, start: int, end: int) -> Tensor:
                h = layer.norm(h)
                if not layer.use_linear:
                    h = layer.proj_in(h)
                h = rearrange(h, "b c h w -> b (h w) c")
                if layer.use_linear:
                    h = layer.proj_in(h)
                to["block_index"] = 0
                return block(h, context=context[start:end] if context is not None else None, transformer_options=to)
            return op

        def spatial(block: nn.Module, index: int) -> FrameOp:
            def op(h: Tensor, start: int, end: int) -> Tensor:
                to["block_index"] = index
                return block(h, context=context[start:end] if context is not None else None, transformer_options=to)
            return op

        inner = layer.transformer_blocks[0].attn1.to_q.weight.shape[0] if layer.transformer_blocks else channels
        sample_values = max(channels, inner) * (positions + 2 * self.context_tokens)
        frame_chunk = self.frame_chunk(sample_values)
        spatial_chunk = spatial_chunk_size(self.config, batch, positions, inner, self.top_channels)
        out = x_in if owned else torch.empty_like(x_in)
        x_in_flat, out_flat = x_in.view(batch, channels, positions), out.view(batch, channels, positions)
        tokens = pos_emb = None
        depth = len(layer.transformer_blocks)
        for index, (block, mix_block) in enumerate(zip(layer.transformer_blocks, layer.time_stack)):
            op = spatial_in(block) if index == 0 else spatial(block, index)
            source = x_in if index == 0 else tokens
            tokens = None  # the previous blocks' tokens live only as long as this group reads them
            tokens = run_frame_chunked(lambda start, end, op=op, source=source: op(source[start:end], start, end),
                                       batch, frame_chunk)
            del source
            if pos_emb is None:
                pos_emb = self._time_pos_emb(layer, tokens)
            last = index == depth - 1
            for start, end in chunk_ranges(positions, spatial_chunk):
                count = end - start
                x = tokens[:, start:end]
                x_mix = x + pos_emb
                x_mix = rearrange(x_mix, "(b t) s c -> (b s) t c", t=frames)
                x_mix = mix_block(x_mix, context=temporal_context(count), transformer_options=to)
                x_mix = rearrange(x_mix, "(b s) t c -> (b t) s c", s=count, b=videos, c=tokens.shape[-1], t=frames)
                x = layer.time_mixer(x_spatial=x, x_temporal=x_mix, image_only_indicator=self.indicator)
                del x_mix
                if not last:
                    tokens[:, start:end] = x
                    continue
                if layer.use_linear:
                    x = layer.proj_out(x)
                x = x.movedim(2, 1)  # (batch*frames, channels, count): ComfyUI's "b (h w) c -> b c h w"
                if not layer.use_linear:
                    x = layer.proj_out(x[..., None])[..., 0]
                out_flat[:, :, start:end] = x + x_in_flat[:, :, start:end]
                del x
        return out

    def _time_pos_emb(self, layer: SpatialVideoTransformer, like: Tensor) -> Tensor:
        """The frame-index embedding SpatialVideoTransformer adds before each temporal block: (batch*frames, 1, C)."""
        frames = self.frames
        num_frames = torch.arange(frames, device=like.device)
        num_frames = repeat(num_frames, "t -> b t", b=like.shape[0] // frames)
        num_frames = rearrange(num_frames, "b t -> (b t)")
        t_emb = timestep_embedding(num_frames, layer.in_channels, repeat_only=False,
                                   max_period=layer.max_time_embed_period).to(like.dtype)
        return layer.time_pos_embed(t_emb)[:, None, :]

    # -- blocks -----------------------------------------------------------------------------------

    def layer_kind(self, layer: nn.Module) -> tuple[str, str | Role | None]:
        """("video_res" | "video_transformer" | "frames" | "whole", the role or the reason it runs whole)."""
        if isinstance(layer, VideoResBlock):
            reason = self.temporal_reason or video_resblock_reason(layer)
            return ("video_res", None) if reason is None else ("whole", reason)
        if isinstance(layer, SpatialVideoTransformer):
            reason = self.temporal_reason or video_transformer_reason(layer)
            return ("video_transformer", None) if reason is None else ("whole", reason)
        role = role_of(layer, self.patched_types)
        if role in (Role.RES_BLOCK, Role.UPSAMPLE, Role.PER_FRAME):
            if self.emb.shape[0] != self.batch:
                return "whole", f"emb batch {self.emb.shape[0]} differs from the latent batch {self.batch}"
            return "frames", role
        if role is Role.SPATIAL_TRANSFORMER:
            return "whole", "an image transformer in a video UNet"
        if isinstance(layer, self.patched_types):
            return "whole", "a forward_timestep_embed_patch handles it"
        return "whole", "a layer Streamline does not know"

    def run_block(self, block: nn.Module, feature: Feature, output_shape=None, skip: Tensor | None = None,
                  defer_tail: bool = False) -> Feature:
        """One UNet block on `feature` (concatenated with `skip` first). With defer_tail, per-frame
        layers at the block's end stay pending in the returned Feature, for the next block's group."""
        if skip is not None:
            channels, height, width = feature.shape
            feature = feature.then(self.concat_op(skip), (channels + skip.shape[1], height, width))
            del skip
        for layer in block:
            kind, detail = self.layer_kind(layer)
            if kind == "frames":
                feature = feature.then(self.frame_op(layer, detail, output_shape),
                                       _next_shape(layer, feature.shape, output_shape))
            elif kind == "video_res":
                feature = self.run_video_resblock(layer, feature)
            elif kind == "video_transformer":
                feature = self.run_video_transformer(layer, feature)
                self.to["transformer_index"] += 1
            else:
                feature = self.run_whole(layer, feature, output_shape, detail)
        return feature if defer_tail else self.materialize(feature)


def video_resblock_temporal(layer: VideoResBlock, x: Tensor, emb: Tensor, frames: int, image_only_indicator,
                            chunk: int) -> Tensor:
    """What VideoResBlock.forward does after its spatial ResBlock (time_stack, then time_mixer), `chunk`
    positions at a time, in place on `x` (the spatial part's output, (batch*frames, C, H, W), which the
    caller hands over). The time_stack's GroupNorms normalise over all frames and positions of a video:
    the first takes its statistics from x whole, the second from its input, which a first pass over the
    slices writes into one buffer and the second pass reads back."""
    stack = layer.time_stack
    batch, channels, height, width = x.shape
    videos, positions = batch // frames, height * width
    x = x.contiguous()
    video = x.view(videos, frames, channels, positions)

    def part(t: Tensor, start: int, end: int) -> Tensor:  # (videos, C, frames, count, 1): a 5D slice
        return t[..., start:end].permute(0, 2, 1, 3).unsqueeze(-1)

    in_norm, out_norm = stack.in_layers[0], stack.out_layers[0]
    mean, m2 = channel_moments(x)
    in_stats = video_group_stats(mean, m2, positions, in_norm.num_groups, in_norm.eps, frames)
    in_stats = (in_stats[0][::frames], in_stats[1][::frames])  # per video
    # ResBlock._forward's emb_out for the (b, t, ...) embedding, exchange_temb_dims: (videos, C, frames, 1, 1)
    emb_out = stack.emb_layers(rearrange(emb, "(b t) ... -> b t ...", t=frames)).type(x.dtype)
    emb_out = emb_out[..., None, None].movedim(1, 2)

    hidden = None  # (videos, C, frames, positions): the input of the second GroupNorm
    for start, end in chunk_ranges(positions, chunk):
        h = normalize(in_norm, part(video, start, end), in_stats)
        h = stack.in_layers[1:](h)
        h = h + emb_out
        if hidden is None:
            hidden = h.new_empty((videos, h.shape[1], frames, positions))
        hidden[..., start:end] = h[..., 0]
        del h
    mean, m2 = channel_moments(hidden)
    out_stats = video_group_stats(mean, m2, frames * positions, out_norm.num_groups, out_norm.eps, 1)
    for start, end in chunk_ranges(positions, chunk):
        x_part = part(video, start, end)
        h = normalize(out_norm, hidden[..., start:end, None], out_stats)
        h = stack.out_layers[1:](h)
        h = stack.skip_connection(x_part) + h
        h = layer.time_mixer(x_spatial=x_part, x_temporal=h, image_only_indicator=image_only_indicator)
        video[..., start:end] = h[..., 0].permute(0, 2, 1, 3)
        del h, x_part
    return x


def deep_transformers(unet: UNetModel, output_block: int, shallow_inputs: int) -> int:
    """SpatialTransformers (SpatialVideoTransformer included) a Step Rehash call skips: those of the deep
    input blocks, the middle block and the output blocks up to the cache point. forward_timestep_embed
    counts each in transformer_index; a rehash call advances it by as many."""
    blocks = [*unet.input_blocks[shallow_inputs:], unet.middle_block, *unet.output_blocks[: output_block + 1]]
    return sum(isinstance(layer, SpatialTransformer) for block in blocks if block is not None for layer in block)


def svd_forward(unet: UNetModel, config: SliceConfig, log: LogOnce, x: Tensor, timesteps=None, context=None,
                y=None, control=None, transformer_options=None, **kwargs) -> Tensor:
    """Drop-in for UNetModel._forward on an SVD UNet (same arguments after the first three). With a
    RehashCall in transformer_options[REHASH_CALL_KEY] (Step Rehash, techniques/rehash.py) the shallow
    input blocks run, then the call decides: the deep path (input blocks, middle, output blocks up to
    the cache point, whose output it stores) or the cached deep feature in its place."""
    to = {} if transformer_options is None else transformer_options
    rehash = to.get(REHASH_CALL_KEY)
    patches = to.get("patches", {})
    to["original_shape"] = list(x.shape)
    to["transformer_index"] = 0
    frames = kwargs.get("num_video_frames", unet.default_num_video_frames)
    indicator = kwargs.get("image_only_indicator", None)
    time_context = kwargs.get("time_context", None)
    emb = time_embedding(unet, x, timesteps, y, to)

    run = SVDForward(unet, config, log, x, emb, context, to, frames, indicator, time_context)
    if run.temporal_reason is not None:
        log.warn(f"svd-unsliced-{run.temporal_reason}", f"Streamline: SVD video layers run unsliced in this call "
                 f"({run.temporal_reason}).")
    inputs = len(unet.input_blocks)
    # With Step Rehash, only the input blocks whose skips the output blocks after the cache point read
    # are shallow; the rest (and the middle, and the output blocks up to the cache point) is deep.
    shallow_inputs = inputs if rehash is None else inputs - 1 - rehash.output_block
    hs: list[Tensor] = []

    def run_input_blocks(blocks: range, h: Feature) -> Feature:
        for block_id in blocks:
            to["block"] = ("input", block_id)
            out = run.run_block(unet.input_blocks[block_id], h).take()
            out = apply_control(out, control, "input")
            for p in patches.get("input_block_patch", []):
                out = p(out, to)
            hs.append(out)
            for p in patches.get("input_block_patch_after_skip", []):
                out = p(out, to)
            h = Feature.of(out, owned=False)  # hs keeps it: never written in place
            del out
        return h

    h = run_input_blocks(range(shallow_inputs), Feature.of(x, owned=False))
    cached = rehash.reuse(hs[-1]) if rehash is not None else None
    first_output = 0
    if cached is not None:
        to["transformer_index"] += deep_transformers(unet, rehash.output_block, shallow_inputs)
        for _ in range(rehash.output_block + 1):  # drop the residuals of the skipped output blocks
            if control is not None and control.get("output"):
                control["output"].pop()
        h, first_output = Feature.of(cached, owned=False), rehash.output_block + 1  # the cache keeps it
    else:
        h = run_input_blocks(range(shallow_inputs, inputs), h)
        to["block"] = ("middle", 0)
        if unet.middle_block is not None:
            h = run.run_block(unet.middle_block, h)
        out = apply_control(h.take(), control, "middle")
        out = middle_block_after(patches, out, x, emb, context, y, timesteps, to)
        h = Feature.of(out, owned=False)
        del out

    output_block_patches = patches.get("output_block_patch", [])
    for block_id in range(first_output, len(unet.output_blocks)):
        block = unet.output_blocks[block_id]
        to["block"] = ("output", block_id)
        skip = apply_control(hs.pop(), control, "output")
        if output_block_patches:
            out = run.materialize(h).take()
            for p in output_block_patches:
                out, skip = p(out, skip, to)
            h = Feature.of(out, owned=False)
            del out
        output_shape = hs[-1].shape if hs else None
        at_cache_point = rehash is not None and block_id == rehash.output_block
        h = run.run_block(block, h, output_shape, skip, defer_tail=not output_block_patches and not at_cache_point
                          and block_id + 1 < len(unet.output_blocks))
        del skip
        if at_cache_point:  # after the block's temporal layers and its Upsample: whole
            rehash.store(h.base)
            h = Feature.of(h.take(), owned=False)  # the cache keeps it: never written in place

    if unet.predict_codebook_ids:
        return unet.id_predictor(run.materialize(h).take().type(x.dtype))
    dtype = x.dtype
    h = h.then(lambda part, start, end: part.type(dtype), h.shape)
    return run.run_block(unet.out, h).take()


def svd_self_check() -> float:
    """The sliced SVD forward against UNetModel._forward on a tiny float64 SVD UNet (unet_common/self_check.py)."""
    return sliced_unet_self_check(svd_forward, video=True)


def svd_verdict() -> "host_fingerprints.Verdict":
    """The host verdict on ComfyUI's UNet functions the sliced SVD forward mirrors, its video layers too."""
    functions = host_fingerprints.comfy_functions()
    functions.update(svd_functions())
    return host_fingerprints.verdict("SVD UNet", functions, svd_self_check)
