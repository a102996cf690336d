"""The video families ComfyUI 0.33 loads that the pack has no adapter for run unchanged, with one line.

CogVideoX (T2V, I2V, Fun inpaint), Kandinsky 5, Cosmos 1 (T2V, I2V), Cosmos Predict2 (T2I / video-to-world,
I2V), Mochi and SeedVR2: each a tiny random-weight model of the host's real class, loaded through ComfyUI's
loader and detection (testing/video_families.py), sampled with nodes.common_ksampler plain and under each of the
pack's nodes: Streamline Model Patch, Memory Budget, Step Rehash (Model Patch), Step Rehash Sampler, and Model
Patch + Step Rehash together. Each run is bit-identical to the plain one (torch.equal), the memory estimate
stays ComfyUI's, no block of the model is replaced, and each node logs exactly one warning that names the model
class and says why it runs unchanged (families/registry.py unsupported_reason). Families a host lacks (ComfyUI
0.3.64 has no CogVideoX, Kandinsky 5 or SeedVR2) are skipped, the reason naming the host.
"""
from __future__ import annotations

import functools
import logging

import pytest
import torch

pytestmark = pytest.mark.host

STEPS, SEED = 2, 7
STREAMLINE_LOGGER = "ComfyUI-Streamline"
WHY = "is not of a model family the pack handles"
REHASH_SETTINGS = dict(rehash_mode="fixed", interval=2, warmup_steps=1, tail_steps=0, threshold=0.15, full_steps=3,
                       cache_block=-1, start_percent=0.0, end_percent=1.0, reuse="extrapolate")

# family (model config)   model_base       diffusion model
EXPECTED = {
    "CogVideoX_T2V":      ("CogVideoX",      "CogVideoXTransformer3DModel"),
    "CogVideoX_I2V":      ("CogVideoX",      "CogVideoXTransformer3DModel"),
    "CogVideoX_Inpaint":  ("CogVideoX",      "CogVideoXTransformer3DModel"),
    "Kandinsky5":         ("Kandinsky5",     "Kandinsky5"),
    "CosmosT2V":          ("CosmosVideo",    "GeneralDIT"),
    "CosmosI2V":          ("CosmosVideo",    "GeneralDIT"),
    "CosmosT2IPredict2":  ("CosmosPredict2", "MiniTrainDIT"),
    "CosmosI2VPredict2":  ("CosmosPredict2", "MiniTrainDIT"),
    "GenmoMochi":         ("GenmoMochi",     "AsymmDiTJoint"),
    "SeedVR2":            ("SeedVR2",        "NaDiT"),
}


@functools.lru_cache(maxsize=1)  # module-scoped fixture: one family's tests run together
def loaded(name: str):
    from comfyui_streamline.testing.model_families import host_lacks, load
    from comfyui_streamline.testing.video_families import VIDEO_FAMILIES

    spec = VIDEO_FAMILIES[name]
    lacking = host_lacks(spec)
    if lacking is not None:
        pytest.skip(lacking)
    return spec, load(spec)


def sample(model, spec) -> torch.Tensor:
    import nodes

    positive, negative = spec.conds()
    with torch.inference_mode():
        (out,) = nodes.common_ksampler(model, SEED, STEPS, spec.cfg, "euler", "normal", positive, negative,
                                       spec.latent())
    return out["samples"].clone()


@pytest.fixture(params=list(EXPECTED), scope="module")
def family(request):
    """(name, Family, MODEL, plain output)."""
    spec, model = loaded(request.param)
    plain = sample(model, spec)
    assert torch.isfinite(plain).all() and plain.abs().max() > 0.1
    return request.param, spec, model, plain


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == STREAMLINE_LOGGER and r.levelno >= logging.WARNING]


def class_of(name: str) -> str:
    return EXPECTED[name][1]


def no_block_replaced(model) -> bool:
    options = model.model_options.get("transformer_options", {})
    return not options.get("patches_replace", {}).get("dit")


