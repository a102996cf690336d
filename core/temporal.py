"""Feature Slicer for temporal (motion-module) transformers: slice over spatial positions.

An AnimateDiff temporal transformer is: GroupNorm per frame -> proj_in -> transformer blocks that
attend across frames at each position -> proj_out -> + residual. Everything after the GroupNorm acts
on each position independently, so with whole-frame GroupNorm statistics (groupnorm.py) the module
can run on any subset of positions and give the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .groupnorm import group_norm_apply, group_norm_stats
from .slicing import chunk_ranges

TokenFn = Callable[[Tensor], Tensor]  # (batch*frames, positions, channels) -> same shape


@dataclass(frozen=True)
class TemporalTransformerParts:
    """The roles of a temporal transformer, as the slicer needs them."""

    norm_weight: Tensor | None
    norm_bias: Tensor | None
    num_groups: int
    eps: float
    proj_in: TokenFn
    blocks: TokenFn
    proj_out: TokenFn


def temporal_transformer_sliced(
    x: Tensor, parts: TemporalTransformerParts, spatial_chunk: int, out: Tensor | None = None, effect: float | None = None,
    video_frames: int = 1,
) -> Tensor:
    """Run the temporal transformer on `x` (batch*frames, channels, h, w), `spatial_chunk` positions at a time.

    out: where to write the result; may be `x` itself (each chunk reads only its own positions, and
        the statistics are taken before anything is written). A new tensor when None.
    effect: AnimateDiff's motion strength e: result = x*(1-e) + module(x)*e; None means 1.
    video_frames: consecutive samples whose GroupNorm statistics are shared (AnimateDiff-Evolved's
        GroupNorm over whole videos); 1 = per frame.
    """
    batch, channels, height, width = x.shape
    positions = height * width
    x = x.contiguous() if out is not x else x
    mean, rstd = group_norm_stats(x, parts.num_groups, parts.eps, video_frames=video_frames)
    if out is None:
        out = torch.empty_like(x)
    x_flat = x.view(batch, channels, positions)
    out_flat = out.view(batch, channels, positions)
    for start, end in chunk_ranges(positions, spatial_chunk):
        x_part = x_flat[:, :, start:end]  # (batch*frames, channels, d), a view
        h = group_norm_apply(x_part, mean, rstd, parts.norm_weight, parts.norm_bias, parts.num_groups)
        h = h.permute(0, 2, 1).contiguous()  # (batch*frames, d, channels)
        h = parts.proj_out(parts.blocks(parts.proj_in(h)))
        result = h.permute(0, 2, 1) + x_part
        del h
        if effect is not None:
            result = x_part * (1.0 - effect) + result * effect
        out_flat[:, :, start:end] = result
        del result
    return out
