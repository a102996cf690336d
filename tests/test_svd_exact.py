"""The sliced SVD forward (families/svd/forward.py) against ComfyUI's own, on random-weight SVD UNets.

Two models: SVD_img2vid through ComfyUI's loader (SVD's layout, 320 channels on every level: detection
needs 320; SVD's own widths, 1.5G parameters, do not fit through the loader in a small machine's memory),
and SVD's layout with its channel multipliers 1/2/4/4 at 64 channels, built directly. Inputs as SVD gets
them: 8 channels (noise and the concatenated image latent), one CLIP-image token of context, the
768-d vector cond, num_video_frames, image_only_indicator. CPU, fp32; exact means
max|patched - plain| <= 1e-5 * max|plain|.
"""
from __future__ import annotations

import logging

import pytest
import torch

pytestmark = pytest.mark.host

FRAMES, SIZE = 5, 8
STREAMLINE_LOGGER = "ComfyUI-Streamline"


@pytest.fixture(scope="module")
def loaded_model():
    """The MODEL (ModelPatcher), as a loader node outputs it."""
    from comfyui_streamline.testing.model_families import load_svd_reduced

    return load_svd_reduced()


@pytest.fixture(scope="module")
def loaded(loaded_model):
    return loaded_model.model.diffusion_model


@pytest.fixture(scope="module")
def layout():
    from comfyui_streamline.testing.model_families import svd_layout
    from comfyui_streamline.testing.weights import randomize_

    return randomize_(svd_layout(model_channels=64), seed=2).eval()


@pytest.fixture(scope="module")
def models(loaded, layout):
    return {"loaded-320": loaded, "layout-64": layout}


def inputs(videos: int, frames: int = FRAMES, size: int = SIZE, seed: int = 0, indicator: bool = True):
    """(x, timesteps, context, y, kwargs) for `videos` videos of `frames` frames, batched as ComfyUI
    batches cond/uncond: video after video. The indicator marks one frame of the first video an image."""
    g = torch.Generator().manual_seed(seed)
    batch = videos * frames
    x = torch.randn(batch, 8, size, size, generator=g)
    timesteps = torch.full((batch,), 0.7)
    context = torch.randn(videos, 1, 1024, generator=g).repeat_interleave(frames, 0)
    y = torch.randn(videos, 768, generator=g).repeat_interleave(frames, 0)
    kwargs = {"num_video_frames": frames}
    if indicator:
        kwargs["image_only_indicator"] = torch.zeros(videos, frames)
        kwargs["image_only_indicator"][0, 1] = 1.0
    return x, timesteps, context, y, kwargs


def relative_error(out, ref) -> float:
    assert out.shape == ref.shape
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.1
    return ((out - ref).abs().max() / ref.abs().max()).item()


def streamlined(unet, config, *args, log=None, control=None, transformer_options=None, **kwargs):
    from comfyui_streamline.host.log import LogOnce
    from comfyui_streamline.families.svd.forward import svd_forward

    x, t, c, y = args
    return svd_forward(unet, config, log or LogOnce(), x, t, c, y, control, transformer_options or {}, **kwargs)


@pytest.fixture
def slicing_spy(monkeypatch):
    """Counts sliced per-frame groups and sliced temporal passes, proving slicing really happened."""
    from comfyui_streamline.families.svd import forward as svd_unet

    counts = {"frame_groups": 0, "position_slices": 0}
    real_group, real_ranges = svd_unet.run_frame_chunked, svd_unet.chunk_ranges

    def group(fn, batch, chunk):
        counts["frame_groups"] += chunk < batch
        return real_group(fn, batch, chunk)

    def ranges(total, size):
        counts["position_slices"] += size < total
        return real_ranges(total, size)

    monkeypatch.setattr(svd_unet, "run_frame_chunked", group)
    monkeypatch.setattr(svd_unet, "chunk_ranges", ranges)
    return counts


_references: dict = {}


def reference(unet, name: str, videos: int):
    key = (name, videos)
    if key not in _references:
        x, t, c, y, kw = inputs(videos)
        with torch.inference_mode():
            _references[key] = unet(x, t, c, y, transformer_options={}, **kw)
    return _references[key]


