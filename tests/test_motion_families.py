"""Streamline Model Patch on every motion-model family AnimateDiff-Evolved loads, through its loaders.

Each family's motion model is a random-weight file in that family's own key format (testing/motion_families.py:
AnimateDiff v1, v2, v3, AnimateLCM, AnimateLCM-I2V, PIA, HotshotXL, AnimateDiff-SDXL; and a CameraCtrl file),
read by ADE's own loader nodes from its "animatediff_models" folder: Gen2 (Load AnimateDiff Model -> Apply
AnimateDiff Model -> Use Evolved Sampling), Gen1 (AnimateDiff Loader) and the deprecated legacy loader
(AnimateDiff Loader [Legacy], apply_v2_models_properly on and off for v2); PIA, AnimateLCM-I2V and CameraCtrl
also through their own apply nodes. What ADE detects (format, version, SD type) is checked, and so is whether
ADE samples the case in its GroupNorm hack mode (v1, PIA, both SDXL families, and v2 through the legacy loader
with apply_v2_models_properly off: every GroupNorm of the UNet takes statistics over all frames of a video).

Every case samples 2 euler steps unpatched and patched (frame_chunk about half the batch, so a slice straddles
two videos; spatial_chunk 10; no scaling with the level) from the same seed and requires
max|patched - unpatched| <= 1e-5 * max|unpatched| on CPU fp32; that the unpatched run did not touch the pack;
that the patched run made the same UNet calls, ran per-frame groups in slices smaller than the batch and the
motion modules at the first two levels in slices smaller than their positions; and that the pack logged
nothing, or, where a feature cannot be sliced (AnimateLCM-I2V image features, CameraCtrl), its one notice.

ADE builds motion modules from a fixed channel table and refuses other widths
(test_reduced_width_motion_model_is_refused). The families run on SD1.5's layout (and the smallest SDXL layout
ComfyUI detects) at the mechanics' width (testing.matrix.MECHANICS_WIDTH: a fifth of SD1.5's and SDXL's by
default, their own 320 with STREAMLINE_FULL_MATRIX=1), every part of their files (motion modules, PIA's conv_in,
AnimateLCM-I2V's image encoder, CameraCtrl's pose encoder and projections) at that width, read by ComfyUI's and
ADE's own loaders with testing.synthetic.loaders_read_width (ADE's channel tables and ComfyUI's SD15 and
Segmind_Vega entries read that width; nothing else of the loaders changes): each case costs about a second
instead of 10-30 s. A real-width mm_sd_v15_v2 goes through ADE's own channel table in tests/test_server_e2e.py
(and every family here with STREAMLINE_FULL_MATRIX=1). By default every family the pack sees as
distinct runs once (Gen2, or its own apply node; v3 and AnimateDiff-SDXL, whose motion modules are v2's without
the mid block and HotshotXL's, only in the full matrix) and the looped-uniform context windows;
STREAMLINE_FULL_MATRIX=1 adds every family through every loader (the legacy loader with apply_v2_models_properly
off on v2 too), odd frame counts, CFG 1 and standard static context windows (21 cases, about 5 minutes more).
In the full matrix the three loaders give the same samples for a family in the same mode; they differ in how
the MODEL is put together, which is what those cases check. The latent is 8x8: levels of 64, 16, 4 (and 1) positions.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
import traceback
from contextlib import contextmanager

import pytest
import torch

from comfyui_streamline.testing.matrix import MECHANICS_WIDTH

pytestmark = pytest.mark.host

LATENT = 8  # latent height = width
FRAMES = 4  # 8 samples per UNet call with CFG batched
ODD_FRAMES = 5
CTX_FRAMES, CTX_LENGTH = 6, 4
STEPS = 2
CFG = 5.0
SEED = 1234
# Two sampling steps of an SD1.5-wide UNet in fp32: the sliced and ComfyUI's forwards differ only by float32
# reductions in another order, and by how much depends on the CPU's kernels: up to 9.5e-6 on the AVX-512 machine
# these bounds were first set on, 1.01e-5 to 1.07e-5 (v2-legacy, v3, AnimateLCM, AnimateDiff-SDXL) on an AMD EPYC
# with AVX2, the same code that passed there. In float64 the two agree to 1e-14 (tests/test_video_norm.py, the
# ADE self-check), and a dropped or misapplied operation differs by 1e-3 and more.
TOL = 2e-5
SPATIAL_CHUNK = 10  # motion modules: 7 slices of 64 positions at level 0, 2 of 16 at level 1; 4 positions whole
WIDTH = MECHANICS_WIDTH  # model_channels of the families' UNets
MODULES_SLICED = 10  # per UNet call: levels 0 and 1, 2 motion modules per down block and 3 per up block
UP_MODULES_SLICED = 6
STREAMLINE_LOGGER = "ComfyUI-Streamline"
ADE_GROUPNORM_WRAPPER = "ADE_groupnormed_diffusion_model"  # ADE's DIFFUSION_MODEL wrapper of its hack mode
FULL_MATRIX = bool(os.environ.get("STREAMLINE_FULL_MATRIX"))

MEASURED: dict[str, float] = {}


# -- instrumentation ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Probe:
    # (batch, ADE's hack-mode wrapper in the call's transformer_options) of every UNet call
    unet_calls: list[tuple[int, bool]] = dataclasses.field(default_factory=list)
    in_channels: set[int] = dataclasses.field(default_factory=set)  # of the UNet's input
    hack_at_out_norm: list[bool] = dataclasses.field(default_factory=list)  # torch's GroupNorm.forward is ADE's
    frame_slices: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (batch, chunk)
    # (batch, channels, positions, chunk) of every spatially sliced motion module
    spatial_slices: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)

    def sliced_frame_groups(self) -> list[tuple[int, int]]:
        return [(b, c) for b, c in self.frame_slices if c < b]

    def sliced_motion_modules(self) -> list[tuple[int, int, int, int]]:
        return [(b, ch, p, c) for b, ch, p, c in self.spatial_slices if c < p]


@contextmanager
def probe(unet):
    """Record every UNet call and whether ADE's hack mode runs it, whether torch's GroupNorm is ADE's when
    the UNet's last GroupNorm runs as a module, and every call into the pack's chunked runners."""
    import comfy.patcher_extension

    import comfyui_streamline.families.unet.motion_module as motion_module
    import comfyui_streamline.families.unet.forward as streamlined_unet

    record = Probe()

    def unet_hook(module, args, kwargs):
        options = kwargs.get("transformer_options", {})
        wrappers = options.get("wrappers", {}).get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
        record.unet_calls.append((args[0].shape[0], bool(wrappers.get(ADE_GROUPNORM_WRAPPER))))
        record.in_channels.add(args[0].shape[1])

    def norm_hook(module, args):
        record.hack_at_out_norm.append(torch.nn.GroupNorm.forward.__name__ == "groupnorm_mm_forward")

    run_frame_chunked = streamlined_unet.run_frame_chunked
    temporal_transformer_sliced = motion_module.temporal_transformer_sliced

    def frame_spy(group, batch, chunk):
        record.frame_slices.append((batch, chunk))
        return run_frame_chunked(group, batch, chunk)

    def temporal_spy(x, parts, spatial_chunk, *args, **kwargs):
        record.spatial_slices.append((x.shape[0], x.shape[1], x.shape[-2] * x.shape[-1], spatial_chunk))
        return temporal_transformer_sliced(x, parts, spatial_chunk, *args, **kwargs)

    handles = [unet.register_forward_pre_hook(unet_hook, with_kwargs=True),
               unet.out[0].register_forward_pre_hook(norm_hook)]
    streamlined_unet.run_frame_chunked = frame_spy
    motion_module.temporal_transformer_sliced = temporal_spy
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
        streamlined_unet.run_frame_chunked = run_frame_chunked
        motion_module.temporal_transformer_sliced = temporal_transformer_sliced


def streamline_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == STREAMLINE_LOGGER and r.levelno >= logging.WARNING]


# -- models ---------------------------------------------------------------------------------------------


class Bases:
    """The random base UNet of one layout at a time (an SD1.5 UNet is 3.4 GB in fp32 at its own width)."""

    def __init__(self):
        self.layout, self.model = None, None

    def get(self, layout: str):
        from comfyui_streamline.testing.motion_families import base_model

        if layout != self.layout:
            self.clear()
            self.model, self.layout = base_model(layout, seed=0, width=WIDTH), layout
        return self.model

    def clear(self) -> None:
        self.layout, self.model = None, None
        gc.collect()


@pytest.fixture(scope="module")
def bases():
    holder = Bases()
    yield holder
    holder.clear()


@pytest.fixture(scope="module")
def motion_files(tmp_path_factory):
    from comfyui_streamline.testing.motion_families import MotionFiles

    files = MotionFiles(tmp_path_factory.mktemp("animatediff_models"), seed=1, width=WIDTH)
    yield files
    files.close()


@pytest.fixture(scope="module")
def vae():
    """An SD VAE with random weights (PIA encodes its reference image with it), through ComfyUI's VAE class."""
    import comfy.ldm.models.autoencoder
    import comfy.sd

    from comfyui_streamline.testing.motion_families import random_state_dict
    from comfyui_streamline.testing.synthetic import SD15_VAE_DDCONFIG

    state_dict = random_state_dict(lambda: comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=SD15_VAE_DDCONFIG, embed_dim=4),
                                   seed=3, dtype=torch.float32)
    return comfy.sd.VAE(sd=state_dict)


