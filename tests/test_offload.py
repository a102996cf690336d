"""Skip offload and feature offload (core/offload.py): bit-identical to the same slicing without it, in every
composition the pack supports; the skips and the features between blocks really leave the device count
(the CPU path: real copies into storages the live-tensor counter counts as host memory, the device
tensors released); the planner's predictions with offload against the counter; when the Memory Budget
chooses offload; what the node and the report say.

CPU, fp32: random SD1.5 + mm_sd_v15_v2 at an 8x8 latent for single forwards (SD1.5's layout at a fifth of its width,
testing/matrix.py; its real width with STREAMLINE_FULL_MATRIX=1), the same through ADE's loaders for ADE sampling, TinyVideo
through ComfyUI's KSampler path with ComfyUI's real FreeU, Context Windows (Manual) and Step Rehash.
"""
from __future__ import annotations

import logging
import weakref

import pytest
import torch

from comfyui_streamline.core.budget import (
    ALLOCATOR_HEADROOM, SDPA, Workload, chunk_count, offload_cost_chunks, offload_traffic, plan,
    predict_peak_bytes, sd15_shape,
)
from comfyui_streamline.core.slicing import SliceConfig
from test_sampling_exact import (  # noqa: F401  (fixtures)
    CTX_FRAMES, NEGATIVE, POSITIVE, ade_context_model, ade_nodes, base_model, motion_model,
)
from test_sampling_exact import sample as ade_sample

FRAMES, CONDS, SIZE = 4, 2, 8
STREAMLINE_LOGGER = "ComfyUI-Streamline"


def offloaded(config: SliceConfig, features: bool = False) -> SliceConfig:
    from dataclasses import replace

    return replace(config, offload_skips=True, offload_features=features)


# skip offload alone, and with feature offload
KINDS = pytest.mark.parametrize("features", [False, True], ids=["skips", "features"])


def features_moved(moved: dict, features: bool) -> bool:
    """Whether the features moved too: skips then come back twice (for the next block and the output block)."""
    return moved["back"] > moved["out"] if features else moved["back"] == moved["out"]


@pytest.fixture(scope="module")
def sd15():
    """SD1.5 + mm_sd_v15_v2's layout (testing/matrix.py: narrow by default, SD1.5's width in the full matrix)."""
    from comfyui_streamline.testing import synthetic
    from comfyui_streamline.testing.matrix import MECHANICS_WIDTH

    return synthetic.sd15_with_motion(width=MECHANICS_WIDTH, frames=FRAMES), synthetic


def inputs(batch: int, size: int = SIZE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, 77, 768, generator=g))


def forward(sd15, config, conds=CONDS, control=None, patches=None, meter=False):
    """One UNet forward through the pack's wrapper; with meter, also the live-tensor counter."""
    from comfyui_streamline.core.memtrace import LiveTensorMeter

    unet, synthetic = sd15
    x, t, c = inputs(FRAMES * conds)
    to = synthetic.ade_transformer_options(conds)
    to["patches"].update(patches or {})
    synthetic.with_streamline(to, config)
    with torch.inference_mode(), LiveTensorMeter() as counter:
        out = unet(x, t, c, control=control, transformer_options=to)
    return (out, counter) if meter else out


@pytest.fixture(scope="module")
def reference():
    """reference(key, compute): a case's result without offload, computed once for both kinds (skips alone, and
    with features) and for every case that computes the same (`key` names what `compute` does): offload must give
    it bit for bit."""
    cache = {}

    def get(key, compute):
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    yield get
    cache.clear()


@pytest.fixture
def moved(monkeypatch):
    """Bytes every Transfers object moved (proof that offload ran)."""
    from comfyui_streamline.core import offload

    total = {"out": 0, "back": 0}
    to_host, to_device = offload.Transfers.to_host, offload.Transfers.to_device

    def out(self, t):
        total["out"] += t.numel() * t.element_size()
        return to_host(self, t)

    def back(self, host):
        total["back"] += host.numel() * host.element_size()
        return to_device(self, host)

    monkeypatch.setattr(offload.Transfers, "to_host", out)
    monkeypatch.setattr(offload.Transfers, "to_device", back)
    return total


# -- bit-identical ------------------------------------------------------------------------------------------


@pytest.mark.host
@KINDS
@pytest.mark.parametrize("config, conds", [(SliceConfig(3, 7, False), 2), (SliceConfig(1, 5, True), 1),
                                           (SliceConfig(), 2)], ids=["f3-s7-cfg", "f1-s5-cond", "auto-cfg"])
def test_offload_is_bit_identical_to_no_offload(sd15, reference, moved, config, conds, features):
    from comfyui_streamline.families.unet.structure import unet_shape

    ref = reference(("forward", repr(config), conds), lambda: forward(sd15, config, conds))
    out = forward(sd15, offloaded(config, features), conds)
    assert torch.equal(out, ref)
    # every skip but the deepest went out and came back (with features: once more, and the block outputs)
    traffic = offload_traffic(unet_shape(sd15[0]), Workload(FRAMES * conds, FRAMES, SIZE, SIZE), features)
    assert moved["out"] > 0 and moved["out"] + moved["back"] == traffic.moved_bytes
    assert features_moved(moved, features)