CONFIGS = [
    dict(frame_chunk=3, spatial_chunk=7, scale_with_level=False),  # divides neither 5/10 samples nor 64/16/4 positions
    dict(frame_chunk=2, spatial_chunk=16, scale_with_level=False),  # divides 10 samples and 64/16 positions, not 5
    dict(frame_chunk=1, spatial_chunk=5, scale_with_level=True),
    dict(frame_chunk=5, spatial_chunk=32, scale_with_level=True),  # divides 5 and 10 samples, 64 positions
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"f{c['frame_chunk']}-s{c['spatial_chunk']}-{'scaled' if c['scale_with_level'] else 'fixed'}")
@pytest.mark.parametrize("videos", [2, 1], ids=["cfg-batched", "single-cond"])
@pytest.mark.parametrize("name", ["loaded-320", "layout-64"])
def test_sliced_forward_equals_comfyui_forward(models, name, videos, config, slicing_spy, caplog):
    from comfyui_streamline.core.slicing import SliceConfig

    unet = models[name]
    ref = reference(unet, name, videos)
    x, t, c, y, kw = inputs(videos)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger=STREAMLINE_LOGGER):
        out = streamlined(unet, SliceConfig(**config), x, t, c, y, **kw)
    err = relative_error(out, ref)
    print(f"\n[{name} videos={videos} {config}] relative max diff {err:.2e}")
    assert err <= 1e-5
    if config["frame_chunk"] < videos * FRAMES:
        assert slicing_spy["frame_groups"] >= 10
    assert slicing_spy["position_slices"] >= 10
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_temporal_layers_matter(layout):
    """Guard: the random time_stacks and time_mixers change the output (marking every frame an image
    turns them off), so a broken temporal path cannot pass."""
    x, t, c, y, kw = inputs(2)
    with torch.inference_mode():
        ref = layout(x, t, c, y, transformer_options={}, **kw)
        kw["image_only_indicator"] = torch.ones(2, FRAMES)
        spatial_only = layout(x, t, c, y, transformer_options={}, **kw)
    assert (ref - spatial_only).abs().max() > 0.05 * ref.abs().max()


def test_without_indicator_and_time_context(layout):
    """No image_only_indicator (what SVD sampling passes), and an explicit time_context."""
    from comfyui_streamline.core.slicing import SliceConfig

    x, t, c, y, kw = inputs(2, indicator=False)
    kw["time_context"] = torch.randn(2 * FRAMES, 1, 1024, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = layout(x, t, c, y, transformer_options={}, **kw)
        out = streamlined(layout, SliceConfig(3, 7, False), x, t, c, y, **kw)
    assert relative_error(out, ref) <= 1e-5


def control_residuals(unet, args, kw, seed=3):
    """ControlNet-shaped residuals: one per input block, one for the middle."""
    shapes = []
    to = {"patches": {"input_block_patch": [lambda h, to: shapes.append(h.shape) or h]}}
    with torch.inference_mode():
        unet(*args, transformer_options=to, **kw)
    shapes.append(shapes[-1])
    g = torch.Generator().manual_seed(seed)
    residuals = [0.3 * torch.randn(s, generator=g) for s in shapes]
    return {"input": residuals[:-1][::-1], "middle": [residuals[-1]], "output": residuals[:-1]}


def test_controlnet_and_block_patches(layout, slicing_spy):
    """ControlNet residuals and block-level patches (input, after skip, output: FreeU-like) as ComfyUI applies them."""
    from comfyui_streamline.core.slicing import SliceConfig

    x, t, c, y, kw = inputs(2)
    control = control_residuals(layout, (x, t, c, y), kw)

    def options():
        return {"patches": {"input_block_patch": [lambda h, to: h * 1.1],
                            "input_block_patch_after_skip": [lambda h, to: h - 0.05],
                            "output_block_patch": [lambda h, skip, to: (h * 0.9, skip * 1.05)]}}

    def copy(control):
        return {k: [r.clone() for r in v] for k, v in control.items()}

    with torch.inference_mode():
        ref = layout(x, t, c, y, control=copy(control), transformer_options=options(), **kw)
        out = streamlined(layout, SliceConfig(3, 7, False), x, t, c, y, control=copy(control),
                          transformer_options=options(), **kw)
    assert relative_error(out, ref) <= 1e-5
    assert slicing_spy["frame_groups"] >= 10 and slicing_spy["position_slices"] >= 10


def test_attention_patch_runs_video_layers_whole(layout, caplog, slicing_spy):
    """An attention patch may look at what a slice cannot show: the video layers run whole, logged once."""
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.host.log import LogOnce

    x, t, c, y, kw = inputs(1)

    def options():
        return {"patches": {"attn1_patch": [lambda n, k, v, extra: (n * 0.5, k, v)]}}

    log = LogOnce()
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger=STREAMLINE_LOGGER):
        ref = layout(x, t, c, y, transformer_options=options(), **kw)
        for _ in range(2):
            out = streamlined(layout, SliceConfig(1, 5, False), x, t, c, y, log=log, transformer_options=options(), **kw)
    assert relative_error(out, ref) <= 1e-5
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and all("attn1_patch" in m for m in messages), messages  # the call, VRB, SVT