@pytest.fixture(scope="module", autouse=True)
def report_measured():
    yield
    if MEASURED:
        print("\nStreamline exactness per family (max|diff| / max|ref|): "
              + ", ".join(f"{case}: {ratio:.2e}" for case, ratio in MEASURED.items()))


def load(bases, motion_files, family_name: str, loader: str, properly: bool = True, context_options=None,
         apply_node: str | None = None, vae=None):
    """The family's file through `loader`, or for gen2 through a family's own load/apply nodes
    (`apply_node`), the loaders reading the family's width; checks what ADE detected. Returns (MODEL, Family)."""
    from comfyui_streamline.testing.motion_families import FAMILIES, motion_models_of
    from comfyui_streamline.testing.synthetic import loaders_read_width

    family = FAMILIES[family_name]
    base = bases.get(family.layout)
    name = motion_files.write(family)
    with loaders_read_width(WIDTH):
        model = _apply(base, motion_files, name, loader, properly, context_options, apply_node, vae)
    (motion_model,) = motion_models_of(model)
    info = motion_model.model.mm_info
    assert (info.mm_format, info.mm_version, info.sd_type) == (family.mm_format, family.mm_version, family.layout)
    assert motion_model.model.layer_channels[0] == WIDTH
    return model, family


def _apply(base, motion_files, name: str, loader: str, properly: bool, context_options, apply_node: str | None, vae):
    from comfyui_streamline.testing.motion_families import apply_motion_model, run_node

    m_models = None
    if apply_node == "ADE_ApplyAnimateDiffModelWithPIA":
        (motion,) = run_node("ADE_LoadAnimateDiffModel", model_name=name)
        image = torch.rand(1, LATENT * 8, LATENT * 8, 3, generator=torch.Generator().manual_seed(5))
        (m_models,) = run_node(apply_node, motion_model=motion, image=image, vae=vae)
    elif apply_node == "ADE_ApplyAnimateLCMI2VModel":
        (motion,) = run_node("ADE_LoadAnimateDiffModel", model_name=name)
        ref = {"samples": torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(6))}
        (m_models,) = run_node(apply_node, motion_model=motion, ref_latent=ref)
    elif apply_node == "ADE_ApplyAnimateDiffModelWithCameraCtrl":
        (motion,) = run_node("ADE_LoadAnimateDiffModelWithCameraCtrl", model_name=name,
                             camera_ctrl=motion_files.write_cameractrl())
        (poses,) = run_node("ADE_CameraPoseBasic", motion_type="Pan Left", speed=1.0, frame_length=FRAMES)
        (m_models,) = run_node(apply_node, motion_model=motion, cameractrl_poses=poses)
    elif apply_node is not None:
        raise ValueError(apply_node)
    return apply_motion_model(base, name, loader, apply_v2_properly=properly, context_options=context_options,
                              m_models=m_models)


