"""A sliced, grouped forward for ComfyUI's UNetModel (SD1.5/SD2/SDXL layout), with AnimateDiff motion modules.

It computes what `UNetModel._forward` computes, with the same transformer_options patches, ControlNet
residuals and transformer_index bookkeeping, but:
- consecutive per-frame layers of a block form a group that runs chunk by chunk over the
  (batch x frames) axis, each chunk end to end, into one output buffer;
- motion modules run chunk by chunk over spatial positions, in place on a buffer this forward owns;
- an output block's input (the concatenation of h with its skip) is built per chunk, never whole;
- a block that ends in per-frame layers (the Upsample of an output block) hands them to the next
  block's first group, so the upsampled feature is never materialised at full size either;
- with `offload_skips`, the skip tensors wait in host memory (core/offload.py) and come back whole one
  block ahead of use, or by the rows each frame chunk joins;
- with `offload_features` too, a block's output that the next block's first group reads chunk by chunk
  waits in host memory as soon as it is written and comes back by the rows of each chunk.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn as nn
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel, apply_control, forward_timestep_embed
from torch import Tensor

from ...core import offload
from ...core.grouping import run_frame_chunked
from ...core.slicing import UNSLICED, SliceConfig, frame_chunk_size, spatial_chunk_size
from ..unet_common.layer_roles import Role, role_of
from ...host import fingerprints as host_fingerprints, tiny_models
from . import video_norm
from ...host.log import LogOnce
from ...host.options import REHASH_CALL_KEY
from .motion_module import run_motion_module_sliced, unsliceable_reason
from ..unet_common.inputs import BLOCK_LEVEL_PATCHES
from ..unet_common.prologue import middle_block_after, time_embedding
from ..unet_common.self_check import sliced_unet_self_check

_PER_FRAME_ROLES = {Role.RES_BLOCK, Role.SPATIAL_TRANSFORMER, Role.UPSAMPLE, Role.PER_FRAME}


@dataclass
class Segment:
    """Consecutive layers of one block that share a slicing axis ('frames'), or one layer alone."""

    kind: str  # "frames" | "motion" | "whole"
    layers: list[tuple[nn.Module, Role]]

    @property
    def spatial_transformers(self) -> int:
        return sum(role is Role.SPATIAL_TRANSFORMER for _, role in self.layers)


@dataclass
class Pending:
    """Per-frame layers of the previous output block, run per chunk at the start of the next group."""

    segment: Segment
    output_shape: tuple | None
    transformer_index: int


def split_block(block: nn.Module, patched_types: tuple[type, ...], video_norm_mode: bool = False) -> list[Segment]:
    """The block's layers as segments. In ADE's GroupNorm-over-videos mode, a layer that starts with a
    GroupNorm starts a segment of its own (its input must be whole: families/unet/video_norm.py); a layer
    whose structure that mode's forwards do not know runs whole."""
    segments: list[Segment] = []
    for layer in block:
        role = role_of(layer, patched_types)
        if role is Role.UNSUPPORTED:
            # never a model of this family: families/registry.py gives SVD's video UNet to families/svd/ and
            # leaves other video UNets to ComfyUI
            raise ValueError(f"{type(layer).__name__} (video UNet layers) in the UNet family's forward")
        if video_norm_mode and role in _PER_FRAME_ROLES and not video_norm.supports(layer, role):
            role = Role.WHOLE
        if role in _PER_FRAME_ROLES:
            starts_group = video_norm_mode and video_norm.splits_group(layer, role)
            if segments and segments[-1].kind == "frames" and not starts_group:
                segments[-1].layers.append((layer, role))
            else:
                segments.append(Segment("frames", [(layer, role)]))
        else:
            segments.append(Segment("motion" if role is Role.MOTION_MODULE else "whole", [(layer, role)]))
    return segments


