"""Exactness of the Streamline patch through ComfyUI's real sampling path with AnimateDiff-Evolved.

Everything a user's graph would touch is real: the SD1.5-shaped UNet goes through ComfyUI's diffusion
model loader, the motion model is a safetensors file that ADE's own loader reads from its
"animatediff_models" folder, the motion model is applied with ADE's Gen2 nodes (and context windows
with ADE's context options node), the ControlNet goes through ComfyUI's ControlNet loader and
ControlNetApplyAdvanced, and sampling runs through nodes.common_ksampler (what KSampler runs) under
inference mode, as ComfyUI's executor does. Only the weights are random (nothing can be downloaded).

Each case samples patched and unpatched from the same seed and requires
max|patched - unpatched| <= 1e-5 * max|unpatched| on CPU fp32, and proves that slicing really
happened (spies on the pack's chunked runners, chunk smaller than the batch / the positions), that
the unpatched reference did not run the pack at all, and that the pack logged no fallback warning.

The latent is 8x8 (a 64x64 image), not 16x16: an SD1.5 UNet call on 8 samples at 16x16 takes about
10 s on 2 CPU cores, at 8x8 a few seconds, and 8x8 still gives four UNet levels (8, 4, 2, 1) with
slicing at the first two. The UNet, motion model and ControlNet have SD1.5's layout at a fifth of its width
(WIDTH, testing/matrix.py): the same blocks, levels and motion modules through the same loaders, each call ~16x
faster; tests/test_server_e2e.py runs real-width SD1.5 through these loaders, and STREAMLINE_FULL_MATRIX=1 runs
this file (and tests/test_motion_families.py's SD1.5 families) at the real width too.
"""
from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager

import pytest
import torch

from comfyui_streamline.testing.matrix import MECHANICS_WIDTH

pytestmark = pytest.mark.host

LATENT = 8  # latent height = width
FRAMES = 4  # 8 samples per UNet call with CFG batched
CTX_FRAMES, CTX_LENGTH, CTX_OVERLAP = 6, 4, 2  # two overlapping ADE context windows
STEPS = 2
CFG = 5.0
SEED = 1234
TOL = 1e-5
MM_NAME = "streamline-test-mm_sd_v15_v2.safetensors"
# SD1.5's layout at a fifth of its width through the same loaders (testing/matrix.py; real-width SD1.5 through them:
# tests/test_server_e2e.py, and here with STREAMLINE_FULL_MATRIX=1)
WIDTH = MECHANICS_WIDTH
STREAMLINE_LOGGER = "ComfyUI-Streamline"

MEASURED: dict[str, float] = {}  # case -> max|diff| / max|ref|, printed at the end of the module


# -- instrumentation ----------------------------------------------------------------------------------


@dataclasses.dataclass
class UnetCall:
    batch: int
    context_tokens: int | None
    has_control: bool


@dataclasses.dataclass
class Probe:
    unet_calls: list[UnetCall] = dataclasses.field(default_factory=list)
    frame_slices: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (batch, chunk)
    # (batch, channels, positions, chunk) of every spatially sliced motion module
    spatial_slices: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)

    def sliced_frame_groups(self) -> list[tuple[int, int]]:
        return [(b, c) for b, c in self.frame_slices if c < b]

    def sliced_motion_modules(self) -> list[tuple[int, int, int, int]]:
        return [(b, ch, p, c) for b, ch, p, c in self.spatial_slices if c < p]


