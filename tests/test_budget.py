"""Memory Budget: the planner's predictions against measured peaks (CPU live-tensor counter), its choices,
its errors, the out-of-memory fallback, and what the patched model tells ComfyUI's memory management."""
from __future__ import annotations

import functools
import logging
import os
import re

import pytest
import torch

from comfyui_streamline.core.budget import (
    ALLOCATOR_HEADROOM,
    SDPA,
    Workload,
    plan,
    predict_peak_bytes,
    sd15_shape,
)
from comfyui_streamline.core.plan_search import BudgetError
from comfyui_streamline.core.slicing import SliceConfig
from comfyui_streamline.testing.matrix import FULL_MATRIX, MECHANICS_WIDTH
from comfyui_streamline.testing.synthetic import SD15_WIDTH

# (frames, latent side, chunks, model_channels); CFG batched: batch = 2 x frames. SD1.5's layout a fifth as wide
# (testing/matrix.py): unsliced and sliced calls, frame and spatial slices, both latent sides and both frame counts;
# SD1.5's own width (the laws were read off its layers) at the cheapest sliced point in tests/test_sd15_real_width.py;
# test_predictions_hold_for_another_model_family checks the laws on TinyVideo's widths and heads too.
MEASURED_GRID = [(8, 8, None, MECHANICS_WIDTH), (16, 8, (4, 64), MECHANICS_WIDTH), (8, 16, None, MECHANICS_WIDTH),
                 (8, 16, (3, 7), MECHANICS_WIDTH)]
# the rest of the grid, all at SD1.5's width (batch 32 at 16x16: 5 minutes and 16 GB on a 2-core CPU)
FULL_GRID = [(8, 8, (2, 32)), (16, 8, None), (16, 16, None), (16, 16, (2, 32)), (16, 16, (8, 128))]
if FULL_MATRIX:
    MEASURED_GRID = [(f, s, c, SD15_WIDTH) for f, s, c, _ in MEASURED_GRID] + [p + (SD15_WIDTH,) for p in FULL_GRID]


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


UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


@pytest.mark.parametrize("work", [Workload(128, 64, 64, 64, dtype_bytes=2), Workload(32, 16, 16, 16, dtype_bytes=2)],
                         ids=["GiB", "MiB"])
def test_impossible_budget_says_the_minimum(work):
    """The smallest feasible budget, printed in the unit that shows it (MiB below 1 GiB, never "0.00 GiB")."""
    shape = sd15_shape()
    with pytest.raises(BudgetError, match=r"minimum feasible budget is \d+\.\d+ [KMG]iB") as info:
        plan(shape, work, 2**20, SDPA)
    assert "0.00 GiB" not in str(info.value)
    value, unit = re.search(r"minimum feasible budget is (\d+\.\d+) ([KMG]iB)", str(info.value)).groups()
    assert (unit == "GiB") == (work.height == 64), str(info.value)
    minimum = float(value) * UNITS[unit]
    margin = UNITS[unit] // (100 if unit == "GiB" else 10)  # one unit of the last printed decimal
    chosen = plan(shape, work, int(minimum + margin), SDPA)  # the stated minimum is feasible
    assert chosen.predicted_peak_bytes <= (minimum + margin)
    with pytest.raises(BudgetError):
        plan(shape, work, int(minimum - margin), SDPA)  # and it is the minimum


def test_sizes_print_in_gib_from_one_gib_and_in_mib_below():
    from comfyui_streamline.core.plan_search import format_bytes

    assert format_bytes(int(0.05 * 2**30)) == "51.2 MiB"
    assert format_bytes(2**30) == "1.00 GiB"
    assert format_bytes(3.5 * 2**30) == "3.50 GiB"
    assert format_bytes(1536) == "1.5 KiB"