def _same_storage(a: Tensor, b: Tensor | None) -> bool:
    return isinstance(b, Tensor) and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class StreamlinedForward:
    """One UNet forward. Holds what every group of that forward shares."""

    def __init__(self, unet: UNetModel, config: SliceConfig, log: LogOnce, x: Tensor, emb: Tensor,
                 context: Tensor | None, transformer_options: dict, video_kwargs: dict,
                 video_frames: int | None = None, ade_sliced: bool = True):
        self.unet = unet
        self.ade_sliced = ade_sliced  # the host verdict on ADE's motion-module functions
        self.video_frames = video_frames  # ADE's GroupNorm-over-videos mode: frames per video
        self.config = config
        self.log = log
        self.emb = emb
        self.context = context
        self.to = transformer_options
        self.video_kwargs = video_kwargs
        self.batch = x.shape[0]
        self.top_channels = unet.model_channels
        # Cross-attention keys and values scale with the context tokens, not with the latent: at deep
        # levels of a small latent they are most of a group's working set.
        self.context_tokens = context.shape[1] if context is not None and context.ndim == 3 else 0
        self.top_sample_values = self.sample_values(unet.model_channels, x.shape[-2] * x.shape[-1], True)
        patches = transformer_options.get("patches", {})
        self.patch_handlers = list(patches.get("forward_timestep_embed_patch", []))
        self.patched_types = tuple(cls for cls, _ in self.patch_handlers)
        attention_patches = sorted(k for k, v in patches.items() if v and k not in BLOCK_LEVEL_PATCHES)
        attention_patches += sorted(k for k, v in transformer_options.get("patches_replace", {}).items() if v)
        self.attention_patches = attention_patches
        if attention_patches:
            log.warn("attention-patches", "Streamline: attention patches present "
                     f"({', '.join(attention_patches)}); spatial transformers run unsliced.")

    # -- groups ---------------------------------------------------------------------------------------

    def run_layers(self, layers: list[tuple[nn.Module, Role]], h: Tensor, start: int, end: int,
                   output_shape) -> Tensor:
        emb = self.emb[start:end]
        context = self.context[start:end] if self.context is not None else None
        for layer, role in layers:
            if role is Role.RES_BLOCK:
                h = layer(h, emb)
            elif role is Role.SPATIAL_TRANSFORMER:
                h = layer(h, context, self.to)
                self.to["transformer_index"] += 1
            elif role is Role.UPSAMPLE:
                h = layer(h, output_shape=output_shape)
            else:
                h = layer(h)
        return h

    def sample_values(self, channels: int, positions: int, attends: bool) -> int:
        """Values per sample that a per-frame group holds at once, up to a constant factor."""
        return channels * (positions + (2 * self.context_tokens if attends else 0))

    def frames_chunk(self, segments: list[Segment], sample_values: int) -> int:
        """Samples per chunk for per-frame layers that run together, chunk by chunk."""
        if self.attention_patches and any(segment.spatial_transformers for segment in segments):
            return self.batch
        for name, tensor in (("emb", self.emb), ("context", self.context)):
            if tensor is not None and tensor.shape[0] != self.batch:
                self.log.warn(f"batch-{name}", f"Streamline: {name} batch {tensor.shape[0]} differs from the "
                              f"latent batch {self.batch}; per-frame groups run unsliced.")
                return self.batch
        return frame_chunk_size(self.config, self.batch, sample_values, self.top_sample_values)

    def run_frames(self, segment: Segment, h: "Tensor | offload.HostTensor", output_shape,
                   pending: Pending | None = None, skip: Tensor | None = None,
                   cast: torch.dtype | None = None) -> Tensor:
        """Run a per-frame group on h (after `pending`, concatenated with `skip`), chunk by chunk; h
        and the skip may be in host memory (offload), read by the rows of each chunk."""
        height, width = (skip if skip is not None else h).shape[-2:]
        if pending is not None and skip is None:
            height, width = height * 2, width * 2  # pending layers end in an Upsample
        channels = h.shape[1] + (skip.shape[1] if skip is not None else 0)
        attends = segment.spatial_transformers > 0 or (pending is not None and pending.segment.spatial_transformers > 0)
        sample_values = self.sample_values(channels, height * width, attends)
        chunk = self.frames_chunk([segment] if pending is None else [pending.segment, segment], sample_values)
        if self.video_frames is not None and chunk < self.batch:
            return self.run_frames_video_norm(segment, offload.whole(h), output_shape, skip, cast, chunk)
        index = pending.transformer_index if pending is not None else self.to["transformer_index"]

        def group(start: int, end: int) -> Tensor:
            self.to["transformer_index"] = index
            part = offload.rows(h, start, end)
            if pending is not None:
                part = self.run_layers(pending.segment.layers, part, start, end, pending.output_shape)
            if skip is not None:
                part = torch.cat([part, offload.rows(skip, start, end)], dim=1)
            if cast is not None:
                part = part.type(cast)
            return self.run_layers(segment.layers, part, start, end, output_shape)

        return run_frame_chunked(group, self.batch, chunk)

    def run_frames_video_norm(self, segment: Segment, h: Tensor, output_shape, skip: Tensor | None,
                              cast: torch.dtype | None, chunk: int) -> Tensor:
        """run_frames in ADE's GroupNorm-over-videos mode: the segment's first layer normalises with
        statistics of whole videos (of h and the skip, gathered apart), the rest of it has no GroupNorm."""
        skip = offload.whole(skip) if skip is not None else None
        first, role = segment.layers[0]
        norm = video_norm.first_norm(first, role)
        frames, index = self.video_frames, self.to["transformer_index"]
        in_stats = video_norm.input_stats([h] if skip is None else [h, skip], norm, frames, cast) \
            if norm is not None else None

        def chunk_input(start: int, end: int) -> Tensor:
            part = h[start:end] if skip is None else torch.cat([h[start:end], skip[start:end]], dim=1)
            return part.type(cast) if cast is not None else part

        out_stats = video_norm.resblock_out_stats(first, chunk_input, self.emb, in_stats, self.batch, chunk, frames) \
            if role is Role.RES_BLOCK else None

        def group(start: int, end: int) -> Tensor:
            self.to["transformer_index"] = index
            part = chunk_input(start, end)
            stats = video_norm.slice_stats(in_stats, start, end)
            rest = segment.layers[1:]
            if role is Role.RES_BLOCK:
                part = video_norm.resblock_forward(first, part, self.emb[start:end], stats,
                                                   video_norm.slice_stats(out_stats, start, end))
            elif role is Role.SPATIAL_TRANSFORMER:
                context = self.context[start:end] if self.context is not None else None
                part = video_norm.spatial_transformer_forward(first, part, context, self.to, stats)
                self.to["transformer_index"] += 1
            elif norm is not None:
                part = video_norm.normalize(norm, part, stats)
            else:
                rest = segment.layers
            return self.run_layers(rest, part, start, end, output_shape)

        return run_frame_chunked(group, self.batch, chunk)

    def run_motion(self, layer: nn.Module, h: Tensor, owned: bool) -> Tensor:
        reason = unsliceable_reason(layer) if self.ade_sliced else "the host verdict on AnimateDiff-Evolved"
        batch, channels, height, width = h.shape
        chunk = spatial_chunk_size(self.config, batch, height * width, channels, self.top_channels)
        if reason is not None:
            self.log.warn(f"mm-{reason}", f"Streamline: motion modules with {reason} run unsliced.")
        if reason is not None or chunk >= height * width:
            return self.run_whole(layer, h, None)
        return run_motion_module_sliced(layer, h, self.context, self.to, chunk, in_place=owned,
                                        video_frames=self.video_frames or 1)

    def run_whole(self, layer: nn.Module, h: Tensor, output_shape) -> Tensor:
        """One layer exactly as ComfyUI runs it (patch handlers included)."""
        return forward_timestep_embed([layer], h, self.emb, self.context, self.to, output_shape, **self.video_kwargs)

    # -- blocks ---------------------------------------------------------------------------------------

    def run_block(self, segments: list[Segment], h: Tensor, output_shape, pending: Pending | None = None,
                  skip: Tensor | None = None, defer_tail: bool = False) -> tuple[Tensor, Pending | None]:
        """Run one UNet block. Returns (h, pending): with defer_tail, a trailing per-frame group is
        not run but returned as pending, for the next block to run per chunk. h may be in host memory
        (feature offload) when the first segment reads it per chunk."""
        owned = False
        if not (segments and segments[0].kind == "frames"):
            h = offload.whole(h)
        for i, segment in enumerate(segments):
            last = i == len(segments) - 1
            if segment.kind == "frames" and last and defer_tail and i > 0:
                tail = Pending(segment, output_shape, self.to["transformer_index"])
                self.to["transformer_index"] += segment.spatial_transformers
                return h, tail
            if pending is not None and segment.kind != "frames":
                h, pending = self.materialize(pending, h), None
            if skip is not None and segment.kind != "frames":
                h, skip = torch.cat([h, offload.whole(skip)], dim=1), None
            if segment.kind == "frames":
                source = h
                h = self.run_frames(segment, h, output_shape, pending, skip)
                owned = not (_same_storage(h, source) or _same_storage(h, skip))
                pending = skip = None
            elif segment.kind == "motion":
                out = self.run_motion(segment.layers[0][0], h, owned)
                owned = owned or not _same_storage(out, h)
                h = out
            else:
                layer = segment.layers[0][0]
                name = type(layer).__name__
                self.log.warn(f"whole-{name}", f"Streamline: {name} is not a layer Streamline can slice; it runs unsliced.")
                h = self.run_whole(layer, h, output_shape)
                owned = False
        if pending is not None:
            h = self.materialize(pending, h)
        if skip is not None:
            h = torch.cat([h, offload.whole(skip)], dim=1)
        return h, None

    def materialize(self, pending: Pending, h: Tensor) -> Tensor:
        """Run deferred layers whole-batch-wide (chunked) when the next block cannot take them per chunk."""
        saved = self.to["transformer_index"]
        self.to["transformer_index"] = pending.transformer_index
        out = self.run_frames(pending.segment, h, pending.output_shape)
        self.to["transformer_index"] = saved
        return out


