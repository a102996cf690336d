"""Adapter: AnimateDiff-Evolved's VanillaTemporalModule -> core.temporal's spatially sliced transformer.

Only the plain path of the module is sliced. Features that carry per-position or per-view state of
their own (motion-strength masks, scale masks, CameraCtrl, MotionCtrl, AnimateLCM-I2V features,
motion-module views) run through ADE's own forward, unsliced; `unsliceable_reason` says which.
"""
from __future__ import annotations

import math

from torch import Tensor

from ..core.temporal import TemporalTransformerParts, temporal_transformer_sliced


def _views_active(module, video_length: int) -> bool:
    views = module.view_options
    if not views:
        return False
    if views.context_length < video_length:
        return True
    return views.context_length == video_length and views.use_on_equal_length


def unsliceable_reason(module) -> str | None:
    tt = module.temporal_transformer
    if isinstance(module.effect, Tensor):
        return "a motion-strength mask"
    if module.img_features is not None:
        return "AnimateLCM-I2V image features"
    if module.camera_features is not None or isinstance(tt.raw_cameractrl_effect, Tensor):
        return "CameraCtrl features"
    if any(mask is not None for mask in tt.raw_scale_masks):
        return "a motion-scale mask"
    if _views_active(module, tt.video_length):
        return "motion-module views (view_options)"
    for block in tt.transformer_blocks:
        if block.cc_projection is not None:
            return "MotionCtrl"
        if any(att.qkv_merge is not None for att in block.attention_blocks):
            return "CameraCtrl attention"
    return None


def run_motion_module_sliced(
    module, x: Tensor, context: Tensor | None, transformer_options: dict, spatial_chunk: int, in_place: bool
) -> Tensor:
    """Same result as ADE's forward_timestep_embed_patch_ade(module, x, ...), `spatial_chunk` positions at a time."""
    effect = module.effect
    if effect is not None and math.isclose(effect, 0.0):
        return x  # ADE returns its input untouched when the motion strength is 0
    if effect is not None and math.isclose(effect, 1.0):
        effect = None
    tt = module.temporal_transformer
    scale_masks = [None] * tt.get_attention_count()
    cameractrl_effect = tt.get_cameractrl_effect(x)

    def blocks(h: Tensor) -> Tensor:  # (batch*frames, positions, channels)
        for block in tt.transformer_blocks:
            h = block(
                h,
                encoder_hidden_states=context,
                attention_mask=None,
                video_length=tt.video_length,
                scale_masks=scale_masks,
                cameractrl_effect=cameractrl_effect,
                view_options=module.view_options,
                mm_kwargs=None,
                transformer_options=transformer_options,
            )
        return h

    parts = TemporalTransformerParts(
        norm_weight=tt.norm.weight,
        norm_bias=tt.norm.bias,
        num_groups=tt.norm.num_groups,
        eps=tt.norm.eps,
        proj_in=lambda h: tt.proj_in(h).to(h.dtype),
        blocks=blocks,
        proj_out=tt.proj_out,
    )
    return temporal_transformer_sliced(x, parts, spatial_chunk, out=x if in_place else None, effect=effect)
