"""The Wan subclasses ComfyUI builds with their own forward_orig, through the pack's nodes.

VaceWanModel, CameraWanModel, WanModel_S2V, HumoWanModel (comfy/ldm/wan/model.py) and AnimateWanModel
(comfy/ldm/wan/model_animate.py), each a tiny random-weight model built from the real class and loaded
through ComfyUI's loader (tools/model_families.py WAN_SUBCLASS_VARIANTS: detection picks the variant from
the keys), sampled with nodes.common_ksampler with the conds each variant reads (VACE frames and
strength, camera conditions, S2V and HuMo audio, Animate's pose latents and face crops); plain WanModel
(Wan 2.1 t2v) is the control. What the pack does with each (nodes/wan/patch.py WAN_SUBCLASSES):

- Streamline Model Patch: VACE, Camera and Animate are sliced (their blocks are plain WanAttentionBlocks
  and their hook hands the replacement what it reads): within 1e-5 of the plain output, slicing ran, no
  warning. S2V (its hook passes no transformer_options) and HuMo (WanAttentionBlockAudio blocks) run
  unchanged: bit-identical, one warning naming the model.
- Step Rehash: Camera adds nothing to x between its blocks, so its split is exact (the mechanics:
  the rehashed step runs only the shallow blocks). VACE (hints), S2V (audio) and Animate (face adapter)
  add to x after some blocks, outside the blocks a rehash step skips: every step runs in full,
  bit-identical to the plain output, with one warning saying why. HuMo is left to ComfyUI likewise.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from contextlib import contextmanager

import pytest
import torch

pytestmark = pytest.mark.host

STEPS = 4  # fixed schedule (warm-up 1, interval 2, tail 1): full 0, 1, 3; rehashed 2
REHASHED_STEPS = [2]
SEED, CFG, TOL = 7, 5.0, 1e-5
STREAMLINE_LOGGER = "ComfyUI-Streamline"
CONTROL = "WAN21_T2V"
VARIANTS = [CONTROL, "WAN21_Vace", "WAN21_Camera", "WAN22_S2V", "WAN21_HuMo", "WAN22_Animate"]
MODEL_CLASS = {CONTROL: "WanModel", "WAN21_Vace": "VaceWanModel", "WAN21_Camera": "CameraWanModel",
               "WAN22_S2V": "WanModel_S2V", "WAN21_HuMo": "HumoWanModel", "WAN22_Animate": "AnimateWanModel"}
# sliced, but not planned: work outside the sliced blocks the Wan laws do not count (nodes/families.py)
UNPLANNED = ("WAN21_Vace", "WAN22_Animate")
REHASH_SETTINGS = dict(rehash_mode="fixed", interval=2, warmup_steps=1, tail_steps=1, threshold=0.15, full_steps=3,
                       cache_block=-1, start_percent=0.0, end_percent=1.0, reuse="extrapolate")


def spec_of(name: str):
    from comfyui_streamline.tools.model_families import FAMILIES, WAN_SUBCLASS_VARIANTS, wan

    if name == CONTROL:
        return dataclasses.replace(FAMILIES[CONTROL], build=functools.partial(wan, num_layers=4))
    return WAN_SUBCLASS_VARIANTS[name]


@functools.lru_cache(maxsize=1)
def loaded(name: str):
    from comfyui_streamline.tools.model_families import load

    return load(spec_of(name))


def sample(model, name: str) -> torch.Tensor:
    import nodes

    spec = spec_of(name)
    positive, negative = spec.conds()
    with torch.inference_mode():
        (out,) = nodes.common_ksampler(model, SEED, STEPS, CFG, "euler", "normal", positive, negative, spec.latent())
    return out["samples"].clone()


@functools.lru_cache(maxsize=1)
def plain(name: str) -> torch.Tensor:
    out = sample(loaded(name), name)
    assert torch.isfinite(out).all() and out.abs().max() > 0.1
    return out


@pytest.fixture(params=VARIANTS)
def variant(request):
    """(name, Family, MODEL, plain output), one variant at a time."""
    name = request.param
    return name, spec_of(name), loaded(name), plain(name)


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@contextmanager
def sliced_calls():
    """(tokens, chunk) of every Wan block the pack slices."""
    from comfyui_streamline.nodes.wan import patch as wan_patch

    seen, real = [], wan_patch.sliced_block_forward

    def spy(block, x, *args):
        seen.append((x.shape[1], args[-1]))
        return real(block, x, *args)

    wan_patch.sliced_block_forward = spy
    try:
        yield seen
    finally:
        wan_patch.sliced_block_forward = real


@contextmanager
def block_steps(model):
    """[(step, block index)] of every block call the forward runs."""
    calls, handles = [], []
    for index, block in enumerate(model.model.diffusion_model.blocks):
        def hook(module, args, kwargs, out, index=index):
            calls.append(index)
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == STREAMLINE_LOGGER and r.levelno >= logging.WARNING]


def streamline(model):
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    return StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0]


def rehash(model, **settings):
    from comfyui_streamline.nodes.step_rehash import StepRehashModelPatch

    return StepRehashModelPatch.execute(model, **{**REHASH_SETTINGS, **settings}).result[0]


def report_of(model):
    from comfyui_streamline.nodes.step_rehash import STATE_KEY

    return model.model_options["transformer_options"][STATE_KEY].last.report


def test_the_variant_is_what_comfyui_detects(variant):
    name, spec, model, _ = variant
    assert type(model.model.model_config).__name__ == spec.name
    assert type(model.model.diffusion_model).__name__ == MODEL_CLASS[name]


def test_what_the_pack_does_with_each_variant(variant):
    from comfyui_streamline.nodes import families
    from comfyui_streamline.nodes.layer_roles import unsupported_reason
    from comfyui_streamline.nodes.wan.patch import wan_subclass

    name, spec, model, _ = variant
    dm = model.model.diffusion_model
    assert (wan_subclass(dm) is None) == (name == CONTROL), "the recorded forward_orig is this host's"
    assert (families.family_of(dm) == families.WAN) == spec.sliced
    assert (unsupported_reason(dm, "slice") is None) == spec.sliced
    plan_reason = unsupported_reason(dm, "plan")
    assert (plan_reason is None) == (spec.sliced and name not in UNPLANNED), plan_reason
    if name in UNPLANNED:
        assert MODEL_CLASS[name] in plan_reason and "Memory Budget" in plan_reason
    reason = unsupported_reason(dm, "rehash")
    assert (reason is None) == spec.rehashes, reason
    if reason is not None:
        assert MODEL_CLASS[name] in reason


def test_streamline_model_patch_matches_plain(variant, caplog):
    name, spec, model, reference = variant
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    with sliced_calls() as slices:
        out = sample(streamline(model), name)
    if spec.sliced:
        assert relative(out, reference) <= TOL, name
        assert slices and all(chunk < tokens for tokens, chunk in slices), slices
        assert not warnings(caplog)
    else:
        assert torch.equal(out, reference), "a model the pack leaves unchanged must sample bit for bit as plain"
        assert not slices
        said = warnings(caplog)
        assert len(said) == 1 and MODEL_CLASS[name] in said[0] and "unchanged" in said[0], said


def test_memory_budget_plans_only_what_the_wan_laws_count(variant, caplog):
    """Memory Budget slices a variant whose work the Wan laws count; one with work outside its blocks (VACE
    blocks, Animate's face encoder) runs unchanged, bit-identical, with one warning saying why."""
    from comfyui_streamline.nodes.memory_budget import MemoryBudget

    name, spec, model, reference = variant
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    budgeted = MemoryBudget.execute(model, 0.002, 64, 64, 5).result[0]
    with sliced_calls() as slices:
        out = sample(budgeted, name)
    if spec.sliced and name not in UNPLANNED:
        assert relative(out, reference) <= TOL, name
        assert not warnings(caplog)
    else:
        assert torch.equal(out, reference) and not slices
        said = warnings(caplog)
        assert len(said) == 1 and MODEL_CLASS[name] in said[0] and "unchanged" in said[0], said


def test_vace_block_zero_input_is_not_written_in_place():
    """VaceWanModel keeps block 0's input (x_orig, the first VACE block reads it): sliced in place it would
    change under the hints; the slices of block 0 work on a copy."""
    from comfyui_streamline.nodes.wan import install_wan_slicing

    model = loaded("WAN21_Vace")
    dm = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 2, 4, 4, generator=g), torch.full((1,), 500.0)
    context = torch.randn(1, 8, 4096, generator=g)
    vace_context = torch.randn(1, 1, 96, 2, 4, 4, generator=g)
    clone = model.clone()
    assert install_wan_slicing(clone, lambda to, x, tokens_per_frame: 3) == list(range(len(dm.blocks)))
    options = {**clone.model_options["transformer_options"], "wrappers": clone.wrappers}
    with torch.no_grad():
        ref = dm(x, t, context, vace_context=vace_context, vace_strength=[1.0])
        with sliced_calls() as slices:
            out = dm(x, t, context, vace_context=vace_context, vace_strength=[1.0], transformer_options=options)
    assert slices
    assert relative(out, ref) <= TOL