@contextmanager
def probe(diffusion_model):
    """Record every UNet call (a forward pre-hook on the shared UNetModel, so patched and unpatched
    calls are seen alike) and every call into the pack's chunked runners."""
    import comfyui_streamline.families.unet.motion_module as motion_module
    import comfyui_streamline.families.unet.forward as streamlined_unet

    record = Probe()

    def pre_hook(module, args, kwargs):
        x = args[0]
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        control = kwargs.get("control", args[4] if len(args) > 4 else None)
        record.unet_calls.append(UnetCall(x.shape[0], None if context is None else context.shape[1], control is not None))

    run_frame_chunked = streamlined_unet.run_frame_chunked
    temporal_transformer_sliced = motion_module.temporal_transformer_sliced

    def frame_spy(group, batch, chunk):
        record.frame_slices.append((batch, chunk))
        return run_frame_chunked(group, batch, chunk)

    def temporal_spy(x, parts, spatial_chunk, out=None, effect=None, **kwargs):
        record.spatial_slices.append((x.shape[0], x.shape[1], x.shape[-2] * x.shape[-1], spatial_chunk))
        return temporal_transformer_sliced(x, parts, spatial_chunk, out=out, effect=effect, **kwargs)

    handle = diffusion_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    streamlined_unet.run_frame_chunked = frame_spy
    motion_module.temporal_transformer_sliced = temporal_spy
    try:
        yield record
    finally:
        handle.remove()
        streamlined_unet.run_frame_chunked = run_frame_chunked
        motion_module.temporal_transformer_sliced = temporal_transformer_sliced


def relative_diff(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max|out - ref| / max|ref|, max|out - ref|)."""
    diff = (out - ref).abs().max().item()
    return diff / ref.abs().max().item(), diff


def assert_exact(case: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype == torch.float32
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    ratio, diff = relative_diff(out, ref)
    MEASURED[case] = ratio
    print(f"\n[{case}] max|diff| = {diff:.3e}, max|ref| = {ref.abs().max().item():.3e}, ratio = {ratio:.3e}")
    assert ratio <= TOL, f"{case}: max|patched - unpatched| / max|unpatched| = {ratio:.3e} > {TOL:.0e} (max|diff| {diff:.3e})"


def assert_streamline_quiet(caplog) -> None:
    records = [r for r in caplog.records if r.name == STREAMLINE_LOGGER and r.levelno >= logging.WARNING]
    assert not [r for r in records if "running it unchanged" in r.getMessage()], [r.getMessage() for r in records]
    assert not records, "Streamline fell back somewhere: " + "; ".join(r.getMessage() for r in records)


def assert_model_untouched(model) -> None:
    import comfy.patcher_extension

    assert "streamline" not in model.model_options.get("transformer_options", {})
    assert not model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "streamline")


# -- models (built once per module) -------------------------------------------------------------------


def run_node(mapping: dict, name: str, **inputs):
    """Call a legacy (V1) node the way ComfyUI's executor does: cls().<FUNCTION>(**inputs)."""
    cls = mapping[name]
    return getattr(cls(), cls.FUNCTION)(**inputs)


@pytest.fixture(scope="module")
def base_model():
    """SD1.5-layout UNet with random weights (WIDTH), through ComfyUI's diffusion-model loader."""
    from comfyui_streamline.testing.synthetic import load_sd15

    patcher = load_sd15(WIDTH, seed=0)
    assert patcher.model.get_dtype() == torch.float32
    yield patcher


@pytest.fixture(scope="module")
def ade_nodes():
    import animatediff.nodes

    return animatediff.nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def motion_model(tmp_path_factory, ade_nodes):
    """The random mm_sd_v15_v2 file, registered in folder_paths and read by ADE_LoadAnimateDiffModel."""
    import folder_paths
    from animatediff.utils_model import Folders
    from safetensors.torch import save_file

    from comfyui_streamline.testing.synthetic import loaders_read_width, mm_sd15_v2_state_dict

    folder = tmp_path_factory.mktemp("animatediff_models")
    save_file(mm_sd15_v2_state_dict(pe_len=32, seed=1, width=WIDTH), str(folder / MM_NAME))
    folder_paths.add_model_folder_path(Folders.ANIMATEDIFF_MODELS, str(folder))
    try:
        with loaders_read_width(WIDTH):
            (motion,) = run_node(ade_nodes, "ADE_LoadAnimateDiffModel", model_name=MM_NAME)
        assert motion.model.mm_info.mm_version == "v2"
        (m_models,) = run_node(ade_nodes, "ADE_ApplyAnimateDiffModelSimple", motion_model=motion)
        yield m_models
    finally:
        folder_paths.folder_names_and_paths[Folders.ANIMATEDIFF_MODELS][0].remove(str(folder))