# -- sampling -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What one case measured: the unpatched and patched samples, what ran, what the pack logged."""

    case: str
    width: int  # the UNet's model_channels
    batch: int  # samples per UNet call
    frame_chunk: int
    ref: torch.Tensor
    out: torch.Tensor
    ref_record: Probe
    record: Probe
    ref_warnings: list[str]
    warnings: list[str]
    seconds: tuple[float, float]  # sampling unpatched, patched


def sample(model, layout: str, frames: int, cfg: float) -> tuple[torch.Tensor, Probe]:
    import nodes

    from comfyui_streamline.testing.motion_families import conditioning

    positive, negative = conditioning(layout, seed=11), conditioning(layout, seed=12)
    latent = {"samples": torch.zeros(frames, 4, LATENT, LATENT)}
    with torch.inference_mode(), probe(model.model.diffusion_model) as record:
        (out,) = nodes.common_ksampler(model, SEED, STEPS, cfg, "euler", "normal", positive, negative, latent)
    return out["samples"].clone(), record


def run_case(case: str, model, layout: str, width: int, caplog, frames: int = FRAMES, cfg: float = CFG,
             window: int | None = None) -> Outcome:
    """Sample `model` unpatched, then patched with Streamline Model Patch: frame slices of half the batch
    plus one (a slice straddles the boundary between two videos), SPATIAL_CHUNK positions."""
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    batch = (window or frames) * (1 if cfg == 1.0 else 2)
    frame_chunk = batch // 2 + 1
    start = time.perf_counter()
    ref, ref_record = sample(model, layout, frames, cfg)
    middle = time.perf_counter()
    ref_warnings = streamline_warnings(caplog)
    patched = StreamlineModelPatch.execute(model=model, frame_chunk=frame_chunk, spatial_chunk=SPATIAL_CHUNK,
                                           scale_with_level=False).result[0]
    assert patched is not model
    out, record = sample(patched, layout, frames, cfg)
    return Outcome(case, width, batch, frame_chunk, ref, out, ref_record, record, ref_warnings,
                   streamline_warnings(caplog)[len(ref_warnings):], (middle - start, time.perf_counter() - middle))


