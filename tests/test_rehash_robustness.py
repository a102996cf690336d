"""Step Rehash where the rest of ComfyUI meets it: ComfyUI's own context windows, output-block patches
that change h in place (FreeU), settings and models it cannot rehash (what runs, what the report and the
log say), and a run that ends in an exception.

Sampling runs on TinyVideo (the pack's small model, about a second per run on the CPU) through ComfyUI's
KSampler path with ComfyUI's real nodes (Context Windows (Manual), FreeU, FreeU_V2). The SVD and other
model families are called through the Step Rehash wrapper the way ComfyUI's forward calls it: a tiny
SVD-layout UNetModel, and a stand-in with Flux's forward signature.
"""
from __future__ import annotations

import gc
import inspect
import logging
import weakref

import pytest
import torch

pytestmark = pytest.mark.host

STEPS = 6
SIZE = 16  # TinyVideo latent height = width
FRAMES = 8
SEED = 5
PROMPT = "red circle bounce"
STREAMLINE_LOGGER = "ComfyUI-Streamline"


@pytest.fixture(scope="module")
def tinyvideo():
    from comfyui_streamline.nodes.tinyvideo import TinyVideoLoader

    return TinyVideoLoader.execute().result[0]


def patch(model, **config):
    from comfyui_streamline.core.rehash import RehashConfig
    from comfyui_streamline.techniques.rehash import apply_rehash

    store = config.pop("store", None)
    return apply_rehash(model, RehashConfig(**config), keystep_store=store)


def state_of(model):
    from comfyui_streamline.host.options import REHASH_KEY as STATE_KEY

    return model.model_options["transformer_options"][STATE_KEY]


def sample(model, frames=FRAMES, cfg=5.0, callback=None):
    import comfy.sample

    from comfyui_streamline.nodes.tinyvideo import TinyVideoPrompt

    positive = TinyVideoPrompt.execute(model, PROMPT).result[0]
    negative = TinyVideoPrompt.execute(model, "").result[0]
    latent = torch.zeros(frames, 4, SIZE, SIZE)
    noise = comfy.sample.prepare_noise(latent, SEED)
    with torch.inference_mode():
        out = comfy.sample.sample(model, noise, STEPS, cfg, "euler", "normal", positive, negative, latent,
                                  callback=callback, disable_pbar=True, seed=SEED)
    return out.clone()


@pytest.fixture(scope="module")
def plain(tinyvideo):
    return sample(tinyvideo)


def warnings_from_streamline(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == STREAMLINE_LOGGER and r.levelno >= logging.WARNING]


# -- ComfyUI's own context windows ------------------------------------------------------------------------


def core_context_windows(model, length=4, overlap=2):
    """ComfyUI's "Context Windows (Manual)" node (comfy_extras/nodes_context_windows.py) on `model`."""
    from comfy.context_windows import ContextFuseMethods, ContextSchedules
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    import inspect

    newer = {"freenoise": False} if "freenoise" in inspect.signature(ContextWindowsManualNode.execute).parameters else {}
    return ContextWindowsManualNode.execute(model, length, overlap, ContextSchedules.STATIC_STANDARD, 1, False,
                                            ContextFuseMethods.PYRAMID, 0, **newer).result[0]


# ComfyUI's IndexListContextHandler.set_step (this host) compares the call's timestep, one per latent in the
# batch, with the schedule's sigmas elementwise: for windows over the batch (dim 0) it only runs when the
# batch has as many entries as the schedule (steps + 1). 7 frames in windows of 4 overlapping by 2: 3 windows.
CW_FRAMES = STEPS + 1


def test_core_context_windows_cache_per_window(tinyvideo, monkeypatch):
    from comfyui_streamline.techniques import rehash as step_rehash

    windows_seen, keys_stored = set(), set()
    real_store = step_rehash.RehashCallState.store
    real_reuse = step_rehash.RehashCallState.reuse
    stored_by = {}  # id of a cached tensor -> the window whose call stored it
    handed = []  # (window of the call, window that stored the feature it was handed)

    def store(self, deep):
        real_store(self, deep)
        keys_stored.update(self.keys)
        stored_by.update({id(self.run.deep[key][-1][1]): key[1] for key in self.keys})

    def reuse(self, shallow):
        out = real_reuse(self, shallow)
        if out is not None:
            handed.extend((key[1], stored_by[id(self.run.deep[key][-1][1])]) for key in self.keys)
        return out

    def keys(transformer_options, batch):
        window = transformer_options["context_window"].index_list
        windows_seen.add(tuple(window))
        return real_keys(transformer_options, batch)

    real_keys = step_rehash._cache_keys
    monkeypatch.setattr(step_rehash, "_cache_keys", keys)
    monkeypatch.setattr(step_rehash.RehashCallState, "store", store)
    monkeypatch.setattr(step_rehash.RehashCallState, "reuse", reuse)

    model = patch(core_context_windows(tinyvideo), mode="fixed", interval=2, warmup=1, tail=1, reuse="hold")
    out = sample(model, frames=CW_FRAMES)
    assert len(windows_seen) == 3
    conds = {uuid for uuid, _ in keys_stored}
    assert len(conds) == 2 and len(keys_stored) == len(windows_seen) * len(conds), keys_stored
    assert handed and all(mine == source for mine, source in handed), handed  # each window its own feature
    report = state_of(model).last.report
    assert (report.full, report.rehashed) == (4, 2) and torch.isfinite(out).all()