@pytest.fixture(scope="module")
def ade_model(base_model, motion_model, ade_nodes):
    from animatediff.utils_model import BetaSchedules

    (model,) = run_node(ade_nodes, "ADE_UseEvolvedSampling", model=base_model,
                        beta_schedule=BetaSchedules.AUTOSELECT, m_models=motion_model)
    return model


@pytest.fixture(scope="module")
def ade_context_model(base_model, motion_model, ade_nodes):
    from animatediff.utils_model import BetaSchedules

    (context_options,) = run_node(ade_nodes, "ADE_StandardStaticContextOptions",
                                  context_length=CTX_LENGTH, context_overlap=CTX_OVERLAP)
    (model,) = run_node(ade_nodes, "ADE_UseEvolvedSampling", model=base_model, beta_schedule=BetaSchedules.AUTOSELECT,
                        m_models=motion_model, context_options=context_options)
    return model, context_options


@pytest.fixture(scope="module")
def controlnet():
    """An SD1.5-shaped ControlNet (random weights, random zero convs), through ComfyUI's ControlNet loader."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    from comfyui_streamline.testing.synthetic import loaders_read_width
    from comfyui_streamline.testing.weights import randomize_

    net = comfy.cldm.cldm.ControlNet(
        image_size=32, in_channels=4, model_channels=WIDTH, hint_channels=3, num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4], use_spatial_transformer=True, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_middle=1, context_dim=768, num_heads=8, num_head_channels=-1, legacy=False,
        use_linear_in_transformer=False, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init,
    )
    state_dict = randomize_(net, seed=2).state_dict()
    del net
    with loaders_read_width(WIDTH):
        control = comfy.controlnet.load_controlnet_state_dict(state_dict)
    del state_dict
    assert isinstance(control, comfy.controlnet.ControlNet)
    return control


# -- conditioning and sampling --------------------------------------------------------------------------


def conditioning(tokens: int, seed: int) -> list:
    """CONDITIONING as CLIPTextEncode returns it: [[cross-attention tokens, extras]]."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 768, generator=g), {}]]


POSITIVE = conditioning(77, seed=11)
NEGATIVE = conditioning(77, seed=12)
# A long negative prompt (5 x 77 tokens): ComfyUI pads cross-attention by repetition only up to 4x, so
# cond and uncond cannot be concatenated and run as separate UNet calls.
NEGATIVE_LONG = conditioning(5 * 77, seed=13)


def sample(model, positive, negative, frames: int) -> tuple[torch.Tensor, Probe]:
    import nodes

    latent = {"samples": torch.zeros(frames, 4, LATENT, LATENT)}
    with torch.inference_mode(), probe(model.model.diffusion_model) as record:
        (out,) = nodes.common_ksampler(model, SEED, STEPS, CFG, "euler", "normal", positive, negative, latent)
    return out["samples"].clone(), record


def reference(model, positive, negative, frames: int) -> tuple[torch.Tensor, Probe]:
    """The unpatched run; it must not touch the pack at all."""
    assert_model_untouched(model)
    samples, record = sample(model, positive, negative, frames)
    assert not record.frame_slices and not record.spatial_slices, "the unpatched reference ran Streamline code"
    return samples, record


