"""SD1.5 at its own width (model_channels 320, motion modules 320/640/1280/1280): the checks where the width is
the point, on one build of the random SD1.5 UNet with mm_sd_v15_v2's motion modules injected (5 GB in fp32, about
20 s to draw on one thread; everything else runs SD1.5's layout at a fifth of its width, testing/matrix.py):
- the structure reader reads SD1.5's layers as core.budget.sd15_shape has them (the laws were read off them);
- the streamlined forward against ComfyUI's, the matrix's hardest case (tests/test_unet_exact.py): the longest
  float32 reductions;
- the memory laws against the live-tensor meter at the cheapest sliced point (tests/test_budget.py's grid).
"""
from __future__ import annotations

import logging

import pytest
import torch

from test_budget import PREDICTION_TOLERANCE
from test_unet_exact import CONFIGS, CONDS, FRAMES, assert_exact, inputs, slicing_spy, through_wrapper  # noqa: F401

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def sd15():
    """(UNet, motion model) at SD1.5's width, one copy for the file."""
    from comfyui_streamline.testing import synthetic

    unet = synthetic.sd15_unet(seed=0, width=synthetic.SD15_WIDTH)
    motion = synthetic.sd15_motion_model(seed=1, width=synthetic.SD15_WIDTH)
    synthetic.inject(unet, motion)
    yield unet, motion
    del unet, motion


def test_structure_reader_reads_sd15s_layers(sd15):
    from comfyui_streamline.core.budget import sd15_shape
    from comfyui_streamline.families.unet.structure import unet_shape

    assert unet_shape(sd15[0]) == sd15_shape()


def test_forward_equals_comfyui_forward(sd15, slicing_spy, caplog):
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.testing import synthetic

    unet, motion = sd15
    motion.set_video_length(FRAMES, FRAMES)
    x, t, c = inputs(FRAMES * CONDS)
    with torch.inference_mode():
        ref = unet(x, t, c, transformer_options=synthetic.ade_transformer_options(CONDS))
        with caplog.at_level(logging.WARNING, logger="ComfyUI-Streamline"):
            out = through_wrapper(unet, SliceConfig(**CONFIGS[0]), synthetic.ade_transformer_options(CONDS), x, t, c)
    assert_exact(out, ref)
    assert slicing_spy["frame_groups_sliced"] >= 3 and slicing_spy["motion_modules_sliced"] >= 3
    assert not caplog.records, [r.message for r in caplog.records]


@pytest.mark.parametrize("frames, side, chunks", [(8, 8, (2, 32))])
def test_prediction_matches_the_measured_peak(sd15, frames, side, chunks):
    """An 8-frame 8x8 call, CFG batched, frame slices of 2 and 32 positions: predicted within the budget
    tests' tolerance of the live-tensor meter's peak."""
    from comfyui_streamline.core.budget import Workload, predict_peak_bytes
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.unet.structure import unet_shape
    from comfyui_streamline.testing.synthetic import sd15_video_call_peak_bytes

    unet, motion = sd15
    peak = sd15_video_call_peak_bytes(unet, motion, frames, side, chunks)
    predicted = predict_peak_bytes(unet_shape(unet), Workload(2 * frames, frames, side, side), SliceConfig(*chunks))
    print(f"\nwidth 320 {frames}x{side}x{side} {chunks}: measured {peak / 2**20:.1f} MiB, predicted "
          f"{predicted / 2**20:.1f} MiB ({predicted / peak - 1:+.1%})")
    assert abs(predicted / peak - 1) <= PREDICTION_TOLERANCE, (predicted, peak)