def test_core_context_windows_rehash_off_is_plain_sampling(tinyvideo):
    windowed = core_context_windows(tinyvideo)
    plain_windows = sample(windowed, frames=CW_FRAMES)
    model = patch(windowed, mode="off")
    assert torch.equal(sample(model, frames=CW_FRAMES), plain_windows)
    assert state_of(model).last.report.full == STEPS


def test_wan_context_windows_key_by_window():
    """WAN Context Windows put windows on dim 2 of a 5-d latent (not a UNet's input, so not sampled here):
    the cache key still tells the windows apart."""
    import comfy.context_windows

    from comfyui_streamline.techniques.rehash import _cache_keys

    keys = set()
    for index_list in ([0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]):
        newer = {"total_frames": 8} if "total_frames" in inspect.signature(
            comfy.context_windows.IndexListContextWindow).parameters else {}  # ComfyUI 0.33 needs it
        window = comfy.context_windows.IndexListContextWindow(index_list, dim=2, **newer)
        keys.update(_cache_keys({"uuids": ["c", "u"], "context_window": window}, 2))
    assert len(keys) == 6


# -- output-block patches that scale h in place (FreeU) ---------------------------------------------------


def freeu(model, node: str):
    """ComfyUI's real FreeU / FreeU_V2 node (comfy_extras/nodes_freelunch.py), default settings."""
    import comfy_extras.nodes_freelunch as freelunch

    cls = getattr(freelunch, "NODE_CLASS_MAPPINGS", {}).get(node) or getattr(freelunch, node)
    defaults = {k: v[1]["default"] for k, v in cls.INPUT_TYPES()["required"].items() if k != "model"}
    if hasattr(cls, "execute"):  # ComfyUI 0.33: a V3 node
        return cls.execute(model, **defaults).result[0]
    return cls().patch(model, **defaults)[0]  # 0.3.64


def on_copies(model):
    """The same patched model, its output-block patches handed a copy of h: what the patch computes is
    unchanged, and nothing it writes into h can reach Step Rehash's cache."""
    model = model.clone()
    patches = model.model_options["transformer_options"]["patches"]
    patches["output_block_patch"] = [lambda h, hsp, to, p=p: p(h.clone(), hsp, to)
                                     for p in patches["output_block_patch"]]
    return model


@pytest.mark.parametrize("node, cfg, sliced", [
    ("FreeU", 5.0, False), ("FreeU", 1.0, False), ("FreeU_V2", 5.0, False), ("FreeU_V2", 1.0, False),
    ("FreeU", 1.0, True),
], ids=["FreeU-cfg", "FreeU-cond-only", "FreeU_V2-cfg", "FreeU_V2-cond-only", "FreeU-cond-only-streamline"])
def test_freeu_does_not_rescale_the_cached_feature(tinyvideo, monkeypatch, node, cfg, sliced):
    """cfg 1: ComfyUI runs the cond alone, so a hold step's feature is one cached tensor, not a concatenation."""
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.techniques import rehash as step_rehash
    from comfyui_streamline.techniques.slicing import apply_streamline

    base = apply_streamline(tinyvideo, SliceConfig(2, 32, False)) if sliced else tinyvideo

    # cache after output block 2: its output has 2 x model_channels channels, which FreeU scales (b2)
    cache_block = 2
    unet = tinyvideo.model.diffusion_model
    channels = unet.output_blocks[cache_block][0].out_channels
    assert channels == 2 * unet.model_channels
    settings = dict(mode="fixed", interval=3, warmup=1, tail=1, reuse="hold", split_point=cache_block)

    snapshots = []  # (cached tensor, its values when stored)
    changed = []
    real_store, real_reuse = step_rehash.RehashCallState.store, step_rehash.RehashCallState.reuse

    def store(self, deep):
        real_store(self, deep)
        snapshots.extend((t, t.clone()) for key in self.keys for _, t in self.run.deep[key][-1:])

    def reuse(self, shallow):
        changed.extend(not torch.equal(t, values) for t, values in snapshots)
        return real_reuse(self, shallow)

    monkeypatch.setattr(step_rehash.RehashCallState, "store", store)
    monkeypatch.setattr(step_rehash.RehashCallState, "reuse", reuse)
    model = patch(freeu(base, node), **settings)
    out = sample(model, cfg=cfg)
    report = state_of(model).last.report
    assert report.rehashed == 2 and snapshots  # steps 2 and 3
    assert not any(changed), f"{sum(changed)} checks found the cached feature changed after it was stored"
    monkeypatch.undo()

    reference = sample(patch(on_copies(freeu(base, node)), **settings), cfg=cfg)
    assert torch.equal(out, reference), (out - reference).abs().max()
    assert not torch.equal(reference, sample(patch(tinyvideo, **settings), cfg=cfg))  # FreeU changed the video


