"""Read a ComfyUI UNet's structure into core.budget's description (for the Memory Budget planner)."""
from __future__ import annotations

import torch.nn as nn
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ...core.budget import Block, Layer, UNetShape, sd15_shape
from ..unet_common.layer_roles import Role, is_ade_motion_module, role_of


def _channels_out(layer: nn.Module, channels_in: int) -> int:
    for name in ("out_channels", "channels"):
        value = getattr(layer, name, None)
        if isinstance(value, int):
            return value
    conv = getattr(layer, "conv", None) or getattr(layer, "op", None)
    return getattr(conv, "out_channels", channels_in)


def _heads(layer: nn.Module) -> int:
    for module in layer.modules():
        heads = getattr(module, "heads", None)
        if isinstance(heads, int):
            return heads
    return 8


def _layer(layer: nn.Module, channels_in: int) -> Layer:
    if is_ade_motion_module(layer):
        return Layer("motion", channels_in, channels_in, _heads(layer))
    role = role_of(layer, (type(layer),) if is_ade_motion_module(layer) else ())
    if role is Role.RES_BLOCK:
        return Layer("res", channels_in, layer.out_channels)
    if role is Role.SPATIAL_TRANSFORMER:
        return Layer("attn", channels_in, channels_in, _heads(layer))
    if role is Role.UPSAMPLE:
        return Layer("up", channels_in, layer.out_channels)
    if type(layer).__name__ == "Downsample":
        return Layer("down", channels_in, layer.out_channels)
    return Layer("other", channels_in, _channels_out(layer, channels_in))


def unet_shape(unet: UNetModel, assume_motion_modules: bool = False) -> UNetShape:
    """The structure of `unet` as it is now. ADE injects motion modules only when sampling starts: with
    `assume_motion_modules`, an SD1.5-sized UNet without them is described with them, where ADE puts them."""
    has_motion = any(is_ade_motion_module(m) for m in unet.modules())
    if assume_motion_modules and not has_motion and unet.model_channels == 320 and len(unet.output_blocks) == 12:
        return sd15_shape(motion_modules=True)
    channels, skips, inputs = unet.in_channels, [], []
    for block in unet.input_blocks:
        layers = []
        for layer in block:
            described = _layer(layer, channels)
            layers.append(described)
            channels = described.channels_out
        inputs.append(Block(tuple(layers)))
        skips.append(channels)
    middle = []
    for layer in unet.middle_block or []:
        described = _layer(layer, channels)
        middle.append(described)
        channels = described.channels_out
    outputs = []
    for block in unet.output_blocks:
        skip = skips.pop()
        layers, current = [], channels + skip
        for layer in block:
            described = _layer(layer, current)
            layers.append(described)
            current = described.channels_out
        outputs.append(Block(tuple(layers), skip_channels=skip))
        channels = current
    return UNetShape(unet.model_channels, tuple(inputs), Block(tuple(middle)), tuple(outputs), unet.out_channels)