def measure(bases, motion_files, caplog, case: str, family_name: str, loader: str = "gen2", properly: bool = True,
            context_options=None, apply_node: str | None = None, vae=None, **sampling):
    """Load and run one case; returns (Outcome, Family). The models live only while this runs: a case that
    raises leaves no frame holding them (a loaded motion model is 1.8 GB)."""

    def run():
        model, family = load(bases, motion_files, family_name, loader, properly, context_options, apply_node, vae)
        return run_case(case, model, family.layout, WIDTH, caplog, **sampling), family

    try:
        return run()
    except BaseException as e:
        traceback.clear_frames(e.__traceback__.tb_next)
        raise


def check(o: Outcome, hack: bool, sliced_per_call: int = MODULES_SLICED, notices: tuple[str, ...] = ()) -> None:
    """The case ran as intended (unpatched: no pack code, ADE's hack mode as expected; patched: the same UNet
    calls, per-frame groups in slices, `sliced_per_call` motion modules per call in spatial slices), the pack
    logged only `notices` (once each), and the result is exact."""
    ref_batches = [b for b, _ in o.ref_record.unet_calls]
    assert ref_batches and set(ref_batches) == {o.batch}, ref_batches
    assert {h for _, h in o.ref_record.unet_calls} == {hack}, f"ADE's GroupNorm hack: {o.ref_record.unet_calls}"
    assert set(o.ref_record.hack_at_out_norm) == {hack}, o.ref_record.hack_at_out_norm
    assert not o.ref_record.frame_slices and not o.ref_record.spatial_slices, "the unpatched reference ran Streamline code"
    assert not o.ref_warnings, o.ref_warnings

    assert o.record.unet_calls == o.ref_record.unet_calls
    frame_slices = sorted(set(o.record.frame_slices))
    assert frame_slices and {b for b, _ in frame_slices} == {o.batch}, frame_slices
    assert {c for _, c in o.record.sliced_frame_groups()} == {o.frame_chunk} and o.frame_chunk < o.batch, frame_slices
    sliced = o.record.sliced_motion_modules()
    assert {ch for _, ch, _, _ in sliced} == ({o.width, 2 * o.width} if sliced_per_call else set()), sorted(set(o.record.spatial_slices))
    assert {c for *_, c in sliced} <= {SPATIAL_CHUNK}, sorted(set(o.record.spatial_slices))
    assert len(sliced) == sliced_per_call * len(o.record.unet_calls), sorted(set(o.record.spatial_slices))
    assert len(o.warnings) == len(notices) and all(any(n in w for w in o.warnings) for n in notices), o.warnings

    assert o.out.shape == o.ref.shape and o.out.dtype == o.ref.dtype == torch.float32
    assert torch.isfinite(o.ref).all() and o.ref.abs().max() > 0
    diff = (o.out - o.ref).abs().max().item()
    ratio = diff / o.ref.abs().max().item()
    MEASURED[o.case] = ratio
    print(f"\n[{o.case}, width {o.width}] max|diff| = {diff:.3e}, max|ref| = {o.ref.abs().max().item():.3e}, ratio = {ratio:.3e} "
          f"(sampling {o.seconds[0]:.1f} s unpatched, {o.seconds[1]:.1f} s patched)")
    assert ratio <= TOL, f"{o.case}: max|patched - unpatched| / max|unpatched| = {ratio:.3e} > {TOL:.0e}"


