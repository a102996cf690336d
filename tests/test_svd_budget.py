"""The SVD Memory Budget (families/svd/laws.py) against the live-tensor counter (core/memtrace.py), CPU, fp32.

Layer by layer (ComfyUI's VideoResBlock and SpatialVideoTransformer, and the sliced forward's), then
whole forwards, ComfyUI's and sliced, of SVD's layout at 64 channels (families/svd/forward.py's test model) at
tiny shapes: one video and cond/uncond batched, 5 and 14 frames. Nothing in the laws is fitted to these.
"""
from __future__ import annotations

import pytest
import torch

from comfyui_streamline.testing.matrix import full_matrix_only

pytestmark = pytest.mark.host

TOLERANCE = 0.05


@pytest.fixture(scope="module")
def unet():
    from comfyui_streamline.testing.model_families import svd_layout
    from comfyui_streamline.testing.weights import randomize_

    return randomize_(svd_layout(model_channels=64), seed=2).eval()


def call(videos: int, frames: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = videos * frames
    x = torch.randn(batch, 8, size, size, generator=g)
    context = torch.randn(videos, 1, 1024, generator=g).repeat_interleave(frames, 0)
    y = torch.randn(videos, 768, generator=g).repeat_interleave(frames, 0)
    return x, torch.full((batch,), 0.7), context, y, {"num_video_frames": frames}


def measured_peak(unet, config, x, t, c, y, kw) -> int:
    from comfyui_streamline.core.memtrace import LiveTensorMeter
    from comfyui_streamline.host.log import LogOnce
    from comfyui_streamline.families.svd.forward import svd_forward

    with torch.inference_mode(), LiveTensorMeter() as meter:
        if config is None:
            unet(x, t, c, y, transformer_options={}, **kw)
        else:
            svd_forward(unet, config, LogOnce(), x, t, c, y, None, {}, **kw)
    return meter.peak_bytes


def test_structure_reader_matches_the_layout(unet):
    from comfyui_streamline.families.svd.laws import svd_structure
    from comfyui_streamline.families.svd.structure import read_svd_structure

    assert read_svd_structure(unet) == svd_structure(64)


@pytest.mark.parametrize("videos", [2, 1], ids=["cfg-batched", "single"])
def test_layer_laws(unet, videos):
    """Each video layer alone (level 0, 64 channels, 16x16, 5 frames): ComfyUI's forward of the layer and
    the sliced one at three slicings, against the walk's law for it."""
    from comfyui_streamline.core.memtrace import LiveTensorMeter
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.svd.laws import SUB_QUADRATIC, SVDWork, _SVDWalk, svd_structure
    from comfyui_streamline.host.log import LogOnce
    from comfyui_streamline.families.svd.forward import Feature, SVDForward
    from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed

    frames, size = 5, 16
    batch = videos * frames
    vrb, svt = unet.input_blocks[1][0], unet.input_blocks[1][1]
    lvrb, lsvt = svd_structure(64).input_blocks[1]
    work = SVDWork(batch, frames, size, size)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 64, size, size, generator=g)
    emb = torch.randn(batch, unet.time_embed[-1].out_features, generator=g)
    context = torch.randn(videos, 1, 1024, generator=g).repeat_interleave(frames, 0)
    rows = []
    with torch.inference_mode():
        for layer, law in ((vrb, lvrb), (svt, lsvt)):
            with LiveTensorMeter() as meter:
                forward_timestep_embed([layer], x, emb, context, {"transformer_index": 0}, None, num_video_frames=frames)
            walk = _SVDWalk(svd_structure(64), work, None, SUB_QUADRATIC)
            rows.append((type(layer).__name__, "whole", meter.peak_bytes, 4 * batch * walk.whole_values(law, 0)))
        for config in (SliceConfig(batch, 256, False), SliceConfig(2, 32, False), SliceConfig(1, 16, False)):
            run = SVDForward(unet, config, LogOnce(), x, emb, context, {"transformer_index": 0}, frames, None, None)
            walk = _SVDWalk(svd_structure(64), work, config, SUB_QUADRATIC)
            with LiveTensorMeter() as meter:
                out = run.run_video_resblock(vrb, Feature.of(x, owned=False)).take()
            walk.group([(lvrb, 0)], 0.0)
            walk.video_res_temporal(lvrb, 0, 0.0)
            rows.append(("VideoResBlock", config, meter.peak_bytes, 4 * walk.peak))
            # the transformer's input: the VideoResBlock's output, owned (counted, as in a whole forward)
            walk = _SVDWalk(svd_structure(64), work, config, SUB_QUADRATIC)
            with LiveTensorMeter() as meter:
                run.run_video_transformer(svt, Feature.of(out.clone(), owned=True))
            walk.video_transformer(lsvt, 0, batch * 64 * size * size)
            rows.append(("SpatialVideoTransformer", config, meter.peak_bytes, 4 * walk.peak))
    for name, how, measured, predicted in rows:
        print(f"\n{name} {how}: measured {measured}, predicted {predicted:.0f} ({predicted / measured - 1:+.2%})", end="")
    assert all(abs(predicted / measured - 1) <= TOLERANCE for _, _, measured, predicted in rows)


