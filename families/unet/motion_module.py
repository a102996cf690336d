"""Adapter: AnimateDiff-Evolved's VanillaTemporalModule -> core.temporal's spatially sliced transformer.

Only the plain path of the module is sliced, and only parts it knows: `unsliceable_reason` checks
every attribute and child of the module against an allowlist. Features that carry per-position or
per-view state of their own (motion-strength masks, scale masks, CameraCtrl, MotionCtrl,
AnimateLCM-I2V features, motion-module views), and anything a newer ADE adds, run through ADE's own
forward, unsliced; `unsliceable_reason` says which.
"""
from __future__ import annotations

import math

import torch.nn as nn
from torch import Tensor

from ...core.temporal import TemporalTransformerParts, temporal_transformer_sliced


def _views_active(module, video_length: int) -> bool:
    views = module.view_options
    if not views:
        return False
    if views.context_length < video_length:
        return True
    return views.context_length == video_length and views.use_on_equal_length


def _any(value) -> bool:
    return True


def _unset(value) -> bool:
    return value is None


def _is_number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


# What the sliced path knows of AnimateDiff-Evolved's motion module, part by part: each attribute it
# handles (and the values it handles: a feature that sets one of them to something else runs the
# module unsliced) and the child modules it runs. An attribute or child that is not listed (a feature of
# a newer ADE) makes the module run unsliced unless its value is None or False: never sliced blindly.
_KNOWN_PARTS: dict[str, tuple[dict, set[str]]] = {
    "VanillaTemporalModule": ({
        "video_length": _any, "full_length": _any, "sub_idxs": _any, "block_type": _any, "block_idx": _any,
        "module_idx": _any, "id": _any, "prev_input_tensor_batch": _any, "temp_effect_mask": _any,
        "apply_ref_when_disabled": _any,
        "view_options": _any,  # checked against the video length below
        "effect": _is_number,  # a Tensor: a motion-strength mask
        "img_features": _unset,  # AnimateLCM-I2V
        "camera_features": _unset,  # CameraCtrl
    }, {"temporal_transformer"}),
    "TemporalTransformer3DModel": ({
        "id": _any, "video_length": _any, "full_length": _any, "sub_idxs": _any, "prev_hidden_states_batch": _any,
        "temp_cameractrl_effect": _any, "prev_cameractrl_hidden_states_batch": _any, "temp_scale_masks": _any,
        "raw_cameractrl_effect": _is_number,  # a Tensor: CameraCtrl
        "raw_scale_masks": lambda masks: all(mask is None for mask in masks),  # motion-scale masks
    }, {"norm", "proj_in", "transformer_blocks", "proj_out"}),
    "TemporalTransformerBlock": ({"cc_projection": _unset},  # MotionCtrl
                                 {"attention_blocks", "norms", "ff", "ff_norm"}),
    "VersatileAttention": ({
        "actual_attention": _any, "heads": _any, "dim_head": _any, "scale": _any, "default_scale": _any,
        "attention_mode": lambda mode: mode == "Temporal", "is_cross_attention": lambda cross: cross is False,
        "query_dim": _any, "camera_feature_enabled": _any,
        "qkv_merge": _unset,  # CameraCtrl attention
    }, {"to_q", "to_k", "to_v", "to_out", "pos_encoder"}),
}
_FEATURE_NAMES = {
    ("VanillaTemporalModule", "effect"): "a motion-strength mask",
    ("VanillaTemporalModule", "img_features"): "AnimateLCM-I2V image features",
    ("VanillaTemporalModule", "camera_features"): "CameraCtrl features",
    ("TemporalTransformer3DModel", "raw_cameractrl_effect"): "CameraCtrl features",
    ("TemporalTransformer3DModel", "raw_scale_masks"): "a motion-scale mask",
    ("TemporalTransformerBlock", "cc_projection"): "MotionCtrl",
    ("VersatileAttention", "qkv_merge"): "CameraCtrl attention",
}


def _part_reason(part) -> str | None:
    kind = type(part).__name__
    if kind not in _KNOWN_PARTS:
        return f"a part the sliced path does not know ({kind})"
    attributes, children = _KNOWN_PARTS[kind]
    for name, value in vars(part).items():
        if name.startswith("_") or name == "training":
            continue
        check = attributes.get(name)
        if check is None:
            if value is not None and value is not False:
                return f"an attribute the sliced path does not know ({kind}.{name})"
        elif not check(value):
            return _FEATURE_NAMES.get((kind, name), f"{kind}.{name} = {type(value).__name__}")
    for name, _ in part.named_children():
        if name not in children:
            return f"a layer the sliced path does not know ({kind}.{name})"
    return None


def unsliceable_reason(module) -> str | None:
    """Why `module` must run through ADE's own forward, or None when the sliced path knows all of it."""
    tt = module.temporal_transformer
    parts = [module, tt]
    for block in tt.transformer_blocks:
        parts += [block, *block.attention_blocks]
    for part in parts:
        reason = _part_reason(part)
        if reason is not None:
            return reason
    if _views_active(module, tt.video_length):
        return "motion-module views (view_options)"
    return None


def norm_parameters(norm: nn.Module, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The GroupNorm's weight and bias as its own forward uses them, read once per call: through ComfyUI's cast
    path where the layer casts (manual cast, lowvram, weight patches: comfy.ops' forward_comfy_cast_weights),
    else its parameters, moved to x's device once (not once per spatial slice)."""
    if getattr(norm, "comfy_cast_weights", False) or getattr(norm, "weight_function", None) \
            or getattr(norm, "bias_function", None):
        import comfy.ops

        weight, bias = comfy.ops.cast_bias_weight(norm, x)[:2]
        return weight, bias
    weight, bias = norm.weight, norm.bias
    return (weight.to(x.device) if weight is not None else None,
            bias.to(x.device) if bias is not None else None)


def run_motion_module_sliced(
    module, x: Tensor, context: Tensor | None, transformer_options: dict, spatial_chunk: int, in_place: bool,
    video_frames: int = 1,
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

    norm_weight, norm_bias = norm_parameters(tt.norm, x)
    parts = TemporalTransformerParts(
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        num_groups=tt.norm.num_groups,
        eps=tt.norm.eps,
        proj_in=lambda h: tt.proj_in(h).to(h.dtype),
        blocks=blocks,
        proj_out=tt.proj_out,
    )
    return temporal_transformer_sliced(x, parts, spatial_chunk, out=x if in_place else None, effect=effect,
                                       video_frames=video_frames)