def test_errors_have_a_readable_module_under_comfyuis_import():
    """ComfyUI imports a custom node pack under its folder path (nodes.load_custom_node); its error
    dialog prints the exception's module. The pack's own errors say "comfyui_streamline"."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    name = str(root).replace(".", "_x_")  # ComfyUI's sys.modules name for a custom node folder
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
        budget = importlib.import_module(f"{name}.core.plan_search")
        slicing = importlib.import_module(f"{name}.core.slicing")
        assert "/" in budget.__name__  # the module really is named after the path
        for error in (budget.BudgetError, slicing.SliceConfigError):
            assert error.__module__ == "comfyui_streamline" and "/" not in error.__module__
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    assert BudgetError.__module__ == "comfyui_streamline"


# The model's laws come from single layers (docs/budget_calibration.md); these whole forwards check them.
PREDICTION_TOLERANCE = 0.15


@pytest.mark.host
def test_predictions_match_measured_peaks():
    from comfyui_streamline.families.unet.structure import unet_shape
    from comfyui_streamline.testing.synthetic import sd15_video_call_peak_bytes

    errors = []
    for width in sorted({point[-1] for point in MEASURED_GRID}, reverse=True):  # one model at a time
        unet, motion = sd15_with_motion(width)
        shape = unet_shape(unet)
        try:
            for frames, side, chunks, _ in [p for p in MEASURED_GRID if p[-1] == width]:
                peak = sd15_video_call_peak_bytes(unet, motion, frames, side, chunks)
                predicted = predict_peak_bytes(shape, Workload(2 * frames, frames, side, side),
                                               SliceConfig(*chunks) if chunks else None)
                errors.append((width, frames, side, chunks, peak, predicted, predicted / peak - 1))
        finally:
            motion.set_video_length(FRAMES, FRAMES)  # as the module's fixture hands it to the other tests
        del unet, motion
        if width != MECHANICS_WIDTH:
            sd15_with_motion.cache_clear()  # 5 GB at SD1.5's width: not kept for the other tests
    table = "\n".join(f"width {w} {f}x{s}x{s} {c}: measured {m / 2**20:.1f} MiB, predicted {p / 2**20:.1f} MiB "
                      f"({e:+.1%})" for w, f, s, c, m, p, e in errors)
    print("\n" + table)
    assert all(abs(e) <= PREDICTION_TOLERANCE for *_, e in errors), table


@pytest.mark.host
@pytest.mark.parametrize("frames, chunks", [(8, None), (8, (1, 16)), (16, (6, 300))])
def test_predictions_hold_for_another_model_family(frames, chunks):
    """TinyVideo: other widths (32/64/128), 1-4 heads, 3 context tokens, three levels. The laws were
    read off SD1.5 layers only."""
    from comfyui_streamline.families.unet.structure import unet_shape
    from comfyui_streamline.tinyvideo import model as tinyvideo
    from comfyui_streamline.testing.synthetic import video_call_peak_bytes

    unet = tinyvideo.load_model_patcher().model.diffusion_model.float()
    tinyvideo.set_video_length(unet, frames)
    batch = 2 * frames
    measured = video_call_peak_bytes(unet, frames, 32, tinyvideo.motion_transformer_options(2), chunks,
                                     context=(3, tinyvideo.CONTEXT_DIM))
    predicted = predict_peak_bytes(unet_shape(unet), Workload(batch, frames, 32, 32, context_tokens=3),
                                   SliceConfig(*chunks) if chunks else None)
    assert abs(predicted / measured - 1) <= PREDICTION_TOLERANCE, (predicted, measured)


FRAMES, BATCH = 4, 8  # CFG batched


@functools.lru_cache(maxsize=1)
def sd15_with_motion(width: int = MECHANICS_WIDTH):
    """A random-weight SD1.5 UNet (model_channels `width`) with mm_sd_v15_v2 motion modules injected, and those
    modules: one copy for the whole file (cleared with the file; 5 GB in fp32 at SD1.5's width)."""
    from comfyui_streamline.testing import synthetic

    unet, motion = synthetic.sd15_unet(width=width), synthetic.sd15_motion_model(width=width)
    synthetic.inject(unet, motion)
    return unet, motion


@pytest.fixture(scope="module")
def injected_unet():
    """The SD1.5 UNet with motion modules, set to FRAMES frames."""
    unet, motion = sd15_with_motion()
    motion.set_video_length(FRAMES, FRAMES)
    return unet


@pytest.mark.host
def test_out_of_memory_retries_with_finer_slices_and_keeps_them(injected_unet, monkeypatch, caplog):
    from comfyui_streamline.families.unet import forward as streamlined_unet
    from comfyui_streamline.techniques.slicing import StreamlineState
    from comfyui_streamline.testing import synthetic

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
    from comfyui_streamline.families.unet import forward as streamlined_unet
    from comfyui_streamline.techniques.budget import BudgetPlanner
    from comfyui_streamline.techniques.slicing import StreamlineState
    from comfyui_streamline.testing import synthetic

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

    from comfyui_streamline.techniques.budget import BudgetPlanner, held_step
    from comfyui_streamline.host.attention import attention_laws
    from comfyui_streamline.families.unet.planning import workload_for
    from comfyui_streamline.techniques.slicing import StreamlineState
    from comfyui_streamline.host.options import REHASH_KEY as REHASH_STATE_KEY
    from comfyui_streamline.families.unet.structure import unet_shape
    from comfyui_streamline.testing import synthetic

    unet, batch = injected_unet, BATCH
    g = torch.Generator().manual_seed(0)
    x, c, t = torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 77, 768, generator=g), torch.full((batch,), 500.0)
    shape, work, laws = unet_shape(unet), workload_for(x, c, FRAMES), attention_laws()
    unsliced = predict_peak_bytes(shape, work, None, laws)
    budget = int(unsliced / ALLOCATOR_HEADROOM * 1.02)  # unsliced fits, with 2% to spare
    step = held_step(budget)
    assert step == budget // 16  # a small budget: held memory is counted in 1/16ths of it, not in 64 MiB
    held = step + 1  # more than the room to spare: the forward must be sliced finer
    planner = BudgetPlanner(budget)
    state = StreamlineState(SliceConfig(), planner=planner)
    assert state.config_for(unet, x, c) == plan(shape, work, budget, laws).config
    to = synthetic.with_streamline(synthetic.ade_transformer_options(2), state=state)
    to[REHASH_STATE_KEY] = SimpleNamespace(run=SimpleNamespace(held_bytes=lambda: held))  # a run's caches
    with torch.inference_mode():
        unet(x, t, c, transformer_options=to)
    expected = plan(shape, work, budget - 2 * step, laws)  # held, rounded up to a step
    assert expected.config != plan(shape, work, budget, laws).config
    assert state.config_for(unet, x, c, held) == expected.config  # the plan the forward ran with
    assert {key[-1] for key in planner.plans} == {budget, budget - 2 * step}  # one plan per held step, not per byte
    assert BudgetPlanner(0).budget(x.device, held)[1] == 0  # "auto" sees held memory as already used


