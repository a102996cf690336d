"""What ComfyUI's UNetModel._forward does before its first block, shared by the pack's two UNet forwards
(streamlined_unet.py for SD UNets with ADE, svd_unet.py for SVD), and the key under which Step Rehash hands
a UNet call its shallow/deep split. Its own module: streamlined_unet dispatches to svd_unet, so neither can
import the other for these."""
from __future__ import annotations

import functools

from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
from torch import Tensor

from ...host import fingerprints as host_fingerprints



def time_embedding(unet, x: Tensor, timesteps: Tensor, y: Tensor | None, transformer_options: dict) -> Tensor:
    """UNetModel._forward's `emb`: the timestep embedding, ComfyUI's emb patches, and the class (ADM) label."""
    assert (y is not None) == (unet.num_classes is not None), "must specify y if and only if the model is class-conditional"
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype))
    for p in transformer_options.get("patches", {}).get("emb_patch", []):
        emb = p(emb, unet.model_channels, transformer_options)
    if unet.num_classes is not None:
        assert y.shape[0] == x.shape[0]
        emb = emb + unet.label_emb(y)
    return emb


@functools.lru_cache(maxsize=None)
def host_calls_middle_block_after_patch() -> bool:
    """Whether the host's UNetModel._forward calls middle_block_after_patch patches (0.33 does, 0.3.64 not)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return host_fingerprints.source_mentions(UNetModel._forward, "middle_block_after_patch", True)


def middle_block_after(patches: dict, h: Tensor, x: Tensor, emb: Tensor, context, y, timesteps, to: dict) -> Tensor:
    """UNetModel._forward's middle_block_after_patch (ComfyUI 0.33): each patch gets the middle block's output
    (after its ControlNet residual) and returns the h the output blocks read. Not on a host that has none."""
    if not host_calls_middle_block_after_patch():
        return h
    for p in patches.get("middle_block_after_patch", []):
        h = p({"h": h, "x": x, "emb": emb, "context": context, "y": y, "timesteps": timesteps,
               "transformer_options": to})["h"]
    return h
