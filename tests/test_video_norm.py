"""AnimateDiff-Evolved's GroupNorm-over-videos mode (v1 motion models, PIA, v2 without
apply_v2_models_properly): exact and still sliced.

The reference is ADE's own: its DIFFUSION_MODEL wrapper swaps torch's GroupNorm.forward for its
whole-video one during the UNet call (testing/synthetic.ade_video_norm_options). CPU, fp32; exact means
max|patched - plain| <= 1e-5 * max|plain|. Whole sampling through ADE's loaders and nodes is in
tests/test_motion_families.py.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch
from einops import rearrange

from comfyui_streamline.core.groupnorm import channel_moments, group_norm_apply, group_norm_stats, video_group_stats


def whole_video_group_norm(x, groups, frames, weight=None, bias=None, eps=1e-5):
    """What ADE's swapped GroupNorm computes."""
    videos = x.shape[0] // frames
    y = torch.nn.functional.group_norm(rearrange(x, "(b f) c h w -> b c f h w", b=videos), groups, weight, bias, eps)
    return rearrange(y, "b c f h w -> (b f) c h w", b=videos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_whole_video_statistics_from_slices_and_parts(dtype):
    """Statistics gathered per sample and channel, over a concatenation's parts apart (groups that
    straddle them: 96 + 64 channels in 32 groups of 5), give ADE's whole-video GroupNorm."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(12, 96, 5, 7, generator=g) * 3 + 1).to(dtype)
    skip = (torch.randn(12, 64, 5, 7, generator=g) - 2).to(dtype)
    weight, bias = torch.randn(160, generator=g), torch.randn(160, generator=g)
    frames = 4
    ref = whole_video_group_norm(torch.cat([h, skip], 1).float(), 32, frames, weight, bias).to(dtype)
    moments = [channel_moments(part) for part in (h, skip)]
    mean, rstd = video_group_stats(torch.cat([m for m, _ in moments], 1), torch.cat([m for _, m in moments], 1),
                                   35, 32, 1e-5, frames)
    for start, end in ((0, 3), (3, 9), (9, 12)):  # slices that split videos
        part = group_norm_apply(torch.cat([h, skip], 1)[start:end], mean[start:end], rstd[start:end], weight, bias, 32)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert (part.float() - ref[start:end].float()).abs().max() <= tol * ref.float().abs().max()
    # one frame per video is torch's own GroupNorm
    mean1, rstd1 = group_norm_stats(h.float(), 32, 1e-5, video_frames=1)
    video1 = group_norm_stats(h.float(), 32, 1e-5, video_frames=frames)
    assert torch.allclose(group_norm_apply(h.float(), mean1, rstd1, None, None, 32),
                          torch.nn.functional.group_norm(h.float(), 32), atol=1e-5)
    assert torch.allclose(group_norm_apply(h.float(), *video1, None, None, 32),
                          whole_video_group_norm(h.float(), 32, frames), atol=1e-5)


# -- the UNet forward -----------------------------------------------------------------------------------

FRAMES, SIZE = 4, 8


@pytest.fixture(scope="module")
def host():
    """SD1.5 + mm_sd_v15_v2's layout (testing/matrix.py: narrow by default, SD1.5's width in the full matrix)."""
    from comfyui_streamline.testing import synthetic
    from comfyui_streamline.testing.matrix import MECHANICS_WIDTH

    return synthetic.sd15_with_motion(width=MECHANICS_WIDTH, frames=FRAMES), synthetic


def call(unet, synthetic, conds, config=None, seed=0):
    batch = conds * FRAMES
    g = torch.Generator().manual_seed(seed)
    x, context = torch.randn(batch, 4, SIZE, SIZE, generator=g), torch.randn(batch, 77, 768, generator=g)
    to = synthetic.ade_video_norm_options(synthetic.ade_transformer_options(conds), FRAMES)
    if config is not None:
        synthetic.with_streamline(to, config)
    with torch.inference_mode():
        return unet(x, torch.full((batch,), 500.0), context, transformer_options=to)


@pytest.mark.host
def test_ade_video_norm_really_differs_from_per_frame(host):
    """The reference is not the per-frame model: the mode changes the output, so a sliced forward that
    ignored it would fail the exactness tests below."""
    unet, synthetic = host
    batch = 2 * FRAMES
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(batch, 4, SIZE, SIZE, generator=g), torch.randn(batch, 77, 768, generator=g)
    with torch.inference_mode():
        per_frame = unet(x, torch.full((batch,), 500.0), context, transformer_options=synthetic.ade_transformer_options(2))
    video = call(unet, synthetic, 2)
    assert ((video - per_frame).abs().max() / per_frame.abs().max()).item() > 1e-2


@pytest.mark.host
@pytest.mark.parametrize("chunks", [(3, 7), (1, 5), (2, 24), (3, 40)], ids=lambda c: f"f{c[0]}-s{c[1]}")
@pytest.mark.parametrize("conds", [2, 1], ids=["cfg-batched", "single-cond"])
def test_sliced_forward_is_exact_under_whole_video_groupnorm(host, chunks, conds, caplog, monkeypatch):
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.unet import motion_module, forward as streamlined_unet

    unet, synthetic = host
    sliced = {"frames": 0, "positions": 0, "video_frames": set()}
    real_group, real_motion = streamlined_unet.run_frame_chunked, motion_module.temporal_transformer_sliced

    def group(fn, batch, chunk):
        sliced["frames"] += chunk < batch
        return real_group(fn, batch, chunk)

    def motion(x, parts, chunk, **kwargs):
        sliced["positions"] += chunk < x.shape[-1] * x.shape[-2]
        sliced["video_frames"].add(kwargs.get("video_frames"))
        return real_motion(x, parts, chunk, **kwargs)

    monkeypatch.setattr(streamlined_unet, "run_frame_chunked", group)
    monkeypatch.setattr(motion_module, "temporal_transformer_sliced", motion)
    ref = call(unet, synthetic, conds)
    with caplog.at_level(logging.INFO, logger="ComfyUI-Streamline"):
        out = call(unet, synthetic, conds, SliceConfig(*chunks, scale_with_level=False))
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, f"relative max diff {err:.3e}"
    assert sliced["frames"] > 0 and sliced["positions"] > 0 and sliced["video_frames"] == {FRAMES}
    messages = [r.getMessage() for r in caplog.records if r.name == "ComfyUI-Streamline"]
    assert sum("over whole videos" in m for m in messages) == 1, messages
    assert not [r for r in caplog.records if r.name == "ComfyUI-Streamline" and r.levelno >= logging.WARNING]


@pytest.mark.host
def test_a_batch_that_is_not_whole_videos_runs_unsliced_with_one_line(host, caplog):
    """ADE's own GroupNorm decides what such a batch means; the pack runs every group whole under it."""
    from comfyui_streamline.core.slicing import SliceConfig

    unet, synthetic = host
    batch = 2 * FRAMES
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(batch, 4, SIZE, SIZE, generator=g), torch.randn(batch, 77, 768, generator=g)

    def options():
        to = synthetic.ade_video_norm_options(synthetic.ade_transformer_options(2), FRAMES)
        to["ad_params"]["full_length"] = 3  # 8 samples are no whole number of 3-frame videos
        return to

    with torch.inference_mode():
        try:
            ref = unet(x, torch.full((batch,), 500.0), context, transformer_options=options())
        except Exception as e:  # ADE's own GroupNorm refuses it: so must the pack, the same way
            ref = e
        with caplog.at_level(logging.WARNING, logger="ComfyUI-Streamline"):
            to = synthetic.with_streamline(options(), SliceConfig(1, 5, scale_with_level=False))
            try:
                out = unet(x, torch.full((batch,), 500.0), context, transformer_options=to)
            except Exception as e:
                out = e
    if isinstance(ref, Exception):
        assert type(out) is type(ref)
    else:
        assert torch.equal(out, ref)
    assert sum("runs unsliced" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.host
def test_mirrored_layer_forwards_equal_comfyuis_with_per_frame_statistics(host):
    """families/unet/video_norm.py mirrors ResBlock._forward and SpatialTransformer.forward with the GroupNorm
    call replaced; with one frame per video they must be ComfyUI's own layers."""
    from comfyui_streamline.families.unet import video_norm
    from comfyui_streamline.families.unet_common.layer_roles import Role

    unet, _ = host
    res = unet.output_blocks[3][0]  # a ResBlock with a skip convolution (SD1.5: 1920 -> 1280 channels)
    attn = unet.input_blocks[1][1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, res.channels, 4, 4, generator=g)
    emb = torch.randn(3, unet.model_channels * 4, generator=g)
    with torch.inference_mode():
        in_stats = video_norm.input_stats([x], res.in_layers[0], 1, None)
        out_stats = video_norm.resblock_out_stats(res, lambda s, e: x[s:e], emb, in_stats, 3, 2, 1)
        mirrored = video_norm.resblock_forward(res, x, emb, in_stats, out_stats)
        assert torch.allclose(mirrored, res(x, emb), rtol=0, atol=1e-5 * res(x, emb).abs().max())
        y = torch.randn(3, unet.model_channels, 4, 4, generator=g)
        context = torch.randn(3, 77, 768, generator=g)
        stats = video_norm.input_stats([y], attn.norm, 1, None)
        host_out = attn(y, context, {})
        mine = video_norm.spatial_transformer_forward(attn, y, context, {}, stats)
        assert torch.allclose(mine, host_out, rtol=0, atol=1e-5 * host_out.abs().max())
    assert video_norm.supports(res, Role.RES_BLOCK) and video_norm.supports(attn, Role.SPATIAL_TRANSFORMER)


@pytest.mark.host
@pytest.mark.parametrize("frames, side, chunks", [(4, 8, (2, 16)), (8, 16, (3, 7)), (8, 16, None)])
def test_memory_predictions_hold_in_the_whole_video_mode(host, frames, side, chunks):
    from comfyui_streamline.core.budget import Workload, predict_peak_bytes
    from comfyui_streamline.core.memtrace import LiveTensorMeter
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.unet.structure import unet_shape

    unet, synthetic = host
    set_video_length(unet, frames)
    batch = 2 * frames
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 77, 768, generator=g)
    config = SliceConfig(*chunks, scale_with_level=False) if chunks else None
    to = synthetic.ade_video_norm_options(synthetic.ade_transformer_options(2), frames)
    if config:
        synthetic.with_streamline(to, config)
    try:
        with torch.inference_mode(), LiveTensorMeter() as meter:
            unet(x, torch.full((batch,), 500.0), c, transformer_options=to)
    finally:
        set_video_length(unet, FRAMES)  # as the module's fixture hands it to the other tests
    predicted = predict_peak_bytes(unet_shape(unet), Workload(batch, frames, side, side, video_norm=True), config)
    assert abs(predicted / meter.peak_bytes - 1) <= 0.15, (predicted, meter.peak_bytes)