class RehashCall(Protocol):
    """Step Rehash's side of one UNet call (see techniques/rehash.py)."""

    output_block: int

    def reuse(self, shallow_feature: Tensor) -> Tensor | None:
        """Given the deepest skip the shallow path computed, the cached deep feature to continue from,
        or None to compute this call in full."""

    def store(self, deep_feature: Tensor) -> None:
        """The output of output block `output_block` of a call computed in full."""




def streamlined_unet_forward(unet: UNetModel, config: SliceConfig, log: LogOnce, x: Tensor, timesteps=None,
                             context=None, y=None, control=None, transformer_options=None, *,
                             transfers: offload.Transfers | None = None, **kwargs) -> Tensor:
    """Drop-in for UNetModel._forward (same arguments after the first three). With a RehashCall in
    transformer_options[REHASH_CALL_KEY], the deep path may be replaced by a cached feature. With
    config.offload_skips the skips wait in host memory; `transfers` counts what moved (made here if None)."""
    to = {} if transformer_options is None else transformer_options
    rehash: RehashCall | None = to.get(REHASH_CALL_KEY)
    patches = to.get("patches", {})
    patched_types = tuple(cls for cls, _ in patches.get("forward_timestep_embed_patch", []))
    try:
        frames = video_norm.video_frames(to, x.shape[0])
    except video_norm.VideoNormUnknown as e:
        # Every group whole: the layers run as in ComfyUI's forward, under ADE's own GroupNorm.
        log.warn("video-norm-unknown", f"Streamline: AnimateDiff-Evolved normalises over whole videos, but {e}; "
                 "this UNet call runs unsliced.")
        frames, config = None, UNSLICED
    ade_sliced, ade_video_norm_sliced = ade_verdict(to)
    if frames is not None and not (ade_sliced and ade_video_norm_sliced):  # whole-video GroupNorm: ADE's own
        frames, config = None, UNSLICED
    if frames is not None:
        log.info("video-norm", f"Streamline: AnimateDiff-Evolved runs this motion model with GroupNorm statistics "
                 f"over whole videos ({frames} frames; v1, PIA or v2 without apply_v2_models_properly); slices take "
                 "whole-video statistics (one extra pass per sliced ResBlock).")
    splits = dict(patched_types=patched_types, video_norm_mode=frames is not None)
    input_segments = [split_block(block, **splits) for block in unet.input_blocks]
    middle_segments = split_block(unet.middle_block, **splits) if unet.middle_block is not None else None
    output_segments = [split_block(block, **splits) for block in unet.output_blocks]
    out_segments = split_block(unet.out, **splits)

    to["original_shape"] = list(x.shape)
    to["transformer_index"] = 0
    video_kwargs = {
        "time_context": kwargs.get("time_context", None),
        "num_video_frames": kwargs.get("num_video_frames", unet.default_num_video_frames),
        "image_only_indicator": kwargs.get("image_only_indicator", None),
    }
    emb = time_embedding(unet, x, timesteps, y, to)

    run = StreamlinedForward(unet, config, log, x, emb, context, to, video_kwargs, frames, ade_sliced)
    # With Step Rehash, only the input blocks whose skips the output blocks after the cache point
    # read are shallow; the rest (and the middle, and the output blocks up to the cache point) is deep.
    shallow_inputs = len(input_segments) if rehash is None else len(input_segments) - 1 - rehash.output_block
    if config.offload_skips:
        transfers = transfers if transfers is not None else offload.Transfers(x.device)
        hs: list[Tensor] | offload.SkipStack = offload.SkipStack(transfers)
    else:
        hs = []
    # Feature offload: a block's output leaves the device as soon as it is written when the next block's
    # first group reads it chunk by chunk (not in the GroupNorm-over-videos mode, whose groups read
    # whole videos, nor where a patch gets whole features between blocks).
    features = config.offload_features and isinstance(hs, offload.SkipStack) and frames is None
    output_block_patches = patches.get("output_block_patch", [])

    def read_by_chunks(segments: list[Segment]) -> bool:
        return bool(segments) and segments[0].kind == "frames"

    def output_leaves(next_block: int) -> bool:
        """Whether the output before output block `next_block` (the middle's, an output block's) leaves."""
        if not features or output_block_patches:
            return False
        if next_block < len(output_segments):
            return read_by_chunks(output_segments[next_block])
        return not unet.predict_codebook_ids and len(out_segments) == 1 and read_by_chunks(out_segments)

    h = x

    def run_input_blocks(blocks: range, h: Tensor) -> Tensor:
        for block_id in blocks:
            to["block"] = ("input", block_id)
            h, _ = run.run_block(input_segments[block_id], h, None)
            h = apply_control(h, control, "input")
            for p in patches.get("input_block_patch", []):
                h = p(h, to)
            # the skip the next block reads chunk by chunk leaves at once (the deepest, and the last
            # one Step Rehash reads, stay until the next is pushed)
            leaves = (features and block_id + 1 < blocks.stop and read_by_chunks(input_segments[block_id + 1])
                      and not patches.get("input_block_patch_after_skip"))
            if leaves:
                h = hs.append(h, now=True)
            else:
                hs.append(h)
            for p in patches.get("input_block_patch_after_skip", []):
                h = p(h, to)
        return h

    h = run_input_blocks(range(shallow_inputs), h)
    cached = rehash.reuse(hs[-1]) if rehash is not None else None
    first_output = 0
    if cached is not None:
        deep = input_segments[shallow_inputs:] + [middle_segments or []] + output_segments[: rehash.output_block + 1]
        to["transformer_index"] += sum(segment.spatial_transformers for segments in deep for segment in segments)
        for _ in range(rehash.output_block + 1):  # drop the residuals of the skipped output blocks
            if control is not None and control.get("output"):
                control["output"].pop()
        h, first_output = cached, rehash.output_block + 1
    else:
        h = run_input_blocks(range(shallow_inputs, len(input_segments)), h)
        to["block"] = ("middle", 0)
        if middle_segments is not None:
            h, _ = run.run_block(middle_segments, h, None)
        h = apply_control(h, control, "middle")
        h = middle_block_after(patches, h, x, emb, context, y, timesteps, to)
        if output_leaves(0) and middle_segments is not None:  # else h is the deepest skip, on the stack
            h = offload.HostTensor(transfers, h)

    pending: Pending | None = None

    def skip_needed_whole(later: int) -> bool:
        """Offloaded skips come back by rows unless an output block (this one, later=0, or the next, 1)
        needs the whole skip: a ControlNet residual is added to it, a patch gets it, or GroupNorm statistics
        are taken over whole videos."""
        residuals = len(control.get("output") or ()) if isinstance(control, dict) else 0
        return bool(output_block_patches) or frames is not None or residuals > later

    for block_id in range(first_output, len(output_segments)):
        to["block"] = ("output", block_id)
        skip = hs.pop()
        if isinstance(hs, offload.SkipStack) and skip_needed_whole(0):
            skip = offload.whole(skip)
            if skip_needed_whole(1):
                hs.prefetch_top()  # one block ahead of its use
        skip = apply_control(skip, control, "output")
        if output_block_patches:
            if pending is not None:
                h, pending = run.materialize(pending, h), None
            for p in output_block_patches:
                h, skip = p(h, skip, to)
        output_shape = hs[-1].shape if hs else None
        at_cache_point = rehash is not None and block_id == rehash.output_block
        h, pending = run.run_block(output_segments[block_id], h, output_shape, pending, skip,
                                   defer_tail=not output_block_patches and not at_cache_point and frames is None
                                   and block_id + 1 < len(output_segments))
        del skip
        if at_cache_point:
            rehash.store(h)
        elif output_leaves(block_id + 1):  # the popped skip and the previous output are released by now
            h = offload.HostTensor(transfers, h)

    if unet.predict_codebook_ids:
        if pending is not None:
            h = run.materialize(pending, h)
        return unet.id_predictor(h.type(x.dtype))
    if len(out_segments) == 1 and out_segments[0].kind == "frames":
        return run.run_frames(out_segments[0], h, None, pending, cast=x.dtype)
    if pending is not None:
        h = run.materialize(pending, h)
    return unet.out(h.type(x.dtype))