def ran_unchanged(name: str, model, out, plain, caplog, said: str) -> None:
    """Bit for bit the plain run, nothing of the model replaced, one warning naming the class and why."""
    assert torch.equal(out, plain), f"{name}: a model the pack leaves unchanged must sample bit for bit as plain"
    assert no_block_replaced(model)
    lines = warnings(caplog)
    assert len(lines) == 1, lines
    assert class_of(name) in lines[0] and WHY in lines[0] and said in lines[0], lines


def comfy_estimate_kept(spec, model, patched) -> None:
    base = model.model
    for batch in (1, 2):
        shape = [batch * spec.latent_shape[0], *spec.latent_shape[1:]]
        assert patched.object_patches["memory_required"](shape, cond_shapes={}) == \
            type(base).memory_required(base, shape)


def test_the_family_is_what_comfyui_detects(family):
    name, spec, model, plain = family
    assert type(model.model.model_config).__name__ == name
    assert (type(model.model).__name__, type(model.model.diffusion_model).__name__) == EXPECTED[name]
    assert plain.shape == spec.latent_shape


def test_the_pack_says_why_for_every_purpose(family):
    from comfyui_streamline.families import registry

    name, spec, model, _ = family
    dm = model.model.diffusion_model
    assert registry.family_of(dm) is None
    for purpose in ("slice", "plan", "rehash"):
        reason = registry.unsupported_reason(dm, purpose)
        assert reason is not None and class_of(name) in reason and WHY in reason, reason
        assert all(f.name in reason for f in registry.FAMILIES), reason  # and which families it handles


def test_streamline_model_patch(family, caplog):
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    name, spec, model, plain = family
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    patched = StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0]
    comfy_estimate_kept(spec, model, patched)
    ran_unchanged(name, patched, sample(patched, spec), plain, caplog, "running it unchanged")


def test_memory_budget(family, caplog):
    from comfyui_streamline.nodes.memory_budget import MemoryBudget

    name, spec, model, plain = family
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    patched, text = MemoryBudget.execute(model, 0.002, 64, 64, 5).result
    assert "cannot plan for this model" in text and class_of(name) in text, text
    comfy_estimate_kept(spec, model, patched)
    ran_unchanged(name, patched, sample(patched, spec), plain, caplog, "running it unchanged")


def test_step_rehash_model_patch(family, caplog):
    from comfyui_streamline.nodes.step_rehash import StepRehashModelPatch

    name, spec, model, plain = family
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    patched = StepRehashModelPatch.execute(model, **REHASH_SETTINGS).result[0]
    ran_unchanged(name, patched, sample(patched, spec), plain, caplog, "every step runs in full")


def test_step_rehash_sampler(family, caplog):
    from comfyui_streamline.nodes.step_rehash import StepRehashSampler

    name, spec, model, plain = family
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    positive, negative = spec.conds()
    with torch.inference_mode():
        out = StepRehashSampler.execute(model, SEED, STEPS, spec.cfg, "euler", "normal", positive, negative,
                                        spec.latent(), 1.0, **REHASH_SETTINGS).result[0]["samples"]
    ran_unchanged(name, model, out, plain, caplog, "every step runs in full")


def test_model_patch_and_step_rehash_together(family, caplog):
    """One warning per node, each naming the class."""
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch
    from comfyui_streamline.nodes.step_rehash import StepRehashModelPatch

    name, spec, model, plain = family
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    patched = StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0]
    patched = StepRehashModelPatch.execute(patched, **REHASH_SETTINGS).result[0]
    assert torch.equal(sample(patched, spec), plain)
    assert no_block_replaced(patched)
    lines = warnings(caplog)
    assert len(lines) == 2 and all(class_of(name) in line and WHY in line for line in lines), lines
    assert any("running it unchanged" in line for line in lines) and any("in full" in line for line in lines), lines