def configs():
    from comfyui_streamline.core.slicing import SliceConfig

    return [None, SliceConfig(3, 7, False), SliceConfig(2, 16, True), SliceConfig(1, 4, False),
            SliceConfig(4, 10000, True)]


@pytest.mark.parametrize("videos,frames,size", [
    (2, 5, 8), (1, 5, 16), (2, 14, 8),
    pytest.param(2, 5, 16, marks=full_matrix_only("CFG at 8x8 and 16x16 single-cond"))],
    ids=["cfg-5f-8", "single-5f-16", "cfg-14f-8", "cfg-5f-16"])
def test_whole_forward_predictions(unet, videos, frames, size):
    """ComfyUI's forward and the sliced one at four slicings: the predicted peak within 5% of the
    live-tensor counter's, and slicing predicted (and measured) to save memory."""
    from comfyui_streamline.families.svd.laws import predict_svd_peak_bytes
    from comfyui_streamline.families.svd.structure import read_svd_structure, svd_work

    x, t, c, y, kw = call(videos, frames, size)
    structure, work = read_svd_structure(unet), svd_work(x, c, frames)
    errors = {}
    for config in configs():
        measured = measured_peak(unet, config, x, t, c, y, kw)
        predicted = predict_svd_peak_bytes(structure, work, config)
        errors[str(config and (config.frame_chunk, config.spatial_chunk, config.scale_with_level))] = (
            measured, predicted, predicted / measured - 1)
    for name, (measured, predicted, error) in errors.items():
        print(f"\n[{videos}x{frames} at {size}x{size}] {name}: measured {measured / 2**20:.2f} MiB, "
              f"predicted {predicted / 2**20:.2f} MiB ({error:+.2%})", end="")
    assert all(abs(error) <= TOLERANCE for _, _, error in errors.values())
    assert errors["(1, 4, False)"][0] < errors["None"][0] / 2


def test_plan_picks_the_coarsest_slicing_that_fits():
    """At SVD's real shapes (svd_xt, 576x1024, 14 and 25 frames, cond/uncond, fp16, SDPA): a 4 GiB budget
    is met, plans grow coarser as the budget grows, and an impossible budget says the minimum."""
    from comfyui_streamline.core.plan_search import BudgetError
    from comfyui_streamline.families.svd.laws import SDPA, SVDWork, plan_svd, predict_svd_peak_bytes, svd_structure

    structure = svd_structure(320)
    for frames in (14, 25):
        work = SVDWork(2 * frames, frames, 72, 128, dtype_bytes=2)
        baseline = predict_svd_peak_bytes(structure, work, None, SDPA)
        plans = [plan_svd(structure, work, budget * 2**30, SDPA) for budget in (2, 4, 8)]
        for budget, plan in zip((2, 4, 8), plans):
            assert plan.predicted_peak_bytes <= 0.9 * budget * 2**30
            assert plan.baseline_peak_bytes == baseline
            print(f"\n{frames} frames, {budget} GiB: {plan.text()}", end="")
        assert plans[0].predicted_peak_bytes <= plans[1].predicted_peak_bytes <= plans[2].predicted_peak_bytes
        with pytest.raises(BudgetError, match="minimum feasible budget"):
            plan_svd(structure, work, 2**20, SDPA)
