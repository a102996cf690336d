"""Adapter: AnimateDiff-Evolved's GroupNorm-over-videos mode, sliced exactly.

ADE runs v1 motion models (mm_sd_v14, mm_sd_v15), PIA, and v2 models loaded with
`apply_v2_models_properly` off with every GroupNorm of the UNet taking its statistics over all frames
of a video (per cond): its DIFFUSION_MODEL wrapper "ADE_groupnormed_diffusion_model" swaps torch's
GroupNorm.forward for the length of each UNet call. Given a slice of frames that swapped GroupNorm
raises (`integer modulo by zero`) or normalises over the wrong frames.

So in this mode the sliced forward never hands a GroupNorm a slice. Each per-frame layer that holds a
GroupNorm starts a group of its own, whose input is whole: the statistics of that input over each
video are sums, gathered per sample and channel (of h and of the skip apart, never concatenated) and
applied per slice. A ResBlock's second GroupNorm normalises a convolution's output, which is never
whole: a first pass over the slices computes it and keeps only its statistics (the recomputation is
the mode's extra time: one GroupNorm + SiLU + convolution per sliced ResBlock). Motion modules take
whole-video statistics the same way (core.temporal, `video_frames`).

The layer forwards below mirror ComfyUI's ResBlock._forward and SpatialTransformer.forward with the
GroupNorm call replaced; host/fingerprints.py records the host source they follow.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from ...core.groupnorm import channel_moments, video_group_stats
from ...core.slicing import chunk_ranges
from ..unet_common.group_norm import Stats, normalize
from ..unet_common.layer_roles import Role

ADE_GROUPNORM_WRAPPER_KEY = "ADE_groupnormed_diffusion_model"  # sampling.create_diffusion_model_groupnormed_wrapper

class VideoNormUnknown(Exception):
    """The GroupNorm-over-videos mode is on, but the video length it uses cannot be read."""


def video_frames(transformer_options: dict, batch: int) -> int | None:
    """Frames per video of ADE's GroupNorm-over-videos mode for a UNet call on `batch` samples, or
    None when the mode is off. ADE divides the batch into batch // L videos, L the context length
    when context windows run, else the clip's length (ADE's exposed ad_params)."""
    import comfy.patcher_extension

    wrappers = transformer_options.get("wrappers", {}).get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
    if not wrappers.get(ADE_GROUPNORM_WRAPPER_KEY):
        return None
    params = transformer_options.get("ad_params") or {}
    length = params.get("context_length") or params.get("full_length")
    if not isinstance(length, int) or length < 1 or batch % length:
        raise VideoNormUnknown(f"a batch of {batch} samples is not whole videos of {length} frames")
    return length


def splits_group(layer: nn.Module, role: Role) -> bool:
    """Whether `layer` needs its input whole in this mode (it starts with a GroupNorm)."""
    return first_norm(layer, role) is not None


def first_norm(layer: nn.Module, role: Role) -> nn.GroupNorm | None:
    """The GroupNorm a per-frame layer applies to its input first, if any."""
    if role is Role.RES_BLOCK:
        return layer.in_layers[0]
    if role is Role.SPATIAL_TRANSFORMER:
        return layer.norm
    if isinstance(layer, nn.GroupNorm):
        return layer
    return None


def supports(layer: nn.Module, role: Role) -> bool:
    """The layers whose forwards this module mirrors, in the structure it mirrors."""
    if role is Role.RES_BLOCK:
        return all(isinstance(seq[0], nn.GroupNorm) for seq in (layer.in_layers, layer.out_layers))
    if role is Role.SPATIAL_TRANSFORMER:
        return isinstance(layer.norm, nn.GroupNorm)
    return True


def input_stats(parts: list[Tensor], norm: nn.GroupNorm, frames: int, dtype: torch.dtype | None) -> Stats:
    """Whole-video statistics of torch.cat(parts, dim=1).type(dtype), without building it."""
    moments = [channel_moments(part, dtype=dtype) for part in parts]
    mean = torch.cat([m for m, _ in moments], dim=1)
    m2 = torch.cat([m for _, m in moments], dim=1)
    return video_group_stats(mean, m2, parts[0][0, 0].numel(), norm.num_groups, norm.eps, frames)


def _resblock_hidden(block, x: Tensor, emb: Tensor, in_stats: Stats) -> tuple[Tensor, Tensor, Tensor | None]:
    """ResBlock._forward up to its second GroupNorm: (h, x after x_upd, emb_out)."""
    h = normalize(block.in_layers[0], x, in_stats)
    if block.updown:
        h = block.in_layers[1:-1](h)
        h = block.h_upd(h)
        x = block.x_upd(x)
        h = block.in_layers[-1](h)
    else:
        h = block.in_layers[1:](h)
    emb_out = None
    if not block.skip_t_emb:
        emb_out = block.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
    if not block.use_scale_shift_norm and emb_out is not None:
        if block.exchange_temb_dims:
            emb_out = emb_out.movedim(1, 2)
        h = h + emb_out
    return h, x, emb_out


def resblock_forward(block, x: Tensor, emb: Tensor, in_stats: Stats, out_stats: Stats) -> Tensor:
    """ComfyUI's ResBlock._forward with both GroupNorms taking the given statistics."""
    h, x, emb_out = _resblock_hidden(block, x, emb, in_stats)
    h = normalize(block.out_layers[0], h, out_stats)
    if block.use_scale_shift_norm and emb_out is not None:
        scale, shift = torch.chunk(emb_out, 2, dim=1)
        h *= 1 + scale
        h += shift
    h = block.out_layers[1:](h)
    return block.skip_connection(x) + h