def patch(model, frame_chunk: int, spatial_chunk: int, scale_with_level: bool):
    """Apply the node as the graph would, and check the input MODEL is left as it was."""
    import comfy.patcher_extension

    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    kinds = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    options_before = dict(model.model_options["transformer_options"])
    wrappers_before = {k: list(v) for k, v in model.wrappers.get(kinds, {}).items()}
    out = StreamlineModelPatch.execute(model=model, frame_chunk=frame_chunk, spatial_chunk=spatial_chunk,
                                       scale_with_level=scale_with_level)
    (patched,) = out.result
    assert patched is not model
    assert_model_untouched(model)
    assert model.model_options["transformer_options"] == options_before
    assert {k: list(v) for k, v in model.wrappers.get(kinds, {}).items()} == wrappers_before
    assert patched.get_wrappers(kinds, "streamline") and "streamline" in patched.model_options["transformer_options"]
    return patched


def assert_sliced(record: Probe, frame_chunk: int, spatial_chunk: int, scale_with_level: bool) -> None:
    """Slicing really ran, with the configured sizes at full resolution and, with scale_with_level,
    other sizes at deeper levels (more samples per slice, fewer positions per slice)."""
    frame_groups, motion_modules = record.sliced_frame_groups(), record.sliced_motion_modules()
    assert frame_groups, f"no per-frame group ran in slices: {sorted(set(record.frame_slices))}"
    assert motion_modules, f"no motion module ran in spatial slices: {sorted(set(record.spatial_slices))}"
    # scaled: a group with more channels at full resolution (an output block's input with its skip)
    # gets proportionally fewer samples per slice, so frame_chunk is the most the top level gets
    assert min(c for _, c in frame_groups) <= frame_chunk
    top = [c for _, ch, _, c in motion_modules if ch == WIDTH]
    deep = [c for _, ch, _, c in motion_modules if ch > WIDTH]
    assert top and set(top) == {spatial_chunk}, sorted(set(record.spatial_slices))
    assert deep, f"no motion module below full resolution ran in slices: {sorted(set(record.spatial_slices))}"
    if scale_with_level:
        assert max(c for _, c in record.frame_slices) > frame_chunk
        assert all(c == spatial_chunk * WIDTH // ch for _, ch, _, c in motion_modules), sorted(set(motion_modules))
    else:
        assert all(c == min(frame_chunk, b) for b, c in record.frame_slices), sorted(set(record.frame_slices))
        assert set(deep) == {spatial_chunk}


def assert_same_unet_calls(patched: Probe, ref: Probe) -> None:
    assert patched.unet_calls == ref.unet_calls


# -- references (unpatched), shared -------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_reference(ade_model):
    return reference(ade_model, POSITIVE, NEGATIVE, FRAMES)


@pytest.fixture(scope="module", autouse=True)
def report_measured():
    yield
    if MEASURED:
        print("\nStreamline exactness (max|diff| / max|ref|): "
              + ", ".join(f"{case}: {ratio:.2e}" for case, ratio in MEASURED.items()))


# -- cases ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame_chunk, spatial_chunk, scale_with_level",
    [
        (3, 7, False),  # 3 does not divide 8 samples; 7 divides neither 64 nor 16 positions; every level
        (3, 24, True),  # scaled: 3/6 samples, 24/12/6 positions per slice at levels 0/1/2
        (5, 13, False),
    ],
)
def test_cfg_batched_matches_unpatched(ade_model, plain_reference, caplog, frame_chunk, spatial_chunk, scale_with_level):
    """(a) + (e): cond and uncond in one UNet call; chunk sizes that do not divide the batch or the positions."""
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    ref, ref_record = plain_reference
    assert len(ref_record.unet_calls) == STEPS
    assert all(c.batch == 2 * FRAMES for c in ref_record.unet_calls), ref_record.unet_calls  # CFG batched

    patched = patch(ade_model, frame_chunk, spatial_chunk, scale_with_level)
    out, record = sample(patched, POSITIVE, NEGATIVE, FRAMES)

    assert_same_unet_calls(record, ref_record)
    assert_sliced(record, frame_chunk, spatial_chunk, scale_with_level)
    assert_streamline_quiet(caplog)
    assert_exact(f"cfg-batched fc={frame_chunk} sc={spatial_chunk} scale={scale_with_level}", out, ref)
    assert_model_untouched(ade_model)


