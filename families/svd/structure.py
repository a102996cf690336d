"""Read an SVD UNet (ComfyUI's UNetModel with video layers) into families/svd/laws.py's description."""
from __future__ import annotations

import torch.nn as nn
from comfy.ldm.modules.attention import SpatialVideoTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample, VideoResBlock

from .laws import SVDLayer, SVDStructure, SVDWork


def _layer(layer: nn.Module, channels_in: int) -> SVDLayer:
    if isinstance(layer, VideoResBlock):
        return SVDLayer("video_res", channels_in, layer.out_channels)
    if isinstance(layer, SpatialVideoTransformer):
        block = layer.transformer_blocks[0]
        return SVDLayer("video_transformer", channels_in, channels_in, block.attn1.heads)
    if isinstance(layer, Upsample):
        return SVDLayer("up", channels_in, layer.out_channels)
    if isinstance(layer, Downsample):
        return SVDLayer("down", channels_in, layer.out_channels)
    return SVDLayer("conv", channels_in, getattr(layer, "out_channels", channels_in))


def _block(block: nn.Module, channels: int) -> tuple[tuple[SVDLayer, ...], int]:
    layers = []
    for module in block:
        layers.append(_layer(module, channels))
        channels = layers[-1].channels_out
    return tuple(layers), channels


def read_svd_structure(unet: UNetModel) -> SVDStructure:
    channels, inputs, skips = unet.in_channels, [], []
    for block in unet.input_blocks:
        layers, channels = _block(block, channels)
        inputs.append(layers)
        skips.append(channels)
    middle, channels = _block(unet.middle_block, channels)
    outputs, skip_channels = [], []
    for block in unet.output_blocks:
        skip = skips.pop()
        layers, channels = _block(block, channels + skip)
        outputs.append(layers)
        skip_channels.append(skip)
    context_dim = 1024
    for module in unet.modules():
        if isinstance(module, SpatialVideoTransformer) and module.transformer_blocks[0].attn2 is not None:
            context_dim = module.transformer_blocks[0].attn2.to_k.in_features
            break
    return SVDStructure(unet.model_channels, tuple(inputs), middle, tuple(outputs), tuple(skip_channels), context_dim)


def svd_work(x, context, video_length: int) -> SVDWork:
    """One UNet call's workload: x (batch*frames, C, H, W), the context (batch*frames, tokens, dim)."""
    tokens = context.shape[1] if context is not None and context.ndim == 3 else 1
    return SVDWork(x.shape[0], video_length, x.shape[-2], x.shape[-1], tokens, x.element_size())