# -- what ran, and what the report and the log say --------------------------------------------------------


def test_rehash_off_reports_every_step_in_full(tinyvideo, plain):
    model = patch(tinyvideo, mode="off")
    assert torch.equal(sample(model), plain)
    report = state_of(model).last.report
    assert (report.full, report.rehashed, report.steps) == (STEPS, 0, STEPS)
    assert f"{STEPS}/{STEPS} steps computed in full" in report.text() and "off" in report.note


def test_cache_block_out_of_range_runs_in_full_and_says_why(tinyvideo, plain, caplog):
    model = patch(tinyvideo, mode="fixed", split_point=9)
    with caplog.at_level(logging.WARNING, logger=STREAMLINE_LOGGER):
        out = sample(model)
        sample(model)
    assert torch.equal(out, plain)
    report = state_of(model).last.report
    assert (report.full, report.rehashed) == (STEPS, 0)
    assert "cache_block 9 is out of range" in report.note and "every step" in report.note
    assert len([m for m in warnings_from_streamline(caplog) if "cache_block" in m]) == 1


def test_keystep_with_more_full_steps_than_steps_computes_every_step_in_full(tinyvideo, plain, tmp_path, caplog):
    store = tmp_path / "keysteps.json"
    model = patch(tinyvideo, mode="keystep", full_steps=STEPS + 4, store=store)
    with caplog.at_level(logging.WARNING, logger=STREAMLINE_LOGGER):
        out = sample(model)
    assert torch.equal(out, plain)
    report = state_of(model).last.report
    assert (report.full, report.rehashed) == (STEPS, 0)
    assert f"full_steps {STEPS + 4}" in report.note and "every step" in report.note
    assert [m for m in warnings_from_streamline(caplog) if "full_steps" in m]
    assert not store.exists()  # nothing to calibrate, nothing saved


def run_state(mode="fixed", steps=4):
    """A RehashState as the OUTER_SAMPLE wrapper hands it to the calls of one run: steps 0, 1, 3 full."""
    from comfyui_streamline.core.rehash import RehashConfig
    from comfyui_streamline.techniques.rehash import RehashRun, RehashState

    config = RehashConfig(mode=mode, interval=2, warmup=2, tail=1)
    run = RehashRun(config, steps, {0, 1, 3}, (0.0, 1e9))
    return RehashState(config, None, run=run)


def through_the_wrapper(state, step: int, sample_sigmas) -> dict:
    """transformer_options of one model call of a run with Step Rehash: its wrapper, its state, the step."""
    import comfy.patcher_extension

    from comfyui_streamline.host.options import REHASH_KEY as STATE_KEY, REHASH_WRAPPER_KEY as WRAPPER_KEY
    from comfyui_streamline.techniques.rehash import diffusion_model_wrapper

    return {STATE_KEY: state, "sigmas": sample_sigmas[step:step + 1], "sample_sigmas": sample_sigmas,
            "wrappers": {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {WRAPPER_KEY: [diffusion_model_wrapper]}}}


