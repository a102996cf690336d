"""The self-check the UNet and SVD verdicts share: a sliced forward against UNetModel._forward on a tiny float64
UNet, with ControlNet residuals and block patches."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from ...core.slicing import SliceConfig
from ...host import fingerprints as host_fingerprints, tiny_models
from ...host.log import LogOnce


def sliced_unet_self_check(forward: Callable, video: bool = False) -> float:
    """A sliced UNet forward (`forward(unet, config, log, x, ...)`) against UNetModel._forward on a tiny float64
    UNet (SVD's with `video`), with ControlNet residuals and input, middle and output block patches; the relative
    difference."""
    unet = tiny_models.unet(video=video)
    frames = 3
    batch = 2 * frames
    x = tiny_models.inputs((batch, 4, 8, 8), 1)
    timesteps = torch.linspace(10.0, 900.0, batch, dtype=x.dtype)
    context = tiny_models.inputs((batch, 5, 8), 2)
    kwargs = {"y": tiny_models.inputs((batch, 12), 3), "num_video_frames": frames,
              "image_only_indicator": torch.zeros(2, frames, dtype=x.dtype)} if video else {}
    shapes: list[tuple] = []  # the input blocks' outputs: the skips ControlNet residuals are added to
    with torch.no_grad():
        unet._forward(x, timesteps, context, transformer_options={"patches": {"input_block_patch": [
            lambda h, to: shapes.append(tuple(h.shape)) or h]}}, **kwargs)
    residuals = [tiny_models.inputs(shape, 10 + i) * 0.1 for i, shape in enumerate(shapes)]
    patches = {"input_block_patch": [lambda h, to: h * 1.01],
               "output_block_patch": [lambda h, hsp, to: (h, hsp * 0.9)],
               "middle_block_after_patch": [lambda args: {"h": args["h"] * 1.1}]}

    def run(forward) -> Tensor:
        # apply_control pops from the end: the input list in reverse, the output one as the skips leave
        control = {"input": residuals[::-1], "middle": [residuals[-1]], "output": list(residuals)}
        to = {"patches": {k: list(v) for k, v in patches.items()}}
        with torch.no_grad():
            return forward(x, timesteps, context, control=control, transformer_options=to, **kwargs)

    config = SliceConfig(frame_chunk=2, spatial_chunk=5, scale_with_level=False)
    ours = functools.partial(forward, unet, config, LogOnce())
    return host_fingerprints.relative_difference(run(ours), run(unet._forward))
