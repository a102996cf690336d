"""Memory Budget: the planner's predictions against measured peaks (CPU live-tensor counter), its choices,
its errors, the out-of-memory fallback, and what the patched model tells ComfyUI's memory management."""
from __future__ import annotations

import logging
import re

import pytest
import torch

from comfyui_streamline.core.budget import (
    ALLOCATOR_HEADROOM,
    SDPA,
    BudgetError,
    Workload,
    plan,
    predict_peak_bytes,
    sd15_shape,
)
from comfyui_streamline.core.slicing import SliceConfig

MEASURED_GRID = [  # (frames, latent side, chunks); CFG batched: batch = 2 x frames
    (8, 8, None), (8, 8, (2, 32)), (16, 8, None), (16, 8, (4, 64)),
    (8, 16, None), (8, 16, (3, 7)), (16, 16, None), (16, 16, (2, 32)), (16, 16, (8, 128)),
]


@pytest.mark.parametrize("frames, side", [(16, 64), (32, 96), (128, 64), (4, 8)])
def test_plans_never_exceed_the_budget_and_prefer_large_chunks(frames, side):
    shape, work = sd15_shape(), Workload(2 * frames, frames, side, side, dtype_bytes=2)
    baseline = predict_peak_bytes(shape, work, None, SDPA)
    previous = None
    for fraction in (1.5, 0.8, 0.5, 0.35):
        budget = int(baseline * fraction)
        try:
            chosen = plan(shape, work, budget, SDPA)
        except BudgetError:
            continue
        assert chosen.predicted_peak_bytes <= budget * ALLOCATOR_HEADROOM
        assert chosen.predicted_peak_bytes == predict_peak_bytes(shape, work, chosen.config, SDPA)
        if previous is not None:  # a smaller budget never gets coarser slices
            assert chosen.config.frame_chunk <= previous.config.frame_chunk
        previous = chosen
    roomy = plan(shape, work, baseline * 2, SDPA)
    assert roomy.config.frame_chunk == work.batch  # nothing to save: no slicing cost


# Peak activation of ComfyUI's own forward, SD1.5 + mm_sd_v15_v2 shapes, fp16, SDPA, CFG batched, measured on
# an H100 (max_memory_allocated; shared/measurements/2026-11-24-ade-baseline-h100.md): GiB per WxHxF.
H100_UNPATCHED_GIB = {(512, 512, 16): 2.03, (768, 768, 32): 9.14, (512, 512, 128): 16.25, (1024, 576, 32): 9.14}