def control_residuals(sd15, conds=CONDS, seed=3):
    """ControlNet-shaped residuals (one per input block and the middle), as ComfyUI's ControlNet returns them."""
    unet, synthetic = sd15
    shapes = []
    x, t, c = inputs(FRAMES * conds)
    to = synthetic.ade_transformer_options(conds)
    to["patches"]["input_block_patch"] = [lambda h, to: shapes.append(h.shape) or h]
    with torch.inference_mode():
        unet(x, t, c, transformer_options=to)
    g = torch.Generator().manual_seed(seed)
    res = [0.2 * torch.randn(s, generator=g) for s in shapes + shapes[-1:]]
    ins, middle = res[:-1], res[-1]
    return lambda: {"input": list(reversed(ins)), "middle": [middle], "output": list(ins)}


@pytest.mark.host
@KINDS
def test_controlnet_residuals(sd15, reference, moved, features):
    """Residuals are added to whole skips (brought back one block ahead); the features still stream."""
    make_control = reference(("control residuals",), lambda: control_residuals(sd15))
    config = SliceConfig(3, 7, False)
    plain = reference(("forward", repr(config), CONDS), lambda: forward(sd15, config))
    ref = reference(("forward with control", repr(config)), lambda: forward(sd15, config, control=make_control()))
    out = forward(sd15, offloaded(config, features), control=make_control())
    assert not torch.equal(ref, plain)  # the residuals matter
    assert torch.equal(out, ref) and moved["out"] > 0 and features_moved(moved, features)