def resblock_out_stats(block, chunk_input: Callable[[int, int], Tensor], emb: Tensor, in_stats: Stats,
                       batch: int, chunk: int, frames: int) -> Stats:
    """Whole-video statistics of the input of the ResBlock's second GroupNorm: the first pass, slice
    by slice, keeping (batch, channels) moments and nothing of the slices."""
    mean = m2 = None
    count = 0
    for start, end in chunk_ranges(batch, chunk):
        stats = (in_stats[0][start:end], in_stats[1][start:end])
        h, _, _ = _resblock_hidden(block, chunk_input(start, end), emb[start:end], stats)
        part_mean, part_m2 = channel_moments(h)
        if mean is None:
            mean = part_mean.new_empty((batch, part_mean.shape[1]))
            m2 = torch.empty_like(mean)
        mean[start:end], m2[start:end], count = part_mean, part_m2, h[0, 0].numel()
        del h
    norm = block.out_layers[0]
    return video_group_stats(mean, m2, count, norm.num_groups, norm.eps, frames)


def spatial_transformer_forward(layer, x: Tensor, context, transformer_options: dict, stats: Stats) -> Tensor:
    """ComfyUI's SpatialTransformer.forward with its GroupNorm taking the given statistics."""
    if not isinstance(context, list):
        context = [context] * len(layer.transformer_blocks)
    b, c, h, w = x.shape
    transformer_options["activations_shape"] = list(x.shape)
    x_in = x
    x = normalize(layer.norm, x, stats)
    if not layer.use_linear:
        x = layer.proj_in(x)
    x = x.movedim(1, 3).flatten(1, 2).contiguous()
    if layer.use_linear:
        x = layer.proj_in(x)
    for i, block in enumerate(layer.transformer_blocks):
        transformer_options["block_index"] = i
        x = block(x, context=context[i], transformer_options=transformer_options)
    if layer.use_linear:
        x = layer.proj_out(x)
    x = x.reshape(x.shape[0], h, w, x.shape[-1]).movedim(3, 1).contiguous()
    if not layer.use_linear:
        x = layer.proj_out(x)
    return x + x_in


def slice_stats(stats: Stats | None, start: int, end: int) -> Stats | None:
    return None if stats is None else (stats[0][start:end], stats[1][start:end])