def set_video_length(unet, frames: int) -> None:
    """Set the injected motion modules of `unet` to `frames` per video (as ADE does per run)."""
    for module in unet.modules():
        if type(module).__name__ == "VanillaTemporalModule":
            module.set_video_length(frames, frames)


def float64_unet(model: str):
    """(UNet with ADE's motion modules injected in float64, its transformer_options, context (tokens, dim)).
    TinyVideo: ADE's VanillaTemporalModule in SD1.5's layout at 32/64/128 channels (a copy; seconds);
    SD1.5 + mm_sd_v15_v2 at full width: 10 GB of float64 weights (STREAMLINE_FULL_MATRIX=1)."""
    import copy

    from comfyui_streamline.testing import synthetic

    if model == "tinyvideo":
        from comfyui_streamline.tinyvideo import model as tinyvideo

        unet = copy.deepcopy(tinyvideo.load_model_patcher().model.diffusion_model).double()
        tinyvideo.set_video_length(unet, FRAMES)
        return unet, lambda: tinyvideo.motion_transformer_options(2), (3, tinyvideo.CONTEXT_DIM)
    unet, motion = synthetic.sd15_unet(seed=0), synthetic.sd15_motion_model(seed=1)
    synthetic.inject(unet, motion)
    motion.set_video_length(FRAMES, FRAMES)
    return unet.double(), lambda: synthetic.ade_transformer_options(2), (77, 768)