class Rescale(torch.nn.Module):
    """A layer the sliced path does not know."""

    def forward(self, x):
        return x * 1.5 + x.mean()  # mixes the whole batch: wrong if it were sliced


def test_unknown_layer_runs_whole_with_one_log_line(layout, caplog, slicing_spy):
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.host.log import LogOnce

    block = layout.input_blocks[1]  # [VideoResBlock, SpatialVideoTransformer]
    block.insert(1, Rescale())
    try:
        x, t, c, y, kw = inputs(2)
        log = LogOnce()
        with torch.inference_mode(), caplog.at_level(logging.WARNING, logger=STREAMLINE_LOGGER):
            ref = layout(x, t, c, y, transformer_options={}, **kw)
            for _ in range(2):
                out = streamlined(layout, SliceConfig(3, 7, False), x, t, c, y, log=log, **kw)
    finally:
        del block[1]
    assert relative_error(out, ref) <= 1e-5
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "Rescale" in messages[0], messages
    assert slicing_spy["frame_groups"] >= 10


def test_peak_activation_memory_drops_at_least_3x_at_14_frames(loaded):
    """Live tensor bytes during one forward (CPU), 14 frames with cond/uncond batched (28 samples) at
    an 8x8 latent, SVD at 320 channels: ComfyUI's forward against a fine slicing."""
    from comfyui_streamline.core.memtrace import LiveTensorMeter
    from comfyui_streamline.core.slicing import SliceConfig

    x, t, c, y, kw = inputs(2, frames=14)
    with torch.inference_mode():
        with LiveTensorMeter() as plain:
            ref = loaded(x, t, c, y, transformer_options={}, **kw)
        with LiveTensorMeter() as patched:
            out = streamlined(loaded, SliceConfig(frame_chunk=2, spatial_chunk=8), x, t, c, y, **kw)
    assert relative_error(out, ref) <= 1e-5
    ratio = plain.peak_bytes / patched.peak_bytes
    print(f"\npeak activation: ComfyUI {plain.peak_bytes / 2**20:.2f} MiB, sliced {patched.peak_bytes / 2**20:.2f} MiB, "
          f"{ratio:.2f}x")
    assert ratio >= 3.0


def test_recorded_svd_fingerprints_are_this_hosts():
    from comfyui_streamline.host import fingerprints as hf
    from comfyui_streamline.families.svd import forward as svd_unet

    assert hf.unrecorded(svd_unet.svd_functions()) == []


def test_is_svd_unet(loaded, layout):
    from comfyui_streamline.families.unet_common.layer_roles import is_svd_unet
    from comfyui_streamline.testing.model_families import FAMILIES

    assert is_svd_unet(loaded) and is_svd_unet(layout)
    assert not is_svd_unet(FAMILIES["SD15"].build()) and not is_svd_unet(torch.nn.Linear(2, 2))


def with_svd_forward(model, config):
    """A clone of the MODEL whose UNet calls run svd_forward (the DIFFUSION_MODEL wrapper the pack's
    Model Patch will register), and the batch of each call."""
    import comfy.patcher_extension

    from comfyui_streamline.host.log import LogOnce
    from comfyui_streamline.families.svd.forward import svd_forward

    log, calls = LogOnce(), []

    def wrapper(executor, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        calls.append(x.shape[0])
        return svd_forward(executor.class_obj, config, log, x, timesteps, context, y, control, transformer_options,
                           **kwargs)

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "svd-test", wrapper)
    return patched, calls