@pytest.mark.parametrize("size", H100_UNPATCHED_GIB)
def test_sdpa_laws_predict_the_unpatched_forward_measured_on_a_gpu(size):
    """The laws were read off single layers on the CPU; these peaks were measured on a GPU."""
    width, height, frames = size
    work = Workload(2 * frames, frames, height // 8, width // 8, dtype_bytes=2)
    predicted = predict_peak_bytes(sd15_shape(), work, None, SDPA) / 2**30
    assert predicted == pytest.approx(H100_UNPATCHED_GIB[size], rel=0.10)


# Peak activation of the streamlined forward, same model and conditions, measured on an H100 with
# tools/bench.py (2026-11-25; docs/budget_calibration.md): GiB per (WxHxF, (frame_chunk, spatial_chunk)),
# (0, 0) = automatic.
H100_STREAMLINED_GIB = {
    ((512, 512, 16), (16, 4096)): 1.914,
    ((512, 512, 16), (8, 2048)): 1.172,
    ((512, 512, 16), (8, 1024)): 0.972,
    ((512, 512, 16), (4, 1024)): 0.801,
    ((512, 512, 16), (4, 512)): 0.652,
    ((512, 512, 16), (2, 512)): 0.610,
    ((512, 512, 16), (0, 0)): 1.172,
    ((768, 768, 32), (16, 4096)): 5.039,
    ((768, 768, 32), (8, 2048)): 3.465,
    ((768, 768, 32), (8, 1024)): 3.051,
    ((768, 768, 32), (4, 1024)): 2.644,
    ((768, 768, 32), (4, 512)): 2.348,
    ((768, 768, 32), (2, 512)): 2.237,
    ((768, 768, 32), (0, 0)): 2.819,
    ((512, 512, 128), (16, 4096)): 15.313,
    ((512, 512, 128), (8, 2048)): 9.376,
    ((512, 512, 128), (8, 1024)): 6.407,
    ((512, 512, 128), (4, 512)): 4.884,
    ((512, 512, 128), (2, 512)): 4.884,
    ((512, 512, 128), (0, 0)): 4.063,
}


@pytest.mark.parametrize("size, chunks", H100_STREAMLINED_GIB)
def test_sdpa_laws_predict_the_streamlined_forward_measured_on_a_gpu(size, chunks):
    width, height, frames = size
    work = Workload(2 * frames, frames, height // 8, width // 8, dtype_bytes=2)
    predicted = predict_peak_bytes(sd15_shape(), work, SliceConfig(*chunks), SDPA) / 2**30
    assert predicted == pytest.approx(H100_STREAMLINED_GIB[size, chunks], rel=0.10)


@pytest.mark.parametrize("size, budget_gib", [((768, 768, 32), 4.0), ((512, 512, 16), 0.9), ((512, 512, 16), 0.8)])
def test_budget_plans_are_ones_measured_to_fit(size, budget_gib):
    """The plan for a budget is one whose peak, measured on the GPU, stays under the allocator
    headroom of that budget (the issue's case: 768x768x32 within 4 GB)."""
    width, height, frames = size
    work = Workload(2 * frames, frames, height // 8, width // 8, dtype_bytes=2)
    chosen = plan(sd15_shape(), work, int(budget_gib * 2**30), SDPA)
    key = (size, (chosen.config.frame_chunk, chosen.config.spatial_chunk))
    assert key in H100_STREAMLINED_GIB, f"the plan {chosen.config} was not among the measured settings"
    assert H100_STREAMLINED_GIB[key] <= budget_gib * ALLOCATOR_HEADROOM


def test_impossible_budget_says_the_minimum():
    shape, work = sd15_shape(), Workload(32, 16, 64, 64, dtype_bytes=2)
    with pytest.raises(BudgetError, match=r"minimum feasible budget is (\d+\.\d+) GiB") as info:
        plan(shape, work, 10 * 2**20, SDPA)
    minimum = float(re.search(r"minimum feasible budget is (\d+\.\d+) GiB", str(info.value)).group(1))
    chosen = plan(shape, work, int((minimum + 0.01) * 2**30), SDPA)  # the stated minimum is feasible
    assert chosen.predicted_peak_bytes <= (minimum + 0.01) * 2**30


# The model's laws come from single layers (docs/budget_calibration.md); these whole forwards check them.
PREDICTION_TOLERANCE = 0.15


@pytest.mark.host
def test_predictions_match_measured_peaks():

    from comfyui_streamline.core.memtrace import LiveTensorMeter
    from comfyui_streamline.nodes.structure import unet_shape
    from comfyui_streamline.tools import synthetic

    unet, motion = synthetic.sd15_unet(), synthetic.sd15_motion_model()
    synthetic.inject(unet, motion)
    shape = unet_shape(unet)
    assert shape == sd15_shape()
    errors = []
    for frames, side, chunks in MEASURED_GRID:
        motion.set_video_length(frames, frames)
        batch = 2 * frames
        g = torch.Generator().manual_seed(0)
        x, c = torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 77, 768, generator=g)
        to = synthetic.ade_transformer_options(2)
        if chunks:
            synthetic.with_streamline(to, SliceConfig(*chunks))
        with torch.inference_mode(), LiveTensorMeter() as meter:
            unet(x, torch.full((batch,), 500.0), c, transformer_options=to)
        predicted = predict_peak_bytes(shape, Workload(batch, frames, side, side), SliceConfig(*chunks) if chunks else None)
        errors.append((frames, side, chunks, meter.peak_bytes, predicted, predicted / meter.peak_bytes - 1))
    table = "\n".join(f"{f}x{s}x{s} {c}: measured {m / 2**20:.1f} MiB, predicted {p / 2**20:.1f} MiB ({e:+.1%})"
                      for f, s, c, m, p, e in errors)
    print("\n" + table)
    assert all(abs(e) <= PREDICTION_TOLERANCE for *_, e in errors), table


@pytest.mark.host
@pytest.mark.parametrize("frames, chunks", [(8, None), (8, (1, 16)), (16, (6, 300))])
def test_predictions_hold_for_another_model_family(frames, chunks):
    """TinyVideo: other widths (32/64/128), 1-4 heads, 3 context tokens, three levels. The laws were
    read off SD1.5 layers only."""
    from comfyui_streamline.core.memtrace import LiveTensorMeter
    from comfyui_streamline.nodes.structure import unet_shape
    from comfyui_streamline.tinyvideo import model as tinyvideo
    from comfyui_streamline.tools.synthetic import with_streamline

    unet = tinyvideo.load_model_patcher().model.diffusion_model.float()
    tinyvideo.set_video_length(unet, frames)
    batch = 2 * frames
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(batch, 4, 32, 32, generator=g), torch.randn(batch, 3, tinyvideo.CONTEXT_DIM, generator=g)
    to = tinyvideo.motion_transformer_options(2)
    if chunks:
        with_streamline(to, SliceConfig(*chunks))
    with torch.inference_mode(), LiveTensorMeter() as meter:
        unet(x, torch.full((batch,), 500.0), c, transformer_options=to)
    predicted = predict_peak_bytes(unet_shape(unet), Workload(batch, frames, 32, 32, context_tokens=3),
                                   SliceConfig(*chunks) if chunks else None)
    assert abs(predicted / meter.peak_bytes - 1) <= PREDICTION_TOLERANCE, (predicted, meter.peak_bytes)


FRAMES, BATCH = 4, 8  # CFG batched


@pytest.fixture(scope="module")
def injected_unet():
    """A random-weight SD1.5 UNet with mm_sd_v15_v2 motion modules injected, set to FRAMES frames."""
    from comfyui_streamline.tools import synthetic

    unet, motion = synthetic.sd15_unet(), synthetic.sd15_motion_model()
    synthetic.inject(unet, motion)
    motion.set_video_length(FRAMES, FRAMES)
    return unet


@pytest.mark.host
def test_out_of_memory_retries_with_finer_slices_and_keeps_them(injected_unet, monkeypatch, caplog):
    from comfyui_streamline.nodes import streamlined_unet
    from comfyui_streamline.nodes.model_patch import StreamlineState
    from comfyui_streamline.tools import synthetic

    unet, batch = injected_unet, BATCH
    g = torch.Generator().manual_seed(0)
    x, c, t = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 77, 768, generator=g), torch.full((batch,), 500.0)
    real = streamlined_unet.run_frame_chunked
    seen = []

    def oom_above_two(group, total, chunk):  # a device that only fits chunks of <= 2 samples
        seen.append(chunk)
        if chunk > 2:
            raise torch.OutOfMemoryError("injected")
        return real(group, total, chunk)

    monkeypatch.setattr(streamlined_unet, "run_frame_chunked", oom_above_two)
    state = StreamlineState(SliceConfig(8, 64, scale_with_level=False))
    to = synthetic.with_streamline(synthetic.ade_transformer_options(2), state=state)
    with torch.inference_mode():
        ref = unet(x, t, c, transformer_options=synthetic.ade_transformer_options(2))
        with caplog.at_level(logging.WARNING, logger="ComfyUI-Streamline"):
            out = unet(x, t, c, transformer_options=to)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert state.config.frame_chunk == 2 and state.planner is None  # halved twice: 8 -> 4 -> 2
    assert sum("out of memory" in r.getMessage() for r in caplog.records) == 2
    seen.clear()
    with torch.inference_mode():
        unet(x, t, c, transformer_options=to)
    assert max(seen) <= 2  # the finer setting is kept


@pytest.mark.host
def test_out_of_memory_under_a_budget_refines_only_that_shape(injected_unet, monkeypatch):
    """With the Memory Budget, the finer slices after an out-of-memory retry are kept for that input
    shape; another shape (a second pass at another size) still gets its own plan."""
    from comfyui_streamline.nodes import streamlined_unet
    from comfyui_streamline.nodes.memory_budget import BudgetPlanner
    from comfyui_streamline.nodes.model_patch import StreamlineState
    from comfyui_streamline.tools import synthetic

    unet, batch = injected_unet, BATCH
    g = torch.Generator().manual_seed(0)
    c, t = torch.randn(batch, 77, 768, generator=g), torch.full((batch,), 500.0)
    small, large = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 16, 16, generator=g)
    real = streamlined_unet.run_frame_chunked
    fail = {"on": True}

    def oom_once(group, total, chunk):
        if fail["on"] and chunk > 1:
            fail["on"] = False
            raise torch.OutOfMemoryError("injected")
        return real(group, total, chunk)

    monkeypatch.setattr(streamlined_unet, "run_frame_chunked", oom_once)
    planner = BudgetPlanner(64 * 2**30)  # roomy: the plan is unsliced
    state = StreamlineState(SliceConfig(), planner=planner)
    to = synthetic.with_streamline(synthetic.ade_transformer_options(2), state=state)
    with torch.inference_mode():
        planned_large = state.config_for(unet, large, c)
        unet(small, t, c, transformer_options=to)
    settled_small = state.config_for(unet, small, c)
    assert state.planner is planner
    assert settled_small.frame_chunk < batch  # refined after the injected out-of-memory
    assert state.config_for(unet, large, c) == planned_large  # the other shape keeps its plan