def test_cfg_unbatched_matches_unpatched(ade_model, caplog):
    """(b): cond and uncond in separate UNet calls (their token counts cannot be concatenated)."""
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    ref, ref_record = reference(ade_model, POSITIVE, NEGATIVE_LONG, FRAMES)
    assert len(ref_record.unet_calls) == 2 * STEPS, ref_record.unet_calls
    assert all(c.batch == FRAMES for c in ref_record.unet_calls), ref_record.unet_calls
    assert sorted({c.context_tokens for c in ref_record.unet_calls}) == [77, 5 * 77]

    patched = patch(ade_model, frame_chunk=3, spatial_chunk=7, scale_with_level=False)
    out, record = sample(patched, POSITIVE, NEGATIVE_LONG, FRAMES)

    assert_same_unet_calls(record, ref_record)
    assert_sliced(record, 3, 7, False)
    assert all(b == FRAMES for b, _ in record.frame_slices)  # the slices are of a single-cond batch
    assert_streamline_quiet(caplog)
    assert_exact("cfg-unbatched", out, ref)


def test_context_windows_match_unpatched(ade_context_model, caplog):
    """(c): ADE's sliding context windows (StandardStatic, overlapping), UNet runs per window."""
    from animatediff.context import get_context_windows

    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    model, context_options = ade_context_model
    windows = get_context_windows(CTX_FRAMES, context_options.contexts[0])
    assert len(windows) >= 2 and all(len(w) == CTX_LENGTH for w in windows)
    assert len(set().union(*map(set, windows))) == CTX_FRAMES and sum(map(len, windows)) > CTX_FRAMES  # overlap

    ref, ref_record = reference(model, POSITIVE, NEGATIVE, CTX_FRAMES)
    assert len(ref_record.unet_calls) == STEPS * len(windows), ref_record.unet_calls
    assert all(c.batch == 2 * CTX_LENGTH < 2 * CTX_FRAMES for c in ref_record.unet_calls), ref_record.unet_calls

    patched = patch(model, frame_chunk=3, spatial_chunk=7, scale_with_level=False)
    out, record = sample(patched, POSITIVE, NEGATIVE, CTX_FRAMES)

    assert_same_unet_calls(record, ref_record)
    assert_sliced(record, 3, 7, False)
    assert all(b == 2 * CTX_LENGTH for b, _ in record.frame_slices)
    assert_streamline_quiet(caplog)
    assert_exact("context-windows", out, ref)


def test_controlnet_residuals_match_unpatched(ade_model, controlnet, plain_reference, caplog):
    """(d): a real ControlNet applied with ControlNetApplyAdvanced; its residuals reach every level."""
    import nodes

    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    hint = torch.rand(1, LATENT * 8, LATENT * 8, 3, generator=torch.Generator().manual_seed(21))
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(POSITIVE, NEGATIVE, controlnet, hint, 1.0, 0.0, 1.0)

    ref, ref_record = reference(ade_model, positive, negative, FRAMES)
    assert len(ref_record.unet_calls) == STEPS
    assert all(c.has_control and c.batch == 2 * FRAMES for c in ref_record.unet_calls), ref_record.unet_calls
    plain, _ = plain_reference
    control_effect, _ = relative_diff(ref, plain)
    print(f"\n[controlnet] effect of the control residuals: max|diff| / max|ref| = {control_effect:.3e}")
    assert control_effect > 1e-2, "the ControlNet residuals did not change the output; the case could not fail"

    patched = patch(ade_model, frame_chunk=3, spatial_chunk=7, scale_with_level=False)
    out, record = sample(patched, positive, negative, FRAMES)

    assert_same_unet_calls(record, ref_record)
    assert_sliced(record, 3, 7, False)
    assert_streamline_quiet(caplog)
    assert_exact("controlnet", out, ref)