@pytest.mark.host
def test_step_rehash_cache_fits_a_small_budget():
    """TinyVideo 16x32x32 with CFG under 0.05 GiB with Step Rehash: the cache (a few MiB) is budgeted in
    steps of a sixteenth of the budget, not in 64 MiB steps that left nothing for the forward after step 1."""
    from comfyui_streamline.techniques.budget import HELD_STEP, BudgetPlanner, held_step
    from comfyui_streamline.techniques.slicing import StreamlineState
    from comfyui_streamline.tinyvideo import model as tinyvideo

    unet = tinyvideo.load_model_patcher().model.diffusion_model.float()
    tinyvideo.set_video_length(unet, 16)
    x, c = torch.zeros(32, 4, 32, 32), torch.zeros(32, 3, tinyvideo.CONTEXT_DIM)
    budget = int(0.05 * 2**30)
    cache = 2 * 32 * 64 * 32 * 32 * 4  # extrapolated reuse: two deep features of the batch, 64 channels at 32x32
    assert held_step(budget) < cache < HELD_STEP
    state = StreamlineState(SliceConfig(), planner=BudgetPlanner(budget))
    before = state.config_for(unet, x, c, 0)
    during = state.config_for(unet, x, c, cache)  # raised "no slicing fits" with 64 MiB steps
    assert during.frame_chunk <= before.frame_chunk and during.spatial_chunk <= before.spatial_chunk