@pytest.mark.host
def test_a_budget_leaves_step_rehash_its_cache(injected_unet):
    """Step Rehash keeps deep features alive between UNet calls: a planned budget is what is left after
    them, so the forward plus the cache fits (an "auto" budget reads free memory, which already counts them)."""
    from types import SimpleNamespace

    from comfyui_streamline.nodes.memory_budget import HELD_STEP, BudgetPlanner, attention_laws, workload_for
    from comfyui_streamline.nodes.model_patch import StreamlineState
    from comfyui_streamline.nodes.step_rehash import STATE_KEY as REHASH_STATE_KEY
    from comfyui_streamline.nodes.structure import unet_shape
    from comfyui_streamline.tools import synthetic

    unet, batch = injected_unet, BATCH
    g = torch.Generator().manual_seed(0)
    x, c, t = torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 77, 768, generator=g), torch.full((batch,), 500.0)
    shape, work, laws = unet_shape(unet), workload_for(x, c, FRAMES), attention_laws()
    unsliced = predict_peak_bytes(shape, work, None, laws)
    budget = int(unsliced / ALLOCATOR_HEADROOM) + HELD_STEP // 2  # unsliced fits, with room to spare
    held = HELD_STEP - 1  # more than the room to spare: the forward must be sliced finer
    planner = BudgetPlanner(budget)
    state = StreamlineState(SliceConfig(), planner=planner)
    assert state.config_for(unet, x, c) == plan(shape, work, budget, laws).config
    to = synthetic.with_streamline(synthetic.ade_transformer_options(2), state=state)
    to[REHASH_STATE_KEY] = SimpleNamespace(run=SimpleNamespace(held_bytes=lambda: held))  # a run's caches
    with torch.inference_mode():
        unet(x, t, c, transformer_options=to)
    expected = plan(shape, work, budget - HELD_STEP, laws)
    assert expected.config != plan(shape, work, budget, laws).config
    assert state.config_for(unet, x, c, held) == expected.config  # the plan the forward ran with
    assert {key[-1] for key in planner.plans} == {0, 1}  # one plan per held step, not per byte
    assert BudgetPlanner(0)._held_bucket(held) == 0  # "auto" sees held memory as already used