def test_step_rehash(variant, caplog):
    """Camera (and the control): the split runs (the rehashed step runs the shallow blocks only); VACE,
    S2V, Animate and HuMo: every step in full, bit for bit as plain, one warning saying why."""
    name, spec, model, reference = variant
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    patched = rehash(model)
    blocks = len(model.model.diffusion_model.blocks)
    with block_steps(model) as calls:
        out = sample(patched, name)
    report = report_of(patched)
    assert torch.isfinite(out).all()
    if spec.rehashes:
        assert (report.steps, report.full, report.rehashed) == (STEPS, STEPS - 1, 1)
        # every full step runs every block; the rehashed one the first and last only
        assert len(calls) == (STEPS - 1) * blocks + 2, calls
        assert not torch.equal(out, reference)  # the reused residual changed the result
        assert not warnings(caplog)
        with block_steps(model) as calls:  # the split with nothing reused is ComfyUI's forward, bit for bit
            assert torch.equal(sample(rehash(model, warmup_steps=STEPS), name), reference)
        assert len(calls) == STEPS * blocks
    else:
        assert torch.equal(out, reference), "Step Rehash must run a model it cannot split as plain, bit for bit"
        assert (report.full, report.rehashed) == (STEPS, 0)
        assert len(calls) == STEPS * blocks
        said = warnings(caplog)
        assert len(said) == 1 and MODEL_CLASS[name] in said[0] and "every step runs in full" in said[0], said
        if name in ("WAN21_Vace", "WAN22_S2V", "WAN22_Animate"):
            assert "between its blocks" in said[0], said


def test_step_rehash_with_streamline_model_patch(variant, caplog):
    """Both nodes on one model: sliced and split where each applies, never a crash, one warning per thing
    the pack does not do."""
    name, spec, model, reference = variant
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    patched = rehash(streamline(model))
    with sliced_calls() as slices:
        out = sample(patched, name)
    report = report_of(patched)
    assert torch.isfinite(out).all()
    assert bool(slices) == spec.sliced
    said = warnings(caplog)
    assert len(said) == len(set(said)) == (not spec.sliced) + (not spec.rehashes), said
    if spec.rehashes:
        assert report.rehashed == 1
        assert relative(out, sample(rehash(model), name)) <= TOL  # the same split, sliced
    else:
        assert report.rehashed == 0
        if spec.sliced:
            assert relative(out, reference) <= TOL
        else:
            assert torch.equal(out, reference)
