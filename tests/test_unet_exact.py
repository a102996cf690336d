"""The streamlined UNet forward against ComfyUI's own, on a random SD1.5 UNet with ADE motion modules.

CPU, fp32, 16x16 latents; exact means max|patched - plain| <= 1e-5 * max|plain|. The matrix runs on SD1.5's
layout at a fifth of its width (testing/matrix.py: every block, level and motion module, ~16x faster); its hardest
case runs at SD1.5's real width in tests/test_sd15_real_width.py, all of them with STREAMLINE_FULL_MATRIX=1.
"""
import logging

import pytest
import torch

from comfyui_streamline.testing.matrix import MECHANICS_WIDTH

pytestmark = pytest.mark.host

FRAMES, CONDS, SIZE = 4, 2, 16


def build(width: int):
    from comfyui_streamline.testing import synthetic

    unet = synthetic.sd15_unet(seed=0, width=width)
    motion = synthetic.sd15_motion_model(seed=1, width=width)
    synthetic.inject(unet, motion)
    return unet, motion, synthetic


@pytest.fixture(scope="module")
def host():
    return build(MECHANICS_WIDTH)


def inputs(batch, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    context = torch.randn(batch, 77, 768, generator=g)
    timesteps = torch.full((batch,), 500.0)
    return x, timesteps, context


def through_wrapper(unet, config, transformer_options, *args, state=None, **kwargs):
    """Call the UNet the way ComfyUI does, with the pack's DIFFUSION_MODEL wrapper registered.
    `state` stands for one patched MODEL across calls (its once-only log included)."""
    from comfyui_streamline.testing.synthetic import with_streamline

    return unet(*args, transformer_options=with_streamline(transformer_options, config, state), **kwargs)


def assert_exact(out, ref):
    assert out.shape == ref.shape
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.1
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, f"relative max diff {err:.3e}"


@pytest.fixture
def slicing_spy(monkeypatch):
    """Counts chunked group runs and spatially sliced motion modules, proving slicing really happened."""
    from comfyui_streamline.core import grouping, temporal
    from comfyui_streamline.families.unet import motion_module, forward as streamlined_unet

    counts = {"frame_groups_sliced": 0, "motion_modules_sliced": 0}
    real_group, real_temporal = grouping.run_frame_chunked, temporal.temporal_transformer_sliced

    def group(fn, batch, chunk):
        counts["frame_groups_sliced"] += chunk < batch
        return real_group(fn, batch, chunk)

    def sliced(x, parts, chunk, **kw):
        counts["motion_modules_sliced"] += chunk < x.shape[-1] * x.shape[-2]
        return real_temporal(x, parts, chunk, **kw)

    monkeypatch.setattr(streamlined_unet, "run_frame_chunked", group)
    monkeypatch.setattr(motion_module, "temporal_transformer_sliced", sliced)
    return counts


CONFIGS = [
    dict(frame_chunk=3, spatial_chunk=7, scale_with_level=False),  # divides neither 4/8 samples nor 256/64/16/4 positions
    dict(frame_chunk=1, spatial_chunk=5, scale_with_level=True),
    dict(frame_chunk=5, spatial_chunk=100, scale_with_level=False),
    dict(frame_chunk=2, spatial_chunk=64, scale_with_level=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"f{c['frame_chunk']}-s{c['spatial_chunk']}-{'scaled' if c['scale_with_level'] else 'fixed'}")
@pytest.mark.parametrize("conds", [2, 1], ids=["cfg-batched", "single-cond"])
def test_patched_forward_equals_comfyui_forward(host, slicing_spy, config, conds, caplog):
    from comfyui_streamline.core.slicing import SliceConfig

    unet, motion, synthetic = host
    batch = FRAMES * conds
    motion.set_video_length(FRAMES, FRAMES)
    x, t, c = inputs(batch)
    with torch.inference_mode():
        ref = unet(x, t, c, transformer_options=synthetic.ade_transformer_options(conds))
        with caplog.at_level(logging.WARNING, logger="ComfyUI-Streamline"):
            out = through_wrapper(unet, SliceConfig(**config), synthetic.ade_transformer_options(conds), x, t, c)
    assert_exact(out, ref)
    if config["frame_chunk"] < batch:
        assert slicing_spy["frame_groups_sliced"] >= 3
    assert slicing_spy["motion_modules_sliced"] >= 3
    assert not caplog.records, [r.message for r in caplog.records]


def test_motion_modules_matter(host):
    """Guard: the random motion modules change the output, so a broken temporal path cannot pass."""
    unet, motion, synthetic = host
    motion.set_video_length(FRAMES, FRAMES)
    x, t, c = inputs(FRAMES * CONDS)
    with torch.inference_mode():
        ref = unet(x, t, c, transformer_options=synthetic.ade_transformer_options(CONDS))
        motion.set_effect(0.0)
        try:
            without = unet(x, t, c, transformer_options=synthetic.ade_transformer_options(CONDS))
        finally:
            motion.set_effect(None)
    assert (ref - without).abs().max() > 0.05 * ref.abs().max()


def control_residuals(unet, x, t, c, to, seed=3):
    """ControlNet-shaped residuals: one per input block, one for the middle (as ComfyUI's ControlNet returns)."""
    shapes = []
    to["patches"]["input_block_patch"] = [lambda h, to: shapes.append(h.shape) or h]
    with torch.inference_mode():
        unet(x, t, c, transformer_options=to)
    shapes.append(shapes[-1])  # the middle block keeps the deepest input block's shape
    g = torch.Generator().manual_seed(seed)
    res = [0.2 * torch.randn(s, generator=g) for s in shapes]
    inputs_, middle = res[:-1], res[-1]
    # apply_control pops from the end: input residuals in reverse block order, output ones in skip order
    return lambda: {"input": list(reversed(inputs_)), "middle": [middle], "output": list(inputs_)}


def test_controlnet_residuals(host, slicing_spy):
    from comfyui_streamline.core.slicing import SliceConfig

    unet, motion, synthetic = host
    motion.set_video_length(FRAMES, FRAMES)
    x, t, c = inputs(FRAMES * CONDS)
    make_control = control_residuals(unet, x, t, c, synthetic.ade_transformer_options(CONDS))
    with torch.inference_mode():
        plain = unet(x, t, c, transformer_options=synthetic.ade_transformer_options(CONDS))
        ref = unet(x, t, c, control=make_control(), transformer_options=synthetic.ade_transformer_options(CONDS))
        out = through_wrapper(unet, SliceConfig(3, 7, False), synthetic.ade_transformer_options(CONDS), x, t, c,
                              control=make_control())
    assert (ref - plain).abs().max() > 0.05 * ref.abs().max()  # the residuals matter
    assert_exact(out, ref)


def test_block_patches_and_motion_strength(host, slicing_spy):
    """FreeU-style output_block_patch (forces the deferred upsample to materialise), input patches, and a
    motion strength (effect) between 0 and 1."""
    from comfyui_streamline.core.slicing import SliceConfig

    unet, motion, synthetic = host
    motion.set_video_length(FRAMES, FRAMES)
    x, t, c = inputs(FRAMES * CONDS)

    def freeu_like(h, hsp, to):
        h = h.clone()
        h[:, : h.shape[1] // 2] *= 1.2
        return h, hsp * 0.9

    def options():
        to = synthetic.ade_transformer_options(CONDS)
        to["patches"]["output_block_patch"] = [freeu_like]
        to["patches"]["input_block_patch"] = [lambda h, to: h * 1.01]
        return to

    motion.set_effect(0.6)
    try:
        with torch.inference_mode():
            ref = unet(x, t, c, transformer_options=options())
            out = through_wrapper(unet, SliceConfig(3, 7, False), options(), x, t, c)
    finally:
        motion.set_effect(None)
    assert_exact(out, ref)
    assert slicing_spy["motion_modules_sliced"] >= 3


def test_unsliceable_features_fall_back_exactly_and_say_so(host, slicing_spy, caplog):
    """An attention patch and a motion-strength mask cannot be sliced safely: those layers run unsliced,
    the log says so once, and the output is still exact."""
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.techniques.slicing import StreamlineState

    unet, motion, synthetic = host
    motion.set_video_length(FRAMES, FRAMES)
    x, t, c = inputs(FRAMES * CONDS)
    seen = []

    def attn1_patch(q, k, v, extra_options):
        seen.append(q.shape[0])
        return q, k * 1.05, v

    def options():
        to = synthetic.ade_transformer_options(CONDS)
        to["patches"]["attn1_patch"] = [attn1_patch]
        return to

    mask = torch.linspace(0.2, 1.0, SIZE * SIZE).reshape(1, 1, SIZE, SIZE)
    motion.set_effect(mask)
    try:
        with torch.inference_mode():
            ref = unet(x, t, c, transformer_options=options())
            seen.clear()
            with caplog.at_level(logging.WARNING, logger="ComfyUI-Streamline"):
                state = StreamlineState(SliceConfig(3, 7, False))
                out = through_wrapper(unet, None, options(), x, t, c, state=state)
                through_wrapper(unet, None, options(), x, t, c, state=state)
    finally:
        motion.set_effect(None)
    assert_exact(out, ref)
    assert set(seen) == {FRAMES * CONDS}  # attention saw whole batches
    assert slicing_spy["motion_modules_sliced"] == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("attn1_patch" in m for m in messages) and any("motion-strength mask" in m for m in messages)
    assert len(messages) == len(set(messages)), "each notice is logged once"


def test_motion_module_parts_are_checked_against_what_the_sliced_path_knows(host, slicing_spy, caplog):
    """An allowlist, not a denylist: an attribute or layer a newer AnimateDiff-Evolved might add to its
    motion module makes that module run through ADE's own forward (exact), and the log names it."""
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.unet.motion_module import unsliceable_reason

    unet, motion, synthetic = host
    motion.set_video_length(FRAMES, FRAMES)
    modules = [m for m in unet.modules() if type(m).__name__ == "VanillaTemporalModule"]
    assert modules and all(unsliceable_reason(m) is None for m in modules)
    block = modules[0].temporal_transformer.transformer_blocks[0]
    x, t, c = inputs(FRAMES * CONDS)
    with torch.inference_mode():
        ref = unet(x, t, c, transformer_options=synthetic.ade_transformer_options(CONDS))
    try:
        block.future_feature = torch.ones(3)  # unknown attribute with a value: not sliced
        modules[1].temporal_transformer.extra_layer = torch.nn.Identity()  # unknown child layer
        block.disabled_feature = None  # unknown but unset: still sliced
        assert "TemporalTransformerBlock.future_feature" in unsliceable_reason(modules[0])
        assert "TemporalTransformer3DModel.extra_layer" in unsliceable_reason(modules[1])
        with caplog.at_level(logging.WARNING, logger="ComfyUI-Streamline"), torch.inference_mode():
            out = through_wrapper(unet, SliceConfig(3, 7, False), synthetic.ade_transformer_options(CONDS), x, t, c)
    finally:
        del block.future_feature, block.disabled_feature, modules[1].temporal_transformer.extra_layer
    assert_exact(out, ref)
    assert slicing_spy["motion_modules_sliced"] >= 3  # the others still sliced
    messages = [r.getMessage() for r in caplog.records]
    assert any("future_feature" in m for m in messages) and any("extra_layer" in m for m in messages)


def test_unknown_models_run_unchanged(host, caplog):
    """A diffusion model that is not a ComfyUI UNet goes through the wrapper untouched, with a notice."""
    import comfy.patcher_extension
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.host.options import STREAMLINE_KEY as STATE_KEY
    from comfyui_streamline.techniques.slicing import StreamlineState, streamline_wrapper

    class NotAUNet(torch.nn.Module):
        def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kw):
            return comfy.patcher_extension.WrapperExecutor.new_class_executor(
                self._forward, self, comfy.patcher_extension.get_all_wrappers(
                    comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options)
            ).execute(x, timesteps, context, y, control, transformer_options, **kw)

        def _forward(self, x, *args, **kwargs):
            return x * 2

    to = {STATE_KEY: StreamlineState(SliceConfig(1, 1)),
          "wrappers": {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"streamline": [streamline_wrapper]}}}
    x = torch.randn(2, 4, 8, 8)
    with caplog.at_level(logging.WARNING, logger="ComfyUI-Streamline"):
        out = NotAUNet()(x, transformer_options=to)
    assert torch.equal(out, x * 2)
    assert any("running it unchanged" in r.getMessage() for r in caplog.records)


def test_node_patches_a_clone_and_leaves_the_input_model_alone(host):
    import comfy.model_patcher
    import comfy.patcher_extension
    from comfyui_streamline.core.slicing import SliceConfigError
    from comfyui_streamline.host.options import STREAMLINE_KEY as STATE_KEY
    from comfyui_streamline.techniques.slicing import remove_streamline
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    unet, _, _ = host

    class FakeBaseModel(torch.nn.Module):  # ModelPatcher only needs a module with a diffusion_model
        def __init__(self):
            super().__init__()
            self.diffusion_model = unet
            self.model_options = {"transformer_options": {}}

    base = comfy.model_patcher.ModelPatcher(FakeBaseModel(), torch.device("cpu"), torch.device("cpu"))
    patched = StreamlineModelPatch.execute(base, frame_chunk=4, spatial_chunk=256, scale_with_level=True).result[0]
    dm = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    assert patched is not base
    assert patched.get_wrappers(dm, "streamline") and not base.get_wrappers(dm, "streamline")
    assert patched.model_options["transformer_options"][STATE_KEY].config.frame_chunk == 4
    assert STATE_KEY not in base.model_options["transformer_options"]
    plain = remove_streamline(patched)
    assert not plain.get_wrappers(dm, "streamline") and STATE_KEY not in plain.model_options["transformer_options"]
    with pytest.raises(SliceConfigError, match="frame_chunk"):
        StreamlineModelPatch.execute(base, frame_chunk=-2, spatial_chunk=0)


def test_peak_activation_memory_drops_at_least_3x_at_16_frames(host):
    """Live tensor bytes during one forward (CPU), 16 frames with CFG (batch 32), ComfyUI vs patched."""
    from comfyui_streamline.core.memtrace import LiveTensorMeter
    from comfyui_streamline.core.slicing import SliceConfig

    unet, motion, synthetic = host
    frames = 16
    motion.set_video_length(frames, frames)
    x, t, c = inputs(frames * CONDS)
    with torch.inference_mode():
        with LiveTensorMeter() as plain:
            ref = unet(x, t, c, transformer_options=synthetic.ade_transformer_options(CONDS))
        with LiveTensorMeter() as patched:
            out = through_wrapper(unet, SliceConfig(frame_chunk=2, spatial_chunk=32), synthetic.ade_transformer_options(CONDS),
                                  x, t, c)
    assert_exact(out, ref)
    ratio = plain.peak_bytes / patched.peak_bytes
    print(f"peak activation: ComfyUI {plain.peak_bytes / 2**20:.1f} MiB, patched {patched.peak_bytes / 2**20:.1f} MiB, {ratio:.2f}x")
    assert ratio >= 3.0