@pytest.mark.host
def test_patched_model_reports_its_need_to_comfyui():
    import comfy.model_management
    import comfy.sd

    from comfyui_streamline.nodes.memory_budget import MemoryBudget
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch
    from comfyui_streamline.tools.synthetic import sd15_unet

    model = comfy.sd.load_diffusion_model_state_dict(sd15_unet().state_dict())
    patched = StreamlineModelPatch.execute(model, frame_chunk=2, spatial_chunk=64).result[0]
    shape = [32, 4, 64, 64]
    default = model.model.memory_required(shape)
    comfy.model_management.load_models_gpu([patched])  # object patches take effect when the model loads
    try:
        reported = patched.model.memory_required(shape)
        expected = predict_peak_bytes(sd15_shape(), Workload(32, 16, 64, 64), SliceConfig(2, 64)) * 1.1
        assert reported == int(expected)
        assert reported < predict_peak_bytes(sd15_shape(), Workload(32, 16, 64, 64), None)
    finally:
        patched.unpatch_model()
    assert model.model.memory_required(shape) == default  # restored for other users of the same weights

    small = [32, 4, 16, 16]
    budgeted, text = MemoryBudget.execute(model, budget_gb=0.1, width=128, height=128, frames=16).result
    assert "predicted peak activation" in text and "budget 0.10 GiB" in text, text
    comfy.model_management.load_models_gpu([budgeted])
    try:
        assert budgeted.model.memory_required(small) <= 0.1 * 2**30 * 1.1
    finally:
        budgeted.unpatch_model()


@pytest.mark.host
def test_comfyui_plans_the_run_with_the_streamlined_estimate(monkeypatch):
    """The estimate ComfyUI takes before loading the model (sampler_helpers.estimate_memory) is the
    streamlined one, not its area-based default."""
    import comfy.model_management
    import comfy.sample
    import comfy.sampler_helpers
    import comfy.sd

    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch
    from comfyui_streamline.tools.synthetic import sd15_unet

    model = comfy.sd.load_diffusion_model_state_dict(sd15_unet().state_dict())
    patched = StreamlineModelPatch.execute(model, frame_chunk=2, spatial_chunk=64).result[0]
    estimates = []
    real_estimate = comfy.sampler_helpers.estimate_memory
    monkeypatch.setattr(comfy.sampler_helpers, "estimate_memory",
                        lambda *a, **k: estimates.append(real_estimate(*a, **k)) or estimates[-1])
    default = model.model.memory_required([16, 4, 8, 8])  # ComfyUI's own, before the patched model loads
    noise = torch.zeros(8, 4, 8, 8)
    positive = [[torch.zeros(1, 77, 768), {}]]
    with torch.inference_mode():
        comfy.sample.sample(patched, noise, 1, 5.0, "euler", "normal", positive, positive, noise, seed=0)
    expected = predict_peak_bytes(sd15_shape(motion_modules=True), Workload(16, 8, 8, 8), SliceConfig(2, 64)) * 1.1
    assert estimates and estimates[0][0] == int(expected)
    assert estimates[0][0] != default
    patched.unpatch_model()