# -- what ADE accepts -----------------------------------------------------------------------------------


def test_reduced_width_motion_model_is_refused(tmp_path):
    """ADE builds motion modules from a fixed channel table (320/640/1280[/1280], mid 1280), not from the
    file's shapes: a motion model for a narrower UNet does not load. Hence loaders_read_width for the narrow
    families here."""
    import folder_paths
    from animatediff.utils_model import Folders
    from safetensors.torch import save_file

    from comfyui_streamline.testing.motion_families import reduced_width_state_dict, run_node

    save_file(reduced_width_state_dict((32, 64, 128, 128)), str(tmp_path / "narrow.safetensors"))
    folder_paths.add_model_folder_path(Folders.ANIMATEDIFF_MODELS, str(tmp_path))
    try:
        with pytest.raises(RuntimeError, match="size mismatch"):
            run_node("ADE_LoadAnimateDiffModel", model_name="narrow.safetensors")
    finally:
        folder_paths.folder_names_and_paths[Folders.ANIMATEDIFF_MODELS][0].remove(str(tmp_path))


# -- every family, every loader -------------------------------------------------------------------------

FULL_MATRIX_ONLY = pytest.mark.skipif(not FULL_MATRIX, reason="covered by the default cases; all: STREAMLINE_FULL_MATRIX=1")


# Families whose motion modules are, to the pack, another family's: v3 is v2 without the mid block (v1 has none
# either), AnimateDiff-SDXL is HotshotXL's layout in other key names (ADE converts them). Full matrix only.
FULL_MATRIX_FAMILIES = {"v3", "AnimateDiff-SDXL"}


def loader_cases(layout: str) -> list:
    """(family, loader, apply_v2_models_properly) cases. By default each family once through Gen2 (PIA: with
    its image, test_pia_*; not FULL_MATRIX_FAMILIES); every family through every loader (the legacy loader with
    apply_v2_models_properly off too) with STREAMLINE_FULL_MATRIX."""
    from comfyui_streamline.testing.motion_families import FAMILIES

    also_by_default = set()
    cases = []
    for family in FAMILIES.values():
        if family.layout != layout or family.extra == "i2v":  # AnimateLCM-I2V: test_animatelcm_i2v_*
            continue
        for loader, properly in (("gen2", True), ("gen1", True), ("legacy", True), ("legacy", False)):
            if loader == "legacy" and not properly and family.name != "v2":
                continue
            runs = ((loader == "gen2" and family.extra != "pia" and family.name not in FULL_MATRIX_FAMILIES)
                    or (family.name, loader, properly) in also_by_default)
            cases.append(pytest.param(family.name, loader, properly, marks=() if runs else FULL_MATRIX_ONLY,
                                      id=case_id(family.name, loader, properly)))
    return cases


def case_id(family: str, loader: str, properly: bool) -> str:
    if family == "v2" and loader == "legacy":
        return f"v2-legacy-properly_{'on' if properly else 'off'}"
    return f"{family}-{loader}"


@pytest.mark.parametrize("family_name, loader, properly", loader_cases("SD1.5"))
def test_sd15_family_matches_unpatched(bases, motion_files, caplog, family_name, loader, properly):
    outcome, family = measure(bases, motion_files, caplog, case_id(family_name, loader, properly), family_name, loader,
                              properly)
    check(outcome, hack=family.groupnorm_hack(loader, properly))


def test_pia_with_reference_image_matches_unpatched(bases, motion_files, vae, caplog):
    """PIA as meant: Apply AnimateDiff-PIA Model with a reference image and a VAE; ADE swaps the UNet's first
    convolution for PIA's 9-channel one and feeds the encoded image and a mask as c_concat."""
    outcome, _ = measure(bases, motion_files, caplog, "PIA-image", "PIA", apply_node="ADE_ApplyAnimateDiffModelWithPIA",
                         vae=vae)
    assert outcome.ref_record.in_channels == outcome.record.in_channels == {9}  # latent, mask, encoded image
    check(outcome, hack=True)