def svd_conds(seed: int = 1):
    """As SVD_img2vid_Conditioning gives them: one CLIP-image token; the negative a zero image."""
    g = torch.Generator().manual_seed(seed)
    pooled, image = torch.randn(1, 1, 1024, generator=g), torch.randn(1, 4, SIZE, SIZE, generator=g)
    extras = {"motion_bucket_id": 127, "fps": 6, "augmentation_level": 0.0}
    return ([[pooled, {**extras, "concat_latent_image": image}]],
            [[torch.zeros_like(pooled), {**extras, "concat_latent_image": torch.zeros_like(image)}]])


def test_sampling_through_ksampler_with_video_cfg(loaded_model, slicing_spy, caplog):
    """KSampler (4 euler steps, karras, cond/uncond batched) on the loaded MODEL under VideoLinearCFGGuidance:
    the sliced forward in every UNet call gives the samples of the plain run. (Not fewer steps: ComfyUI's
    sampler_cfg_function works on x - denoised, and at SVD's sigma_max of 700 float32 rounds that to
    ~2e-4; a 1e-6 change of the UNet's output then moves a 2-step sample by up to 7e-5 of its largest
    value, whoever makes the change; later steps damp it.)"""
    import nodes
    from comfy_extras.nodes_video_model import VideoLinearCFGGuidance

    from comfyui_streamline.core.slicing import SliceConfig

    STEPS = 4
    (model,) = VideoLinearCFGGuidance().patch(loaded_model, 1.0)
    positive, negative = svd_conds()
    latent = {"samples": torch.zeros(FRAMES, 4, SIZE, SIZE)}

    def sample(m):
        with torch.inference_mode():
            (out,) = nodes.common_ksampler(m, 7, STEPS, 2.5, "euler", "karras", positive, negative, latent)
        return out["samples"].clone()

    plain = sample(model)
    patched, calls = with_svd_forward(model, SliceConfig(frame_chunk=3, spatial_chunk=7))
    with caplog.at_level(logging.WARNING, logger="ComfyUI-Streamline"):
        out = sample(patched)
    err = relative_error(out, plain)
    print(f"\n[KSampler, VideoLinearCFGGuidance] relative max diff {err:.2e}")
    assert err <= 1e-5
    assert calls == [2 * FRAMES] * STEPS
    assert slicing_spy["frame_groups"] >= 10 and slicing_spy["position_slices"] >= 10
    assert not caplog.records, [r.getMessage() for r in caplog.records]


# -- Step Rehash (techniques/rehash.py's RehashCallState in transformer_options) -----------------------

def rehash_run(reuse: str = "extrapolate", full_steps=frozenset({0, 1})):
    from comfyui_streamline.core.rehash import RehashConfig
    from comfyui_streamline.techniques.rehash import RehashRun

    return RehashRun(RehashConfig(mode="fixed", reuse=reuse), steps=4, full_steps=set(full_steps),
                     rehash_sigma_range=(0.0, 1e9))


def rehash_call(run, cache_block: int, step: int, sigma: float):
    from comfyui_streamline.techniques.rehash import RehashCallState

    return RehashCallState(run, cache_block, step, sigma, keys=[("cond", ()), ("uncond", ())])


@pytest.fixture
def block_spy(monkeypatch):
    """The blocks each svd_forward call runs, as transformer_options["block"] names them, "out" last."""
    from comfyui_streamline.families.svd import forward as svd_unet

    seen = []
    real = svd_unet.SVDForward.run_block

    def run_block(self, block, *args, **kwargs):
        seen.append(self.to.get("block") if block is not self.unet.out else "out")
        return real(self, block, *args, **kwargs)

    monkeypatch.setattr(svd_unet.SVDForward, "run_block", run_block)
    return seen


def continued_from(unet, feature, cache_block, x, t, c, y, kw, control=None):
    """ComfyUI's forward with output block cache_block's output replaced by `feature` (through an
    output_block_patch on the next block): what a rehash call must return. Also the transformer_index
    it ends with."""
    def replace_h(h, skip, to):
        return (feature if to["block"] == ("output", cache_block + 1) else h), skip

    to = {"patches": {"output_block_patch": [replace_h]}}
    with torch.inference_mode():
        out = unet(x, t, c, y, control=control, transformer_options=to, **kw)
    return out, to["transformer_index"]