@pytest.mark.parametrize("model", ["tinyvideo", pytest.param("sd15", marks=pytest.mark.skipif(
    not os.environ.get("STREAMLINE_FULL_MATRIX"), reason="TinyVideo checks the same; all: STREAMLINE_FULL_MATRIX=1"))])
def test_in_float64_slicing_changes_nothing_but_rounding(model):
    """Where the fp32 differences come from: in float64 the sliced forward equals ComfyUI's (and ADE's
    whole-video mode) to float64 rounding, for slicings that split samples, videos and positions. The
    1e-6-level fp32 differences of the other tests are float32 reductions run in another order (kernels
    pick their blocking by batch size; attention chunks by memory), which the random UNet spreads to
    every output and CFG sampling amplifies; no term of the math differs."""
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.testing import synthetic

    unet, ade_options, (tokens, width) = float64_unet(model)
    batch = 2 * FRAMES
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, SIZE, SIZE, generator=g, dtype=torch.float64)
    context = torch.randn(batch, tokens, width, generator=g, dtype=torch.float64)
    t = torch.full((batch,), 500.0, dtype=torch.float64)
    refs = []
    for options in (ade_options, lambda: synthetic.ade_video_norm_options(ade_options(), FRAMES)):
        with torch.inference_mode():
            ref = unet(x, t, context, transformer_options=options())
            out = unet(x, t, context, transformer_options=synthetic.with_streamline(options(), SliceConfig(3, 7, False)))
        assert out.dtype == torch.float64
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-12, f"relative max diff {err:.3e}"
        refs.append(ref)
    assert (refs[0] - refs[1]).abs().max() > 1e-3 * refs[0].abs().max()  # the whole-video mode really ran