@pytest.fixture(scope="module")
def svd_unet():
    """A tiny UNetModel in SVD's layout (VideoResBlocks, SpatialVideoTransformers), random weights."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from comfyui_streamline.testing.weights import randomize_

    unet = UNetModel(
        image_size=None, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[1, 1], channel_mult=(1, 2),
        num_head_channels=16, use_spatial_transformer=True, transformer_depth=[1, 1], transformer_depth_middle=1,
        transformer_depth_output=[1, 1, 1, 1], context_dim=32,
        use_linear_in_transformer=True, legacy=False, use_temporal_resblock=True, use_temporal_attention=True,
        extra_ff_mix_layer=True, use_spatial_context=True, merge_strategy="learned_with_images", merge_factor=0.0,
        video_kernel_size=[3, 1, 1], operations=comfy.ops.disable_weight_init,
    )
    return randomize_(unet, seed=3).eval()


def test_svd_unet_without_streamline_is_split_by_step_rehash(svd_unet, caplog):
    """SVD's video UNet: Step Rehash splits it (families/svd/forward.py) with no notice; full steps compute what
    ComfyUI computes, rehash steps reuse the deep feature (steps 0, 1, 3 full, step 2 rehashed)."""
    frames = 4
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(frames, 4, 8, 8, generator=g), torch.randn(frames, 3, 32, generator=g)
    video = dict(num_video_frames=frames, image_only_indicator=torch.zeros(1, frames))
    sample_sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    state = run_state()
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger=STREAMLINE_LOGGER):
        for step in range(4):
            timesteps = torch.full((frames,), 900.0 - 200 * step)
            expected = svd_unet(x, timesteps, context, transformer_options={}, **video)
            out = svd_unet(x, timesteps, context, transformer_options=through_the_wrapper(state, step, sample_sigmas),
                           **video)
            error = ((out - expected).abs().max() / expected.abs().max()).item()
            if step == 2:
                assert error > 1e-4  # the reused feature, not this step's own
            else:
                assert error <= 1e-5, (step, error)
    assert warnings_from_streamline(caplog) == []
    report = state.run.report()
    assert (report.full, report.rehashed) == (3, 1), report


class FluxSignature(torch.nn.Module):
    """A stand-in for a non-UNet diffusion model (Flux's forward signature: guidance and ref_latents before
    control and transformer_options), dispatching its DIFFUSION_MODEL wrappers as ComfyUI's Flux does."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.received = []

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options={}, **kwargs):
        import comfy.patcher_extension

        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                            transformer_options)
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)

    def _forward(self, *args, **kwargs):
        self.received.append((args, kwargs))
        x, timestep, _, _, guidance = args[:5]
        return self.conv(x) * guidance.view(-1, 1, 1, 1) + timestep.view(-1, 1, 1, 1)


def test_non_unet_models_get_their_arguments_exactly_as_received(caplog):
    model = FluxSignature()
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8)
    guidance, ref_latents, extra = torch.tensor([3.5, 3.5]), [torch.randn(1, 4, 8, 8)], torch.ones(1)
    sample_sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    state = run_state()
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger=STREAMLINE_LOGGER):
        for step in range(4):
            timestep = torch.full((2,), 1.0 - 0.2 * step)
            expected = model(x, timestep, context, None, guidance, ref_latents, None, {}, extra=extra)
            options = through_the_wrapper(state, step, sample_sigmas)
            out = model(x, timestep, context, None, guidance, ref_latents, None, options, extra=extra)
            assert torch.equal(out, expected)
            args, kwargs = model.received[-1]
            assert [a is b for a, b in zip(args, (x, timestep, context, None, guidance, ref_latents, None, options))] \
                == [True] * 8 and len(args) == 8 and kwargs == {"extra": extra}
    messages = warnings_from_streamline(caplog)
    assert len(messages) == 1 and "FluxSignature" in messages[0], messages
    assert state.run.report().full == 4


def test_config_error_has_a_readable_module():
    from comfyui_streamline.core.rehash import RehashConfig, RehashConfigError

    assert RehashConfigError.__module__ == "comfyui_streamline"
    with pytest.raises(RehashConfigError) as error:
        RehashConfig(mode="sometimes")
    assert f"{type(error.value).__module__}.{type(error.value).__qualname__}" == "comfyui_streamline.RehashConfigError"


# -- no state outlives a run ------------------------------------------------------------------------------


class Stop(Exception):
    pass


def test_a_run_stopped_by_an_exception_leaves_no_state_and_no_cached_tensor(tinyvideo, monkeypatch):
    from comfyui_streamline.techniques import rehash as step_rehash

    cached = []
    real_store = step_rehash.RehashCallState.store

    def store(self, deep):
        real_store(self, deep)
        cached.extend(weakref.ref(t) for key in self.keys for _, t in self.run.deep[key])
        cached.extend(weakref.ref(t) for t in self.run.shallow.values())

    def stop_at_step_3(step, denoised, x, total_steps):
        if step == 3:
            raise Stop()

    monkeypatch.setattr(step_rehash.RehashCallState, "store", store)
    model = patch(tinyvideo, mode="adaptive", threshold=0.5)  # adaptive: deep and shallow caches
    with pytest.raises(Stop):
        sample(model, callback=stop_at_step_3)
    state = state_of(model)
    assert state.run is None
    last = state.last
    assert last.run is not None and last.run.held_bytes() == 0 and last.run.progress is None
    assert not last.run.deep and not last.run.shallow and not last.run.sketches
    assert last.report.full + last.report.rehashed == 4  # steps 0..3 ran
    gc.collect()
    assert cached and all(ref() is None for ref in cached), sum(ref() is not None for ref in cached)