def deep_feature_of(unet, cache_block, x, t, c, y, kw):
    """Output block cache_block's output in ComfyUI's forward."""
    seen = {}

    def record(h, skip, to):
        if to["block"] == ("output", cache_block + 1):
            seen["h"] = h.clone()
        return h, skip

    with torch.inference_mode():
        unet(x, t, c, y, transformer_options={"patches": {"output_block_patch": [record]}}, **kw)
    return seen["h"]


@pytest.mark.parametrize("cache_block", [10, 5], ids=["default", "after-upsample"])
def test_rehash_full_call_is_bit_identical_and_stores_the_deep_feature(layout, cache_block):
    """A call Step Rehash computes in full: the same output as without Step Rehash, bit for bit, and the
    feature it stores is output block cache_block's output (block 5 ends with an Upsample: stored
    after it) in ComfyUI's forward."""
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.host.options import REHASH_CALL_KEY

    x, t, c, y, kw = inputs(2)
    config = SliceConfig(3, 7, False)
    run = rehash_run()
    with torch.inference_mode():
        plain = streamlined(layout, config, x, t, c, y, **kw)
        out = streamlined(layout, config, x, t, c, y, transformer_options={REHASH_CALL_KEY: rehash_call(run, cache_block, 0, 10.0)}, **kw)
    assert torch.equal(out, plain)
    stored = torch.cat([run.deep[("cond", ())][-1][1], run.deep[("uncond", ())][-1][1]])
    assert relative_error(stored, deep_feature_of(layout, cache_block, x, t, c, y, kw)) <= 1e-5


@pytest.mark.parametrize("reuse", ["extrapolate", "hold"])
@pytest.mark.parametrize("cache_block", [10, 5], ids=["default", "after-upsample"])
@pytest.mark.parametrize("sliced", [True, False], ids=["sliced", "unsliced"])
def test_rehash_call_skips_the_deep_blocks_and_continues_from_the_cache(layout, cache_block, reuse, sliced, block_spy):
    """Two full calls (sigma 10, 8), then a rehash call (sigma 6): it runs only the shallow input blocks
    and the output blocks after the cache point (zero deep blocks), pops the skipped blocks' ControlNet
    residuals, ends with the transformer_index of a full forward, and returns ComfyUI's forward continued
    from what Step Rehash hands out (extrapolated along the last two full calls' features, or held)."""
    from comfyui_streamline.core.rehash import reused_feature
    from comfyui_streamline.core.slicing import UNSLICED, SliceConfig
    from comfyui_streamline.host.options import REHASH_CALL_KEY

    config = SliceConfig(3, 7, False) if sliced else UNSLICED
    run = rehash_run(reuse)
    for step, (sigma, seed) in enumerate([(10.0, 0), (8.0, 1)]):
        x, t, c, y, kw = inputs(2, seed=seed)
        with torch.inference_mode():
            streamlined(layout, config, x, t, c, y, transformer_options={REHASH_CALL_KEY: rehash_call(run, cache_block, step, sigma)}, **kw)
    x, t, c, y, kw = inputs(2, seed=2)
    control = control_residuals(layout, (x, t, c, y), kw)
    expected_h = torch.cat([reused_feature(run.deep[key], 6.0, reuse) for key in (("cond", ()), ("uncond", ()))])
    ref, transformer_index = continued_from(layout, expected_h, cache_block, x, t, c, y, kw,
                                            control={k: list(v) for k, v in control.items()})
    block_spy.clear()
    call = rehash_call(run, cache_block, 2, 6.0)
    to = {REHASH_CALL_KEY: call}
    with torch.inference_mode():
        out = streamlined(layout, config, x, t, c, y, control={k: list(v) for k, v in control.items()},
                          transformer_options=to, **kw)
    assert call.rehashed
    shallow = len(layout.input_blocks) - 1 - cache_block
    assert block_spy == [("input", i) for i in range(shallow)] + \
        [("output", i) for i in range(cache_block + 1, len(layout.output_blocks))] + ["out"]
    assert to["transformer_index"] == transformer_index
    assert relative_error(out, ref) <= 1e-5
    if reuse == "extrapolate":  # guard: the two features differ, so extrapolating is not holding
        first, last = run.deep[("cond", ())]
        assert (first[1] - last[1]).abs().max() > 1e-3 * last[1].abs().max()