@pytest.mark.host
@KINDS
def test_output_block_patches(sd15, reference, moved, features):
    """A FreeU-style output_block_patch gets the whole skip (brought back one block ahead) and scales it, and
    the whole h: on the way up the features between blocks stay on the device (only the skips move); on the
    way down they still leave (the skips, read back by rows by the next block)."""
    from comfyui_streamline.families.unet.structure import unet_shape

    def freeu_like(h, hsp, to):
        h = h.clone()
        h[:, : h.shape[1] // 2] *= 1.2
        return h, hsp * 0.9

    patches = {"output_block_patch": [freeu_like], "input_block_patch": [lambda h, to: h * 1.01]}
    ref = reference(("forward with freeu_like",), lambda: forward(sd15, SliceConfig(3, 7, False), patches=patches))
    out = forward(sd15, offloaded(SliceConfig(3, 7, False), features), patches=patches)
    skips = offload_traffic(unet_shape(sd15[0]), Workload(FRAMES * CONDS, FRAMES, SIZE, SIZE))
    assert torch.equal(out, ref) and moved["out"] == skips.host_bytes and features_moved(moved, features)


# -- the live-tensor counter sees the skips leave the device ---------------------------------------------------


@pytest.mark.host
@pytest.mark.parametrize("config", [SliceConfig(2, 16), SliceConfig(3, 7, False)], ids=["f2-s16", "f3-s7-fixed"])
def test_skips_leave_the_device_count_and_predictions_hold(sd15, monkeypatch, config):
    """At the middle block every skip but the deepest is in host memory: the device count is lower by
    exactly their bytes, the host count holds exactly them, and the device tensors they came from are gone
    (the CPU path copies out for real). The planner predicts the peaks within 10%."""
    from comfyui_streamline.core import memtrace, offload
    from comfyui_streamline.families.unet.structure import unet_shape

    unet, _ = sd15
    sources: list[weakref.ref] = []
    to_host = offload.Transfers.to_host
    monkeypatch.setattr(offload.Transfers, "to_host", lambda self, t: sources.append(weakref.ref(t)) or to_host(self, t))
    at_middle = []

    def middle_hook(module, args):
        meters = [m for m in torch.utils._python_dispatch._get_current_dispatch_mode_stack()
                  if isinstance(m, memtrace.LiveTensorMeter)]
        at_middle.append((meters[0].live_bytes, meters[0].host_bytes, [r() is None for r in sources]))

    hook = unet.middle_block[0].register_forward_pre_hook(middle_hook)  # the middle block's first ResBlock
    try:
        ref, plain = forward(sd15, config, meter=True)
        first = at_middle[0]
        out, moved = forward(sd15, offloaded(config), meter=True)
    finally:
        hook.remove()
    at_middle = [first, at_middle[len(at_middle) // 2]]  # each forward's first call (equal slicing: as many)
    assert torch.equal(out, ref)
    work = Workload(FRAMES * CONDS, FRAMES, SIZE, SIZE)
    traffic = offload_traffic(unet_shape(unet), work)
    (device_plain, host_plain, _), (device_moved, host_moved, released) = at_middle
    assert host_plain == 0 and host_moved == traffic.host_bytes
    assert device_plain - device_moved == traffic.host_bytes
    assert len(released) == 11 and all(released)  # SD1.5: 12 skips, the deepest stays
    assert moved.peak_host_bytes == traffic.host_bytes
    assert moved.peak_bytes < plain.peak_bytes
    shape = unet_shape(unet)
    for meter, c in ((plain, config), (moved, offloaded(config))):
        predicted = predict_peak_bytes(shape, work, c)
        assert abs(predicted / meter.peak_bytes - 1) <= 0.10, (c, predicted, meter.peak_bytes)


@pytest.mark.host
@pytest.mark.parametrize("config", [SliceConfig(2, 16), SliceConfig(3, 7, False)], ids=["f2-s16", "f3-s7-fixed"])
def test_features_leave_the_device_count_and_predictions_hold(sd15, monkeypatch, config):
    """In input block 2's motion module its input (input block 1's output, a skip) is in host memory with
    feature offload, and on the device with skip offload alone: the device count is lower by exactly its
    bytes, the host count higher by them, and the device tensor it came from is gone. The planner predicts
    the peak with feature offload within 10%, and what the host held and what moved exactly."""
    from comfyui_streamline.core import memtrace, offload
    from comfyui_streamline.families.unet.structure import unet_shape

    unet, _ = sd15
    sources: list[weakref.ref] = []
    to_host = offload.Transfers.to_host
    monkeypatch.setattr(offload.Transfers, "to_host", lambda self, t: sources.append(weakref.ref(t)) or to_host(self, t))
    at_motion = []

    def motion_hook(module, args):
        meters = [m for m in torch.utils._python_dispatch._get_current_dispatch_mode_stack()
                  if isinstance(m, memtrace.LiveTensorMeter)]
        at_motion.append((meters[0].live_bytes, meters[0].host_bytes, [r() is None for r in sources]))

    motion = unet.input_blocks[2][-1]
    assert type(motion).__name__ == "VanillaTemporalModule"
    hook = motion.temporal_transformer.transformer_blocks[0].register_forward_pre_hook(motion_hook)
    try:
        ref, skips = forward(sd15, offloaded(config), meter=True)
        first, sources[:] = at_motion[0], []
        out, features = forward(sd15, offloaded(config, True), meter=True)
    finally:
        hook.remove()
    at_motion = [first, at_motion[len(at_motion) // 2]]  # each forward's first call (equal slicing: as many)
    assert torch.equal(out, ref)
    (device_skips, host_skips, _), (device_features, host_features, released) = at_motion
    skip_1 = FRAMES * CONDS * unet.model_channels * SIZE * SIZE * 4  # input block 1's output, fp32
    assert device_skips - device_features == skip_1 and host_features - host_skips == skip_1
    assert len(released) == 2 and all(released)  # input blocks 0 and 1's outputs left at once
    work, shape = Workload(FRAMES * CONDS, FRAMES, SIZE, SIZE), unet_shape(unet)
    traffic = offload_traffic(shape, work, features=True)
    assert features.peak_host_bytes == traffic.host_bytes
    assert features.peak_bytes < skips.peak_bytes
    for meter, c in ((skips, offloaded(config)), (features, offloaded(config, True))):
        predicted = predict_peak_bytes(shape, work, c)
        assert abs(predicted / meter.peak_bytes - 1) <= 0.10, (c, predicted, meter.peak_bytes)


# -- sampling compositions: ADE context windows, FreeU, Step Rehash, ComfyUI's context windows --------------


@pytest.mark.host
@KINDS
def test_ade_context_windows(ade_context_model, reference, moved, features):
    """AnimateDiff-Evolved's overlapping context windows: each window's UNet call offloads its own skips
    (and features)."""
    model, _ = ade_context_model
    config = SliceConfig(3, 7, False)
    ref = reference(("ADE context windows",),
                    lambda: ade_sample(streamline(model, config), POSITIVE, NEGATIVE, CTX_FRAMES)[0])
    out, record = ade_sample(streamline(model, offloaded(config, features)), POSITIVE, NEGATIVE, CTX_FRAMES)
    assert len(record.unet_calls) > 2 and all(call.batch < 2 * CTX_FRAMES for call in record.unet_calls)  # windows
    assert torch.equal(out, ref) and moved["out"] > 0 and features_moved(moved, features)


@pytest.fixture(scope="module")
def tinyvideo():
    from comfyui_streamline.nodes.tinyvideo import TinyVideoLoader

    return TinyVideoLoader.execute().result[0]


def tv_sample(model, frames=8, cfg=5.0):
    from test_rehash_robustness import sample

    return sample(model, frames=frames, cfg=cfg)


def streamline(model, config):
    from comfyui_streamline.techniques.slicing import apply_streamline

    return apply_streamline(model, config)


@pytest.mark.host
@KINDS
@pytest.mark.parametrize("node", ["FreeU", "FreeU_V2"])
def test_comfyui_freeu(tinyvideo, reference, moved, node, features):
    """FreeU patches the output blocks' h and skips whole: the features stay on the device there."""
    from test_rehash_robustness import freeu

    config = SliceConfig(2, 32, False)
    ref = reference(("FreeU", node), lambda: tv_sample(freeu(streamline(tinyvideo, config), node)))
    out = tv_sample(freeu(streamline(tinyvideo, offloaded(config, features)), node))
    assert torch.equal(out, ref) and moved["out"] > 0


@pytest.mark.host
@KINDS
@pytest.mark.parametrize("reuse", ["extrapolate", "hold"])
def test_step_rehash(tinyvideo, reference, moved, reuse, features):
    """Rehash steps read the deepest shallow skip (on the device: the top of the stack never leaves, and with
    feature offload the last shallow block's output stays until the next is pushed); the cached deep
    feature and the output it is stored from stay on the device."""
    from test_rehash_robustness import patch, state_of

    config = SliceConfig(2, 32, False)
    settings = dict(mode="fixed", interval=2, warmup=1, tail=1, reuse=reuse)
    ref = reference(("Step Rehash", reuse), lambda: tv_sample(patch(streamline(tinyvideo, config), **settings)))
    model = patch(streamline(tinyvideo, offloaded(config, features)), **settings)
    out = tv_sample(model)
    assert state_of(model).last.report.rehashed >= 2
    assert torch.equal(out, ref) and moved["out"] > 0 and features_moved(moved, features)


@pytest.mark.host
@KINDS
def test_comfyui_context_windows(tinyvideo, reference, moved, features):
    from test_rehash_robustness import CW_FRAMES, core_context_windows

    config = SliceConfig(2, 32, False)
    ref = reference(("ComfyUI context windows",),
                    lambda: tv_sample(core_context_windows(streamline(tinyvideo, config)), frames=CW_FRAMES))
    out = tv_sample(core_context_windows(streamline(tinyvideo, offloaded(config, features))), frames=CW_FRAMES)
    assert torch.equal(out, ref) and moved["out"] > 0 and features_moved(moved, features)


# -- the planner -------------------------------------------------------------------------------------------


GPU_CASES = [(512, 512, 16), (768, 768, 32), (512, 512, 128)]


def gpu_work(width, height, frames):
    return Workload(2 * frames, frames, height // 8, width // 8, dtype_bytes=2)


def cheapest(shape, work, budget, offload_skips, offload_features=False):
    """The least cost (chunks + offload's) among the candidate slicings that fit, with the given offload."""
    from dataclasses import replace

    from comfyui_streamline.core.budget import candidate_configs

    costs = [chunk_count(work, c) + offload_cost_chunks(shape, work, c)
             for c in (replace(s, offload_skips=offload_skips, offload_features=offload_features)
                       for s in candidate_configs(work))
             if predict_peak_bytes(shape, work, c, SDPA) <= budget * ALLOCATOR_HEADROOM]
    return min(costs, default=float("inf"))


@pytest.mark.parametrize("size", GPU_CASES)
def test_offload_is_planned_only_where_slicing_alone_cannot_fit_or_costs_more(size):
    shape, work = sd15_shape(), gpu_work(*size)
    kinds = set()
    for budget_gib in (64.0, 8.0, 4.0, 2.0, 1.5, 1.0, 0.75, 0.5):
        budget = int(budget_gib * 2**30)
        try:
            without = plan(shape, work, budget, SDPA)
        except ValueError:
            without = None
        try:
            chosen = plan(shape, work, budget, SDPA, offload=True)
        except ValueError:
            assert without is None
            continue
        assert chosen.predicted_peak_bytes <= budget * ALLOCATOR_HEADROOM
        config = chosen.config
        kinds.add((config.offload_skips, config.offload_features))
        cost = chunk_count(work, config) + offload_cost_chunks(shape, work, config)
        if config.offload_skips:
            text = "skips and block outputs offloaded" if config.offload_features else "skips offloaded"
            assert chosen.traffic == offload_traffic(shape, work, config.offload_features) and text in chosen.text()
            # ... because nothing without it fits, or it fits with fewer chunks than the best without
            assert without is None or cost < chunk_count(work, without.config)
            if config.offload_features:  # ... and the same against skip offload alone
                assert cost < cheapest(shape, work, budget, True)
            else:
                assert cost <= cheapest(shape, work, budget, True, True)
        else:
            assert chosen == without
    roomy = plan(shape, work, 64 * 2**30, SDPA, offload=True)
    assert not roomy.config.offload_skips  # nothing to save
    if size == (512, 512, 128):  # every choice is made somewhere
        assert kinds == {(False, False), (True, False), (True, True)}, kinds


def test_offload_breaks_the_skip_floor_in_prediction():
    """The issue's goals, as predicted (fp16, SDPA, CFG batched): the measured GPU figures come from
    tools/gpu_evidence.py."""
    shape = sd15_shape()
    ratios = {}
    for size, chunks in (((512, 512, 16), (2, 512)), ((768, 768, 32), (4, 1024))):
        work = gpu_work(*size)
        base = predict_peak_bytes(shape, work, None, SDPA)
        ratios[size] = base / predict_peak_bytes(shape, work, SliceConfig(*chunks, offload_skips=True), SDPA)
        assert ratios[size] > base / predict_peak_bytes(shape, work, SliceConfig(*chunks), SDPA)
    assert ratios[512, 512, 16] >= 5 and ratios[768, 768, 32] >= 6, ratios


def test_feature_offload_brings_512x512x128_under_2_gib_in_prediction():
    """At 512x512x128 (CFG batched, fp16, SDPA, automatic chunks) skip offload alone stops at 2.07 GiB: a
    block's input stays whole on the device while its motion module runs. With the features offloaded too
    it is predicted at 1.79 GiB."""
    shape, work = sd15_shape(), gpu_work(512, 512, 128)
    skips = predict_peak_bytes(shape, work, SliceConfig(offload_skips=True), SDPA)
    features = predict_peak_bytes(shape, work, SliceConfig(offload_skips=True, offload_features=True), SDPA)
    assert skips > 2 * 2**30 >= features, (skips / 2**30, features / 2**30)
    assert offload_cost_chunks(shape, work, SliceConfig(offload_skips=True)) == 2.0


# -- the nodes ---------------------------------------------------------------------------------------------


@pytest.mark.host
def test_model_patch_input_is_optional_and_off_by_default(tinyvideo):
    from comfyui_streamline.host.options import STREAMLINE_KEY as STATE_KEY
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    schema = StreamlineModelPatch.define_schema()
    entry = next(i for i in schema.inputs if i.id == "offload_skips")
    assert entry.optional and entry.default is False
    old = StreamlineModelPatch.execute(tinyvideo, frame_chunk=2, spatial_chunk=32).result[0]  # a saved workflow
    assert not old.model_options["transformer_options"][STATE_KEY].config.offload_skips
    new = StreamlineModelPatch.execute(tinyvideo, frame_chunk=2, spatial_chunk=32, offload_skips=True).result[0]
    assert new.model_options["transformer_options"][STATE_KEY].config.offload_skips


@pytest.mark.host
def test_the_report_says_skips_were_offloaded_and_what_moved(tinyvideo, moved, caplog):
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    patched = StreamlineModelPatch.execute(tinyvideo, frame_chunk=2, spatial_chunk=32, offload_skips=True).result[0]
    with caplog.at_level(logging.INFO, logger=STREAMLINE_LOGGER):
        tv_sample(patched)
    report = next(r.getMessage() for r in caplog.records if "this run" in r.getMessage())
    assert "skips offloaded" in report and "moved per call" in report, report
    per_call = moved["out"] + moved["back"]
    assert per_call > 0


@pytest.mark.host
def test_memory_budget_chooses_offload_and_tells_comfyui(sd15, monkeypatch):
    """Where offload is available (CUDA; here pretended), a budget that slicing alone cannot fit gets
    offload, the forward runs with it, and the estimate ComfyUI sees is the plan's prediction."""
    from comfyui_streamline.techniques import budget as memory_budget
    from comfyui_streamline.techniques.budget import BudgetPlanner
    from comfyui_streamline.host.attention import attention_laws
    from comfyui_streamline.families.unet.planning import workload_for
    from comfyui_streamline.host.options import STREAMLINE_KEY as STATE_KEY
    from comfyui_streamline.techniques.slicing import StreamlineState
    from comfyui_streamline.families.unet.structure import unet_shape

    unet, synthetic = sd15
    x, t, c = inputs(FRAMES * CONDS)
    shape, work, laws = unet_shape(unet), workload_for(x, c, FRAMES), attention_laws()
    floor = min(predict_peak_bytes(shape, work, SliceConfig(f, s), laws) for f, s in ((1, 16), (1, 1)))
    budget = int(floor / ALLOCATOR_HEADROOM * 0.97)  # below what slicing alone reaches
    with pytest.raises(ValueError):
        plan(shape, work, budget, laws)
    monkeypatch.setattr(memory_budget, "offload_available", lambda device: True)
    state = StreamlineState(SliceConfig(), planner=BudgetPlanner(budget))
    config = state.config_for(unet, x, c)
    assert config.offload_skips
    expected = plan(shape, work, budget, laws, offload=True)
    assert config == expected.config

    class Base:  # what MemoryEstimate reads of ComfyUI's BaseModel
        diffusion_model, manual_cast_dtype = unet, None

        def get_dtype(self):
            return torch.float32

    estimate = memory_budget.MemoryEstimate(Base(), {"transformer_options": {STATE_KEY: state}})
    assert estimate(list(x.shape)) == int(expected.predicted_peak_bytes * memory_budget.ESTIMATE_MARGIN)


# -- the GPU evidence command's plumbing ---------------------------------------------------------------------


@pytest.mark.host
def test_gpu_evidence_command_appends_rows_and_skips_what_is_missing(tmp_path):
    """`tools/gpu_evidence.py --device cpu --quick`: each benchmark in its own process under its own limit,
    rows appended to the markdown file as they are measured, a benchmark not written yet listed as skipped."""
    import subprocess
    import sys
    from pathlib import Path

    tools = Path(__file__).resolve().parents[1] / "tools"
    sys.path.insert(0, str(tools))
    import gpu_evidence

    assert sum(b.limit_s for b in gpu_evidence.BENCHMARKS) <= gpu_evidence.GPU_TOTAL_S
    out = tmp_path / "evidence.md"
    subprocess.run([sys.executable, str(tools / "gpu_evidence.py"), "--device", "cpu", "--quick", "--only", "offload",
                    "wan", "--out", str(out)], check=True, timeout=900)
    text = out.read_text()
    assert text.startswith("# GPU evidence") and "wan: ok" in text, text  # bench_svd --quick: test_svd_bench.py
    rows = [line for line in text.splitlines() if line.startswith("| 64x64x4")]
    assert len(rows) == 4 and "bit-identical" in rows[-2] and "bit-identical" in rows[-1], text  # skips, features
    assert "| tiny 128x128x5" in text and "Streamline, token_chunk" in text
    missing = tmp_path / "missing.md"
    args = gpu_evidence.parse_args(["--out", str(missing), "--device", "cpu", "--quick"])
    gpu_evidence.run_benchmark(gpu_evidence.Benchmark("missing", "no_such_tool.py", (), (), 5), args, missing)
    assert "skipped: tools/no_such_tool.py does not exist yet" in missing.read_text()
    assert "offload: ok" in text and "all done" in text


# -- the side stream and the host buffers: owned by the pack, given back at the end of a run ---------------


class FakePins:
    """Pinning without CUDA: `pin` says yes (or no past `limit` bytes, as a failed registration) and keeps
    ComfyUI's accounting the way comfy.model_management.pin_memory / unpin_memory do."""

    def __init__(self, mm=None, limit: int | None = None):
        self.mm, self.limit = mm, limit
        self.pinned: dict[int, int] = {}  # data_ptr -> bytes
        self.unpinned: list[int] = []

    def pin(self, buffer) -> bool:
        if self.limit is not None and sum(self.pinned.values()) + buffer.nbytes > self.limit:
            return False
        self.pinned[buffer.data_ptr()] = buffer.nbytes
        if self.mm is not None:
            self.mm.PINNED_MEMORY[buffer.data_ptr()] = buffer.nbytes
            self.mm.TOTAL_PINNED_MEMORY += buffer.nbytes
        return True

    def unpin(self, buffer) -> bool:
        size = self.pinned.pop(buffer.data_ptr())
        self.unpinned.append(buffer.data_ptr())
        if self.mm is not None:
            assert self.mm.PINNED_MEMORY.pop(buffer.data_ptr()) == size
            self.mm.TOTAL_PINNED_MEMORY -= size
        return True


@pytest.fixture
def comfy_pins(monkeypatch):
    """ComfyUI's pinned-memory API and limit as on a CUDA host with 1 MiB allowed, pinning faked."""
    import comfy.cli_args
    import comfy.model_management as mm

    pins = FakePins(mm)
    monkeypatch.setattr(mm, "pin_memory", pins.pin)
    monkeypatch.setattr(mm, "unpin_memory", pins.unpin)
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 2**20)
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", 0)
    monkeypatch.setattr(mm, "PINNED_MEMORY", {})
    monkeypatch.setattr(comfy.cli_args.args, "disable_pinned_memory", False)
    return pins


def test_side_stream_is_made_once_per_device():
    """One stream per device, from the factory once; every forward's Transfers on a device uses it."""
    from comfyui_streamline.core import offload

    made = []
    streams = offload.SideStreams(lambda device: made.append(device) or object())
    first = streams.get("cuda:0")
    assert streams.get(torch.device("cuda", 0)) is first and streams.get("cuda:0") is first
    second = streams.get("cuda:1")
    assert second is not first and streams.get("cuda:1") is second
    assert made == [torch.device("cuda", 0), torch.device("cuda", 1)] and streams.streams() == [first, second]


def test_every_forward_on_a_device_gets_the_same_side_stream(monkeypatch):
    from comfyui_streamline.core import offload

    monkeypatch.setattr(offload, "SIDE_STREAMS", offload.SideStreams(lambda device: object()))
    a, b = offload.Transfers(torch.device("cuda", 0)), offload.Transfers(torch.device("cuda", 0))
    assert a.side_stream() is b.side_stream() is offload.side_stream("cuda:0")
    assert offload.Transfers(torch.device("cuda", 1)).side_stream() is not a.side_stream()
    assert a.pool is offload.HOST_POOL and offload.Transfers(torch.device("cpu")).pool is None


def test_pool_hands_back_the_same_buffer_and_holds_nothing_after_the_run():
    """Same byte size (shape and dtype, or another shape of as many bytes) on the same device: the same
    buffer again; pinned by whole pages; after release() the pool holds nothing and every pin is undone."""
    from comfyui_streamline.core import offload

    pins = FakePins()
    pool = offload.HostPool(pins.pin, pins.unpin, refused=lambda nbytes: None)
    a = pool.take("cpu", (2, 3, 5), torch.float16)
    assert a.shape == (2, 3, 5) and a.dtype == torch.float16 and pool.is_pinned(a) and pool.is_pinned(a[1:])
    assert a.data_ptr() % offload.PAGE == 0 and pool.pinned_bytes == pool.held_bytes == offload.PAGE
    b = pool.take("cpu", (2, 3, 5), torch.float16)  # a is still handed out
    assert b.data_ptr() != a.data_ptr() and pool.lent_bytes == 2 * offload.PAGE
    ptr = a.data_ptr()
    pool.give_back(a)
    assert pool.lent_bytes == offload.PAGE
    again = pool.take("cpu", (2, 3, 5), torch.float16)
    assert again.data_ptr() == ptr and pool.held_bytes == 2 * offload.PAGE
    pool.give_back(again)
    assert pool.take("cpu", (15, 2), torch.float16).data_ptr() == ptr  # as many bytes, another shape
    assert pool.take("cuda:0", (2, 3, 5), torch.float16).data_ptr() not in (ptr, b.data_ptr())  # another device
    assert pool.take("cpu", (4, 3, 5), torch.float16).data_ptr() not in (ptr, b.data_ptr())  # another size
    assert len(pins.pinned) == 4 and pool.held_bytes == pool.pinned_bytes == 4 * offload.PAGE
    pool.release()
    assert pool.held_bytes == pool.pinned_bytes == pool.lent_bytes == 0
    assert not pins.pinned and len(pins.unpinned) == 4
    pool.give_back(b)  # a buffer of the ended run: not taken back
    assert pool.held_bytes == pool.lent_bytes == 0
    assert pool.take("cpu", (2, 3, 5), torch.float16).data_ptr() != b.data_ptr()  # a new run's buffer
    assert pool.held_bytes == pool.pinned_bytes == offload.PAGE and len(pins.pinned) == 1


@pytest.mark.host
def test_pool_counts_its_pins_in_comfyuis_total_and_gives_them_back(comfy_pins):
    """Through ComfyUI's own API (pin_memory / unpin_memory): TOTAL_PINNED_MEMORY holds the pool's pins during
    the run and is back where it was after it."""
    import comfy.model_management as mm

    from comfyui_streamline.core import offload

    pool = offload.HostPool()  # ComfyUI's API, ComfyUI's limit
    hosts = [pool.take("cpu", (1000 + i,), torch.float32) for i in range(3)]
    assert all(pool.is_pinned(h) for h in hosts)
    assert mm.TOTAL_PINNED_MEMORY == pool.pinned_bytes == sum(comfy_pins.pinned.values()) > 0
    assert all(size % offload.PAGE == 0 for size in comfy_pins.pinned.values())
    pool.release()
    assert mm.TOTAL_PINNED_MEMORY == 0 and not mm.PINNED_MEMORY and pool.held_bytes == 0


@pytest.mark.host
def test_disable_pinned_memory_gives_pageable_buffers(comfy_pins, monkeypatch, caplog):
    import comfy.cli_args
    import comfy.model_management as mm

    from comfyui_streamline.core import offload

    monkeypatch.setattr(comfy.cli_args.args, "disable_pinned_memory", True)
    pool = offload.HostPool()
    with caplog.at_level(logging.INFO, logger=STREAMLINE_LOGGER):
        hosts = [pool.take("cpu", (1000,), torch.float32) for _ in range(3)]
    assert not comfy_pins.pinned and mm.TOTAL_PINNED_MEMORY == 0 and pool.pinned_bytes == 0
    assert not any(pool.is_pinned(h) or h.is_pinned() for h in hosts) and pool.held_bytes == 3 * 4000
    lines = [r.getMessage() for r in caplog.records if "pageable" in r.getMessage()]
    assert len(lines) == 1 and "--disable-pinned-memory" in lines[0], lines  # once per run
    pool.give_back(hosts[0])
    assert pool.take("cpu", (1000,), torch.float32).data_ptr() == hosts[0].data_ptr()  # reused all the same
    pool.release()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=STREAMLINE_LOGGER):
        pool.take("cpu", (1000,), torch.float32)
    assert sum("pageable" in r.getMessage() for r in caplog.records) == 1  # the next run says it again


@pytest.mark.host
def test_past_comfyuis_pinned_limit_buffers_are_pageable(comfy_pins, monkeypatch, caplog):
    """ComfyUI's limit counts what is pinned already (ComfyUI's own pins and the pool's): a buffer that would
    pass it is pageable, said once; ComfyUI's pins are not evicted for it; a failed registration too."""
    import comfy.model_management as mm

    from comfyui_streamline.core import offload

    page = offload.PAGE
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 5 * page)
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", page)  # ComfyUI's own pins
    pool = offload.HostPool()
    with caplog.at_level(logging.INFO, logger=STREAMLINE_LOGGER):
        first = pool.take("cpu", (2 * page,), torch.uint8)
        second = pool.take("cpu", (2 * page,), torch.uint8)  # 1 + 2 + 2 pages: at the limit
        third = pool.take("cpu", (page,), torch.uint8)  # past it
        fourth = pool.take("cpu", (page // 2,), torch.float16)
    assert pool.is_pinned(first) and pool.is_pinned(second) and not pool.is_pinned(third)
    assert not pool.is_pinned(fourth) and mm.TOTAL_PINNED_MEMORY == 5 * page and pool.pinned_bytes == 4 * page
    lines = [r for r in caplog.records if "pageable" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and "pinned-memory limit" in lines[0].getMessage()
    pool.release()
    assert mm.TOTAL_PINNED_MEMORY == page and pool.held_bytes == 0

    failing = FakePins(mm, limit=0)  # the registration itself fails
    monkeypatch.setattr(mm, "pin_memory", failing.pin)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=STREAMLINE_LOGGER):
        assert not pool.is_pinned(pool.take("cpu", (page,), torch.uint8))
    assert any("pinning failed" in r.getMessage() for r in caplog.records)
    pool.release()


@pytest.fixture
def cpu_pool(monkeypatch):
    """The CPU path's forwards take their host buffers from a pool that pins (pretended), as on CUDA."""
    from comfyui_streamline.core import offload

    pins = FakePins()
    pool = offload.HostPool(pins.pin, pins.unpin, refused=lambda nbytes: None)
    made = []
    new = pool._new
    monkeypatch.setattr(pool, "_new", lambda nbytes: made.append(nbytes) or new(nbytes))
    monkeypatch.setattr(offload, "pool_for", lambda device: pool)
    monkeypatch.setattr(offload, "HOST_POOL", pool)  # what end_run() releases
    pool.made, pool.pins = made, pins
    return pool


@pytest.mark.host
@KINDS
def test_forwards_reuse_the_pools_buffers_bit_identically(sd15, reference, cpu_pool, features):
    """A second forward of the run takes no new buffer (every one of the first came back); the output is
    bit-identical to no offload in both; end_run() leaves nothing held or pinned."""
    import gc

    from comfyui_streamline.core import offload

    config = SliceConfig(3, 7, False)
    ref = reference(("forward", repr(config), CONDS), lambda: forward(sd15, config))
    assert torch.equal(forward(sd15, offloaded(config, features)), ref)
    gc.collect()
    made, held = len(cpu_pool.made), cpu_pool.held_bytes
    assert made > 0 and cpu_pool.lent_bytes == 0 and cpu_pool.pinned_bytes == held
    assert torch.equal(forward(sd15, offloaded(config, features)), ref)
    gc.collect()
    assert len(cpu_pool.made) == made and cpu_pool.held_bytes == held and cpu_pool.lent_bytes == 0
    offload.end_run()
    assert cpu_pool.held_bytes == cpu_pool.pinned_bytes == 0 and not cpu_pool.pins.pinned


@pytest.mark.host
def test_a_sampling_run_gives_its_host_buffers_back(tinyvideo, cpu_pool):
    """Through ComfyUI's KSampler path: the run's forwards share the pool's buffers, the output is the same
    as without offload, and the OUTER_SAMPLE wrapper's end of run leaves the pool empty."""
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    held = []
    take = cpu_pool.take
    cpu_pool.take = lambda *a: held.append(cpu_pool.held_bytes) or take(*a)
    ref = tv_sample(StreamlineModelPatch.execute(tinyvideo, frame_chunk=2, spatial_chunk=32).result[0])
    patched = StreamlineModelPatch.execute(tinyvideo, frame_chunk=2, spatial_chunk=32, offload_skips=True).result[0]
    out = tv_sample(patched)
    assert torch.equal(out, ref) and max(held) > 0
    assert len(held) > 2 * len(cpu_pool.made)  # more tensors left than buffers were made: reused across forwards
    assert cpu_pool.held_bytes == cpu_pool.pinned_bytes == cpu_pool.lent_bytes == 0
    assert not cpu_pool.pins.pinned and len(cpu_pool.pins.unpinned) == len(cpu_pool.made)
