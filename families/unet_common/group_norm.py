"""A GroupNorm of ComfyUI's UNets run with given statistics (ADE's GroupNorm over videos, SVD's sliced video
layers): the norm's weight and bias as its own forward uses them."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ...core.groupnorm import group_norm_apply

Stats = tuple[Tensor, Tensor]  # per-sample (batch, groups) mean and 1/std


def _norm_params(norm: nn.GroupNorm, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The GroupNorm's weight and bias as its own forward would use them (cast where ComfyUI casts)."""
    if getattr(norm, "comfy_cast_weights", False) or getattr(norm, "weight_function", None) or \
            getattr(norm, "bias_function", None):
        import comfy.ops

        cast = comfy.ops.cast_bias_weight(norm, like)
        return cast[0], cast[1]
    return norm.weight, norm.bias


def normalize(norm: nn.GroupNorm, x: Tensor, stats: Stats) -> Tensor:
    weight, bias = _norm_params(norm, x)
    return group_norm_apply(x, stats[0], stats[1], weight, bias, norm.num_groups)
