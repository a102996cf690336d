"""Two-pass GroupNorm: statistics first, then normalise any slice with them.

A motion module normalises each frame over all its positions before attending across frames. When
the module is sliced over positions, a slice cannot compute those statistics itself; computing them
once over the whole frame keeps the result exact, and only (batch, groups) values are stored instead
of a normalised copy of the feature.

The same holds across frames: AnimateDiff-Evolved runs v1 motion models (and PIA, and v2 models
loaded "improperly") with every GroupNorm of the UNet taking its statistics over all frames of a
video. A per-frame layer sliced over frames then needs whole-video statistics, which are sums: they
are gathered per sample and channel (`channel_moments`, over slices or over the parts of a
concatenation) and combined per video and group (`video_group_stats`).
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32, as GroupNorm kernels compute; float64 stays float64 (a float64 model is the
    way to check that slicing changes nothing but rounding)."""
    return torch.promote_types(dtype, torch.float32)


def group_norm_stats(x: Tensor, num_groups: int, eps: float, batch_chunk: int = 8,
                     video_frames: int = 1) -> tuple[Tensor, Tensor]:
    """Per-(sample, group) mean and 1/std of `x` (batch, channels, ...), in compute_dtype(x.dtype).

    video_frames: consecutive samples that share their statistics (one video); 1 = per sample, as
    torch's GroupNorm does. Computed `batch_chunk` samples at a time, so a half-precision input is
    upcast one chunk at a time.
    """
    batch, channels = x.shape[:2]
    if channels % num_groups:
        raise ValueError(f"{channels} channels do not split into {num_groups} groups")
    if video_frames > 1:
        mean, m2 = channel_moments(x, batch_chunk)
        return video_group_stats(mean, m2, x[0, 0].numel(), num_groups, eps, video_frames)
    grouped = x.reshape(batch, num_groups, -1)
    mean = torch.empty(batch, num_groups, device=x.device, dtype=compute_dtype(x.dtype))
    rstd = torch.empty_like(mean)
    for start in range(0, batch, batch_chunk):
        part = grouped[start : start + batch_chunk].to(mean.dtype)
        var, mu = torch.var_mean(part, dim=-1, unbiased=False)
        mean[start : start + batch_chunk] = mu
        rstd[start : start + batch_chunk] = torch.rsqrt(var + eps)
        del part
    return mean, rstd


def channel_moments(x: Tensor, batch_chunk: int = 8, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and M2 (sum of squared deviations from that mean) of `x`
    (batch, channels, ...) over its positions, in compute_dtype; `batch_chunk` samples upcast at a time.
    dtype: the moments of x cast to it first (what a layer that casts its input normalises)."""
    batch, channels = x.shape[:2]
    flat = x.reshape(batch, channels, -1)
    mean = torch.empty(batch, channels, device=x.device, dtype=compute_dtype(dtype or x.dtype))
    m2 = torch.empty_like(mean)
    for start in range(0, batch, batch_chunk):
        part = flat[start : start + batch_chunk]
        part = (part if dtype is None else part.to(dtype)).to(mean.dtype)
        var, mu = torch.var_mean(part, dim=-1, unbiased=False)
        mean[start : start + batch_chunk] = mu
        m2[start : start + batch_chunk] = var * part.shape[-1]
        del part
    return mean, m2


def video_group_stats(mean: Tensor, m2: Tensor, count: int, num_groups: int, eps: float,
                      video_frames: int) -> tuple[Tensor, Tensor]:
    """Combine per-(sample, channel) moments, each over `count` positions, into the statistics of
    each (video, group): all `video_frames` samples of a video and the group's channels. Returned per
    sample, (batch, groups), like group_norm_stats. Chan's parallel formula: no E[x^2] - E[x]^2."""
    batch, channels = mean.shape
    if batch % video_frames or channels % num_groups:
        raise ValueError(f"{batch} samples x {channels} channels do not split into videos of {video_frames} "
                         f"frames and {num_groups} groups")
    videos = batch // video_frames
    # (videos, frames, groups, channels per group) -> (videos, groups, entries)
    shape = (videos, video_frames, num_groups, channels // num_groups)
    part_means = mean.reshape(shape).transpose(1, 2).reshape(videos, num_groups, -1)
    part_m2 = m2.reshape(shape).transpose(1, 2).reshape(videos, num_groups, -1)
    group_mean = part_means.mean(dim=-1)
    spread = (part_means - group_mean[..., None]).square().sum(dim=-1)
    var = (part_m2.sum(dim=-1) + count * spread) / (count * part_means.shape[-1])
    rstd = torch.rsqrt(var + eps)
    return group_mean.repeat_interleave(video_frames, dim=0), rstd.repeat_interleave(video_frames, dim=0)


def group_norm_apply(
    x_part: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int
) -> Tensor:
    """Normalise `x_part` (batch, channels, ...: any slice of positions or of samples) with statistics
    for its samples, (batch, groups).

    Arithmetic in compute_dtype (float32 for half precision, as GroupNorm kernels do), result in
    x_part's dtype.
    """
    shape = x_part.shape
    batch, channels = shape[:2]
    work = compute_dtype(x_part.dtype)
    y = x_part.reshape(batch, num_groups, channels // num_groups, -1).to(work)
    y = (y - mean[:, :, None, None].to(work)) * rstd[:, :, None, None].to(work)
    y = y.reshape(batch, channels, -1)
    if weight is not None:
        y = y * weight.to(device=y.device, dtype=work)[None, :, None]
    if bias is not None:
        y = y + bias.to(device=y.device, dtype=work)[None, :, None]
    return y.to(x_part.dtype).reshape(shape)
