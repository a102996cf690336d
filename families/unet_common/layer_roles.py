"""Which axis each layer of a ComfyUI UNet block may be sliced on."""
from __future__ import annotations

import enum

import torch.nn as nn
from comfy.ldm.modules.attention import SpatialTransformer, SpatialVideoTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import (
    Downsample, ResBlock, TimestepBlock, UNetModel, Upsample, VideoResBlock,
)


class Role(enum.Enum):
    RES_BLOCK = "resblock"  # per frame: layer(x, emb)
    SPATIAL_TRANSFORMER = "spatial_transformer"  # per frame: layer(x, context, transformer_options)
    UPSAMPLE = "upsample"  # per frame: layer(x, output_shape=...)
    PER_FRAME = "per_frame"  # per frame: layer(x)
    MOTION_MODULE = "motion_module"  # AnimateDiff temporal module: sliced over positions
    WHOLE = "whole"  # unknown: runs unsliced, as ComfyUI would run it
    UNSUPPORTED = "unsupported"  # the model needs ComfyUI's own forward (video ResBlocks, ...)


# Plain per-frame layers that forward_timestep_embed calls as layer(x).
_PER_FRAME_TYPES = (Downsample, nn.Conv2d, nn.GroupNorm, nn.SiLU, nn.Identity, nn.Dropout)


def is_ade_motion_module(layer: nn.Module) -> bool:
    """AnimateDiff-Evolved's VanillaTemporalModule, recognised by shape rather than by import:
    ADE is loaded by ComfyUI under a folder name this pack should not depend on."""
    if type(layer).__name__ != "VanillaTemporalModule":
        return False
    tt = getattr(layer, "temporal_transformer", None)
    return all(hasattr(tt, name) for name in ("norm", "proj_in", "transformer_blocks", "proj_out"))


def role_of(layer: nn.Module, patched_types: tuple[type, ...]) -> Role:
    if isinstance(layer, (VideoResBlock, SpatialVideoTransformer)):
        return Role.UNSUPPORTED
    if patched_types and isinstance(layer, patched_types):
        # forward_timestep_embed hands these to their patch (ComfyUI 0.33 before its built-in types, 0.3.64
        # after them): a layer that is also a built-in type runs through the host's own dispatch
        if is_ade_motion_module(layer):
            return Role.MOTION_MODULE
        return Role.WHOLE
    if isinstance(layer, ResBlock):
        return Role.RES_BLOCK
    if isinstance(layer, TimestepBlock):
        return Role.WHOLE
    if isinstance(layer, SpatialTransformer):
        return Role.SPATIAL_TRANSFORMER
    if isinstance(layer, Upsample):
        return Role.UPSAMPLE
    if isinstance(layer, _PER_FRAME_TYPES):
        return Role.PER_FRAME
    return Role.WHOLE


def is_svd_unet(unet: nn.Module) -> bool:
    """A ComfyUI UNetModel with video layers (SVD, SV3D)."""
    if not isinstance(unet, UNetModel):
        return False
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    return any(isinstance(layer, (VideoResBlock, SpatialVideoTransformer))
               for block in blocks if block is not None for layer in block)