@pytest.mark.host
def test_patched_model_reports_its_need_to_comfyui():
    import comfy.model_management
    import comfy.sd

    from comfyui_streamline.families.unet.structure import unet_shape
    from comfyui_streamline.nodes.memory_budget import MemoryBudget
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch
    from comfyui_streamline.testing.synthetic import load_sd15

    model = load_sd15(MECHANICS_WIDTH)
    patched = StreamlineModelPatch.execute(model, frame_chunk=2, spatial_chunk=64).result[0]
    shape = [32, 4, 64, 64]
    default = model.model.memory_required(shape)
    comfy.model_management.load_models_gpu([patched])  # object patches take effect when the model loads
    try:
        reported = patched.model.memory_required(shape)
        image_unet = unet_shape(model.model.diffusion_model)  # no AnimateDiff motion models on this MODEL
        assert all(layer.kind != "motion" for block in image_unet.input_blocks for layer in block.layers)
        expected = predict_peak_bytes(image_unet, Workload(32, 16, 64, 64), SliceConfig(2, 64)) * 1.1
        assert reported == int(expected)
        assert reported < predict_peak_bytes(image_unet, Workload(32, 16, 64, 64), None)
    finally:
        patched.unpatch_model()
    assert model.model.memory_required(shape) == default  # restored for other users of the same weights

    small = [32, 4, 16, 16]
    budgeted, text = MemoryBudget.execute(model, budget_gb=0.1, width=128, height=128, frames=16).result
    assert "predicted peak activation" in text and "budget 102.4 MiB" in text, text
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

    from comfyui_streamline.families.unet.structure import unet_shape
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch
    from comfyui_streamline.testing.synthetic import load_sd15

    model = load_sd15(MECHANICS_WIDTH)
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
    expected = predict_peak_bytes(unet_shape(model.model.diffusion_model), Workload(16, 8, 8, 8), SliceConfig(2, 64)) * 1.1
    assert estimates and estimates[0][0] == int(expected)
    assert estimates[0][0] != default
    patched.unpatch_model()


# -- per-run state: what a run learns lasts that run ------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_image():
    """A tiny SD1.5 image model (testing/model_families.py) through ComfyUI's loader, with its conditioning."""
    from comfyui_streamline.testing.model_families import FAMILIES, load

    family = FAMILIES["SD15"]
    return load(family), family


@pytest.fixture
def forward_configs(monkeypatch):
    """The SliceConfig of every streamlined UNet forward, in order."""
    from comfyui_streamline.families.unet import forward as streamlined_unet

    seen: list[SliceConfig] = []
    real = streamlined_unet.streamlined_unet_forward

    def spy(unet, config, log, *args, **kwargs):
        seen.append(config)
        return real(unet, config, log, *args, **kwargs)

    monkeypatch.setattr(streamlined_unet, "streamlined_unet_forward", spy)
    return seen


def ksampler(model, family, steps: int = 2) -> torch.Tensor:
    import nodes

    positive, negative = family.conds()
    with torch.inference_mode():
        return nodes.common_ksampler(model, 3, steps, family.cfg, "euler", "normal", positive, negative,
                                     family.latent())[0]["samples"]


@pytest.mark.host
def test_an_out_of_memory_retry_lasts_its_run(sd15_image, forward_configs, monkeypatch, caplog):
    """The finer slices an out-of-memory retry settles on are the run's: the next run starts from the
    node's setting again, and the patched model's state after a run is the state before it."""
    import copy

    from comfyui_streamline.families.unet import forward as streamlined_unet
    from comfyui_streamline.host.options import STREAMLINE_KEY as STATE_KEY
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    model, family = sd15_image
    patched = StreamlineModelPatch.execute(model, frame_chunk=4, spatial_chunk=0).result[0]
    state = patched.model_options["transformer_options"][STATE_KEY]
    before = copy.deepcopy(state)
    real = streamlined_unet.run_frame_chunked
    failures = {"left": 1}

    def oom_once(group, total, chunk):
        if failures["left"] and chunk > 2:
            failures["left"] -= 1
            raise torch.OutOfMemoryError("injected")
        return real(group, total, chunk)

    monkeypatch.setattr(streamlined_unet, "run_frame_chunked", oom_once)
    with caplog.at_level(logging.WARNING, logger="ComfyUI-Streamline"):
        first = ksampler(patched, family)
    finer = SliceConfig(frame_chunk=2, spatial_chunk=forward_configs[1].spatial_chunk)
    assert forward_configs[:3] == [SliceConfig(4, 0), finer, finer]  # retried finer, kept for the run's 2nd step
    assert sum("out of memory" in r.getMessage() for r in caplog.records) == 1
    assert patched.model_options["transformer_options"][STATE_KEY] is state and state == before

    forward_configs.clear()
    second = ksampler(patched, family)
    assert forward_configs == [SliceConfig(4, 0)] * 2  # the node's setting again
    assert state == before
    assert ((second - first).abs().max() / first.abs().max()).item() <= 1e-5