def unet_self_check() -> float:
    """The sliced UNet forward against UNetModel._forward on a tiny float64 UNet (unet_common/self_check.py)."""
    return sliced_unet_self_check(streamlined_unet_forward)


def unet_verdict() -> "host_fingerprints.Verdict":
    """The host verdict on ComfyUI's UNet functions the sliced forward mirrors."""
    return host_fingerprints.verdict("UNet", host_fingerprints.comfy_functions(), unet_self_check)


_ADE_GROUPNORM = "ADE groupnorm_mm_factory"


def ade_self_check(module_class: type, handler: Callable) -> float:
    """ADE's motion module through the pack's sliced path against ADE's own dispatch (`handler`, its
    forward_timestep_embed patch), on a tiny float64 VanillaTemporalModule of ADE's class (two videos of 4
    frames, 4x4 positions, slices that do not divide them, with and without a motion scale)."""
    module = module_class(in_channels=32, block_type="down", block_idx=0, module_idx=0, num_attention_heads=2,
                          temporal_pe_max_len=8, zero_initialize=False)
    module = tiny_models.randomize(module, 4).double()
    frames = 4
    module.set_video_length(frames, frames)
    x = tiny_models.inputs((2 * frames, 32, 4, 4), 5)
    worst = 0.0
    for effect in (None, 0.7):
        if effect is not None:
            module.set_effect(effect)
        with torch.no_grad():
            theirs = handler(module, x.clone(), None, None, {}, None, None, None, None)
            ours = run_motion_module_sliced(module, x.clone(), None, {}, spatial_chunk=5, in_place=False)
        worst = max(worst, host_fingerprints.relative_difference(ours, theirs))
    return worst


def ade_verdict(transformer_options: dict) -> tuple[bool, bool]:
    """The host verdicts on ADE's functions (found through this call's options): (motion modules sliced,
    ADE's whole-video GroupNorm mode sliced). The motion modules have a self-check; the whole-video GroupNorm
    has none: on an ADE whose groupnorm_mm_factory the pack has not recorded, that mode runs unsliced."""
    functions = host_fingerprints.ade_functions(transformer_options)
    groupnorm = {k: functions.pop(k) for k in [_ADE_GROUPNORM] if k in functions}
    module_class = handler = None
    for cls, patch in transformer_options.get("patches", {}).get("forward_timestep_embed_patch", []):
        if cls.__name__ == "VanillaTemporalModule":
            module_class, handler = cls, patch
    check = functools.partial(ade_self_check, module_class, handler) if module_class is not None else None
    modules = host_fingerprints.verdict("AnimateDiff-Evolved motion modules", functions, check).sliced
    whole_video = host_fingerprints.verdict("AnimateDiff-Evolved whole-video GroupNorm", groupnorm, None).sliced
    return modules, whole_video
