"""Two-pass GroupNorm: whole-frame statistics first, then normalise any slice of positions.

A motion module normalises each frame over all its positions before attending across frames. When
the module is sliced over positions, a slice cannot compute those statistics itself; computing them
once over the whole frame keeps the result exact, and only (batch, groups) values are stored instead
of a normalised copy of the feature.
"""
from __future__ import annotations

import torch
from torch import Tensor


def group_norm_stats(x: Tensor, num_groups: int, eps: float, batch_chunk: int = 8) -> tuple[Tensor, Tensor]:
    """Per-(sample, group) mean and 1/std of `x` (batch, channels, ...), in float32.

    Computed `batch_chunk` samples at a time, so a half-precision input is upcast one chunk at a time.
    """
    batch, channels = x.shape[:2]
    if channels % num_groups:
        raise ValueError(f"{channels} channels do not split into {num_groups} groups")
    grouped = x.reshape(batch, num_groups, -1)
    mean = torch.empty(batch, num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    for start in range(0, batch, batch_chunk):
        part = grouped[start : start + batch_chunk].float()
        var, mu = torch.var_mean(part, dim=-1, unbiased=False)
        mean[start : start + batch_chunk] = mu
        rstd[start : start + batch_chunk] = torch.rsqrt(var + eps)
        del part
    return mean, rstd


def group_norm_apply(
    x_part: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int
) -> Tensor:
    """Normalise a slice of positions `x_part` (batch, channels, positions) with precomputed statistics.

    Arithmetic in float32, result in x_part's dtype, as GroupNorm kernels do for half precision.
    """
    batch, channels, positions = x_part.shape
    y = x_part.reshape(batch, num_groups, channels // num_groups, positions).float()
    y = (y - mean[:, :, None, None]) * rstd[:, :, None, None]
    y = y.reshape(batch, channels, positions)
    if weight is not None:
        y = y * weight.to(device=y.device, dtype=torch.float32)[None, :, None]
    if bias is not None:
        y = y + bias.to(device=y.device, dtype=torch.float32)[None, :, None]
    return y.to(x_part.dtype)