@pytest.mark.host
def test_auto_plans_are_made_per_run_and_per_free_memory(sd15_image, forward_configs, monkeypatch):
    """An "auto" budget plans with the memory free when the forward runs: each run plans anew, a run
    whose free memory moves to another step replans, and nothing stays on the model."""
    from comfyui_streamline.techniques import budget as memory_budget
    from comfyui_streamline.techniques.budget import BudgetPlanner, free_step
    from comfyui_streamline.host.attention import attention_laws
    from comfyui_streamline.nodes.memory_budget import MemoryBudget
    from comfyui_streamline.host.options import STREAMLINE_KEY as STATE_KEY
    from comfyui_streamline.techniques.slicing import StreamlineState
    from comfyui_streamline.families.unet.structure import unet_shape
    from comfyui_streamline.testing.model_families import TOKENS

    model, family = sd15_image
    batch = 2 * family.latent_shape[0]
    work = Workload(batch, batch // 2, *family.latent_shape[-2:], context_tokens=TOKENS)
    shape, laws = unet_shape(model.model.diffusion_model), attention_laws()
    unsliced = predict_peak_bytes(shape, work, None, laws)
    roomy, tight = int(unsliced / ALLOCATOR_HEADROOM * 1.5), int(unsliced / ALLOCATOR_HEADROOM * 0.6)
    free = {"first": roomy, "later": roomy}  # free memory before a run's first forward, and after it
    monkeypatch.setattr(memory_budget, "free_activation_bytes",
                        lambda device, patcher=None: free["later" if forward_configs else "first"])
    runs: list[StreamlineState] = []
    for_run = StreamlineState.for_run
    monkeypatch.setattr(StreamlineState, "for_run", lambda self, patcher=None: runs.append(for_run(self, patcher)) or runs[-1])
    patched = MemoryBudget.execute(model, budget_gb=0.0, width=64, height=64, frames=family.latent_shape[0]).result[0]
    planner = patched.model_options["transformer_options"][STATE_KEY].planner

    def planned(free_bytes: int) -> SliceConfig:
        return plan(shape, work, free_step(free_bytes), laws).config

    assert planned(roomy) != planned(tight)
    ksampler(patched, family)
    assert forward_configs == [planned(roomy)] * 2
    free.update(first=tight, later=tight)
    forward_configs.clear()
    ksampler(patched, family)
    assert forward_configs == [planned(tight)] * 2  # not the first run's plan
    free.update(first=roomy, later=tight)  # free memory drops after the first forward of the run
    forward_configs.clear()
    ksampler(patched, family)
    assert forward_configs == [planned(roomy), planned(tight)]
    assert len(runs) == 3 and len({id(run.planner) for run in runs}) == 3 and len(runs[-1].planner.plans) == 2
    assert planner == BudgetPlanner(0)  # the model's planner holds no plan


# -- the plan the node shows is the plan the run uses --------------------------------------------------------


class PlanSeen(Exception):
    """Raised instead of the first streamlined forward: the run has planned, nothing left to learn."""


def first_forward_config(model, positive, negative, latent, monkeypatch) -> SliceConfig:
    """The config the run's first UNet forward is given, through KSampler's real path (ADE included)."""
    import nodes

    from comfyui_streamline.families.unet import forward as streamlined_unet

    seen = []

    def stop(unet, config, log, *args, **kwargs):
        seen.append(config)
        raise PlanSeen

    with monkeypatch.context() as m:
        m.setattr(streamlined_unet, "streamlined_unet_forward", stop)
        with torch.inference_mode(), pytest.raises(PlanSeen):
            nodes.common_ksampler(model, 0, 1, 5.0, "euler", "normal", positive, negative, latent)
    return seen[0]


def shown_config(text: str) -> SliceConfig:
    frame_chunk, spatial_chunk = re.search(r"frame_chunk (\d+), spatial_chunk (\d+)", text).groups()
    return SliceConfig(int(frame_chunk), int(spatial_chunk))


CONTEXT_LENGTH = 4


@pytest.fixture(scope="module")
def ade_model(tmp_path_factory):
    """SD1.5 + mm_sd_v15_v2 (random weights) as AnimateDiff-Evolved's nodes output it, with context
    windows of 4 frames (a clip of up to 4 frames runs whole)."""
    from comfyui_streamline.testing.synthetic import ade_model_patcher

    return ade_model_patcher(tmp_path_factory.mktemp("animatediff_models"), context_length=CONTEXT_LENGTH,
                             context_overlap=2, width=MECHANICS_WIDTH)


# SD1.5's activations at 64x64 x 4 frames are ~16 MiB: the budgets below straddle its plans; at a narrower width
# they scale with it (the same plans are exercised)
SCALE = MECHANICS_WIDTH / SD15_WIDTH


@pytest.mark.host
@pytest.mark.parametrize("frames, budget_gib", [(4, 0.0), (4, 0.011), (4, 0.014), (4, 0.02), (6, 0.0), (6, 0.011)])
def test_the_node_shows_the_plan_the_run_uses_with_animatediff(ade_model, monkeypatch, frames, budget_gib):
    """Before sampling, ADE's motion modules are not in the UNet yet: the node describes them where ADE
    will inject them, and a clip longer than ADE's context windows runs window by window, so its plan for
    64x64 x frames is the one the run makes for that latent."""
    from comfyui_streamline.nodes import memory_budget
    from comfyui_streamline.techniques import budget as budget_technique
    from comfyui_streamline.testing.synthetic import random_conds

    monkeypatch.setattr(budget_technique, "free_activation_bytes",
                        lambda device, patcher=None: int(0.012 * SCALE * 2**30))  # "auto"
    patched, text = memory_budget.MemoryBudget.execute(ade_model, budget_gb=budget_gib * SCALE, width=64, height=64,
                                                       frames=frames).result
    assert ("context windows of 4 frames" in text) == (frames > CONTEXT_LENGTH), text
    positive, negative = random_conds()
    used = first_forward_config(patched, positive, negative, {"samples": torch.zeros(frames, 4, 8, 8)}, monkeypatch)
    print(f"\n[{frames} frames, {budget_gib * SCALE:.4f} GiB] {text}")
    assert shown_config(text) == used, text


@pytest.mark.host
@pytest.mark.parametrize("budget_gib", [0.025, 0.035])
def test_the_node_shows_the_plan_the_run_uses_with_tinyvideo(monkeypatch, budget_gib):
    """TinyVideo's prompts are 3 tokens, not CLIP's 77: at these budgets a plan for 77 tokens slices
    differently (before the node read the prompt length it showed frame_chunk 4 at 0.025 GiB and 8 at
    0.035 GiB; the run used 2 and 4)."""
    from comfyui_streamline.nodes.memory_budget import MemoryBudget
    from comfyui_streamline.nodes.tinyvideo import TinyVideoPrompt
    from comfyui_streamline.tinyvideo import model as tinyvideo

    model = tinyvideo.load_model_patcher()
    patched, text = MemoryBudget.execute(model, budget_gb=budget_gib, width=256, height=256, frames=16).result
    positive = TinyVideoPrompt.execute(model, "red circle bounce").result[0]
    negative = TinyVideoPrompt.execute(model, "").result[0]
    used = first_forward_config(patched, positive, negative, {"samples": torch.zeros(16, 4, 32, 32)}, monkeypatch)
    assert shown_config(text) == used, text