def test_animatelcm_i2v_matches_unpatched(bases, motion_files, caplog):
    """AnimateLCM-I2V as meant: Apply AnimateLCM-I2V Model with a reference latent. Its image features enter
    the down blocks' motion modules, which then run unsliced (one notice); the up blocks' stay sliced."""
    outcome, _ = measure(bases, motion_files, caplog, "AnimateLCM-I2V", "AnimateLCM-I2V",
                         apply_node="ADE_ApplyAnimateLCMI2VModel")
    check(outcome, hack=False, sliced_per_call=UP_MODULES_SLICED, notices=("AnimateLCM-I2V image features",))


@pytest.mark.filterwarnings("ignore:Using torch.cross without specifying the dim arg")  # ADE's pose embedding
def test_cameractrl_matches_unpatched(bases, motion_files, caplog):
    """CameraCtrl on v3: Load AnimateDiff+CameraCtrl Model, Apply AnimateDiff+CameraCtrl Model with poses from
    Create CameraCtrl Poses. Camera features enter every motion module, which then run unsliced (one notice);
    the per-frame layers stay sliced."""
    outcome, _ = measure(bases, motion_files, caplog, "v3-CameraCtrl", "v3",
                         apply_node="ADE_ApplyAnimateDiffModelWithCameraCtrl")
    check(outcome, hack=False, sliced_per_call=0, notices=("CameraCtrl",))


# -- batches the hack mode must get right: odd frame counts, single-cond calls, context windows --------


@FULL_MATRIX_ONLY  # slices that split videos in hack mode: tests/test_video_norm.py's f3 cases check the same
def test_odd_frame_count_matches_unpatched(bases, motion_files, caplog):
    """v1 (hack mode), 5 frames: 10 samples with CFG, slices of 6 and 4 samples."""
    outcome, _ = measure(bases, motion_files, caplog, "v1-5-frames", "v1", frames=ODD_FRAMES)
    check(outcome, hack=True)


@FULL_MATRIX_ONLY  # single-video calls in hack mode: tests/test_video_norm.py's single-cond cases check the same
def test_cfg_1_matches_unpatched(bases, motion_files, caplog):
    """v1 (hack mode), CFG 1: ComfyUI leaves out the uncond, each UNet call holds a single video."""
    outcome, _ = measure(bases, motion_files, caplog, "v1-cfg1", "v1", cfg=1.0)
    check(outcome, hack=True)


@pytest.mark.parametrize("schedule", [pytest.param("standard_static", marks=FULL_MATRIX_ONLY), "looped_uniform"])
def test_context_windows_in_hack_mode_match_unpatched(bases, motion_files, caplog, schedule):
    """ADE's context windows on v1 (hack mode): the UNet runs per window and the hack takes its statistics
    per window. Standard static: [0-3], [2-5]; looped uniform (closed loop): [0-3], [3, 4, 5, 0]."""
    from animatediff.context import get_context_windows

    from comfyui_streamline.testing.motion_families import run_node

    if schedule == "standard_static":
        (options,) = run_node("ADE_StandardStaticContextOptions", context_length=CTX_LENGTH, context_overlap=2)
    else:
        (options,) = run_node("ADE_LoopedUniformContextOptions", context_length=CTX_LENGTH, context_stride=1,
                              context_overlap=1, closed_loop=True)
    windows = get_context_windows(CTX_FRAMES, options.contexts[0])
    assert len(windows) == 2 and all(len(w) == CTX_LENGTH for w in windows), windows
    assert schedule == "standard_static" or any(list(w) != sorted(w) for w in windows), windows  # wraps around
    outcome, _ = measure(bases, motion_files, caplog, f"v1-context-{schedule}", "v1", context_options=options,
                         frames=CTX_FRAMES, window=CTX_LENGTH)
    check(outcome, hack=True)
    assert len(outcome.ref_record.unet_calls) == STEPS * len(windows), outcome.ref_record.unet_calls


# -- SDXL families (the SDXL-layout UNet replaces the SD1.5 one from here on) ----------------------------


@pytest.mark.parametrize("family_name, loader, properly", loader_cases("SDXL"))
def test_sdxl_family_matches_unpatched(bases, motion_files, caplog, family_name, loader, properly):
    outcome, family = measure(bases, motion_files, caplog, case_id(family_name, loader, properly), family_name, loader,
                              properly)
    check(outcome, hack=family.groupnorm_hack(loader, properly))
