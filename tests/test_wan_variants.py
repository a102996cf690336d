"""The Wan variants ComfyUI builds beyond plain t2v / i2v, through the pack's nodes.

Each is a tiny random-weight model built from the real class and loaded through ComfyUI's loader
(testing/model_families.py WAN_SUBCLASS_VARIANTS: detection picks the variant from the keys, or for CausalAR,
FlowRVS and Animate2 from the file's config metadata), sampled with nodes.common_ksampler with the conds
each variant reads; plain WanModel (Wan 2.1 t2v) is the control:

- the WanModel subclasses with their own forward_orig: VaceWanModel, CameraWanModel, WanModel_S2V,
  HumoWanModel (comfy/ldm/wan/model.py), AnimateWanModel (model_animate.py), and ComfyUI 0.33.0's
  SCAILWanModel, SCAIL2WanModel (model.py), WanDancerModel (model_wandancer.py), WanAnimate2Model
  (model_animate2.py);
- ComfyUI 0.33.0's CausalWanModel (ar_model.py): WanModel's forward_orig, its own blocks
  (CausalWanAttentionBlock, KV-cached self-attention; through KSampler, without an ar_state, it runs
  WanModel's forward);
- model_base variants over a class already covered, each through its own detection path: FunControl2V
  (WanModel, i2v, 48 input channels), FlowRVS (WanModel under ModelType.IMG_TO_IMG_FLOW), Camera 2.2
  (CameraWanModel with t2v blocks and 36 input channels).

What the pack does with each (families/wan/patch.py WAN_SUBCLASSES) is the table EXPECTED below, one of:
- SLICED (Streamline Model Patch, Memory Budget): within 1e-5 of the plain output, slicing ran, no warning;
- UNCHANGED: bit-identical to the plain output (torch.equal), no slicing, exactly one warning naming the
  model class;
- SPLIT (Step Rehash): the rehashed step runs the shallow blocks only; with nothing reused the split is
  ComfyUI's forward bit for bit;
- FULL (Step Rehash): every step in full, bit-identical to the plain output, one warning naming the class.
A subclass with its own forward_orig that WAN_SUBCLASSES does not list is left to ComfyUI: UNCHANGED / FULL.
Variants the host does not have (ComfyUI 0.3.64 has none of 0.33.0's but FunControl2V and Camera 2.2) are
skipped, the reason naming the host. CausalAR runs through its own sampler (ar_video) too, at the end.
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
SLICED, UNCHANGED = "sliced", "unchanged"  # Streamline Model Patch, Memory Budget
SPLIT, FULL = "split", "full"  # Step Rehash


@dataclasses.dataclass(frozen=True)
class Expect:
    model_base: str  # type(patcher.model).__name__
    model_class: str  # type(patcher.model.diffusion_model).__name__
    patch: str  # Streamline Model Patch: SLICED or UNCHANGED
    budget: str  # Memory Budget: SLICED or UNCHANGED
    rehash: str  # Step Rehash: SPLIT or FULL


# What the pack does with each variant. Flip a row when families/wan/patch.py WAN_SUBCLASSES learns a variant
# (/tmp/notes_wan_variants.md has what each new forward_orig does around its blocks). Memory Budget UNCHANGED
# where the Model Patch slices: work outside the sliced blocks the Wan laws do not count (families/registry.py
# WAN_UNPLANNED).
EXPECTED = {
    # variant (model config)      model_base        diffusion model     Model Patch Memory Budget Step Rehash
    CONTROL:              Expect("WAN21",           "WanModel",         SLICED,     SLICED,     SPLIT),
    "WAN21_Vace":         Expect("WAN21_Vace",      "VaceWanModel",     SLICED,     UNCHANGED,  FULL),
    "WAN21_Camera":       Expect("WAN21_Camera",    "CameraWanModel",   SLICED,     SLICED,     SPLIT),
    "WAN22_S2V":          Expect("WAN22_S2V",       "WanModel_S2V",     UNCHANGED,  UNCHANGED,  FULL),
    "WAN21_HuMo":         Expect("WAN21_HuMo",      "HumoWanModel",     UNCHANGED,  UNCHANGED,  FULL),
    "WAN22_Animate":      Expect("WAN22_Animate",   "AnimateWanModel",  SLICED,     UNCHANGED,  FULL),
    # ComfyUI 0.33.0's; FunControl2V and Camera 2.2 load on 0.3.64 too
    # WanModel's forward_orig; CausalWanAttentionBlock blocks (not plain)
    "WAN21_CausalAR_T2V": Expect("WAN21_CausalAR",  "CausalWanModel",   UNCHANGED,  UNCHANGED,  FULL),
    # plain WanModel / CameraWanModel underneath
    "WAN21_FunControl2V": Expect("WAN21",           "WanModel",         SLICED,     SLICED,     SPLIT),
    "WAN22_Camera":       Expect("WAN21_Camera",    "CameraWanModel",   SLICED,     SLICED,     SPLIT),
    "WAN21_FlowRVS":      Expect("WAN21_FlowRVS",   "WanModel",         SLICED,     SLICED,     SPLIT),
    # their own forward_orig, not in WAN_SUBCLASSES: left to ComfyUI
    "WAN21_SCAIL":        Expect("WAN21_SCAIL",     "SCAILWanModel",    UNCHANGED,  UNCHANGED,  FULL),
    "WAN21_SCAIL2":       Expect("WAN21_SCAIL2",    "SCAIL2WanModel",   UNCHANGED,  UNCHANGED,  FULL),
    "WAN22_WanDancer":    Expect("WAN22_WanDancer", "WanDancerModel",   UNCHANGED,  UNCHANGED,  FULL),
    "WAN_Animate2":       Expect("WAN_Animate2",    "WanAnimate2Model", UNCHANGED,  UNCHANGED,  FULL),
}
VARIANTS = list(EXPECTED)
REHASH_SETTINGS = dict(rehash_mode="fixed", interval=2, warmup_steps=1, tail_steps=1, threshold=0.15, full_steps=3,
                       cache_block=-1, start_percent=0.0, end_percent=1.0, reuse="extrapolate")


def spec_of(name: str):
    from comfyui_streamline.testing.model_families import FAMILIES, WAN_SUBCLASS_VARIANTS, wan

    if name == CONTROL:
        return dataclasses.replace(FAMILIES[CONTROL], build=functools.partial(wan, num_layers=4))
    return WAN_SUBCLASS_VARIANTS[name]


@functools.lru_cache(maxsize=1)  # the module-scoped `variant` fixture runs one variant's tests together
def loaded(name: str):
    from comfyui_streamline.testing.model_families import host_lacks, load

    lacking = host_lacks(spec_of(name))
    if lacking is not None:
        pytest.skip(lacking)
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


@pytest.fixture(params=VARIANTS, scope="module")
def variant(request):
    """(name, Family, MODEL, plain output), one variant at a time (module scope: pytest runs all of one
    variant's tests before loading the next)."""
    name = request.param
    return name, spec_of(name), loaded(name), plain(name)


def expect(name: str) -> Expect:
    return EXPECTED[name]


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@contextmanager
def sliced_calls():
    """(tokens, chunk) of every Wan block the pack slices."""
    from comfyui_streamline.families.wan import patch as wan_patch

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
    """[block index] of every block call the forward runs. WanAnimate2Model's forward_orig never calls its
    blocks: it runs their forward_gen (the generation branch; forward_pose is the pose branch's)."""
    calls, handles, wrapped = [], [], []
    for index, block in enumerate(model.model.diffusion_model.blocks):
        def hook(module, args, kwargs, out, index=index):
            calls.append(index)
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
        if hasattr(block, "forward_gen"):
            def forward_gen(*args, real=block.forward_gen, index=index, **kwargs):
                calls.append(index)
                return real(*args, **kwargs)
            block.forward_gen = forward_gen
            wrapped.append(block)
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
        for block in wrapped:
            del block.forward_gen


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == STREAMLINE_LOGGER and r.levelno >= logging.WARNING]


def streamline(model):
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    return StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0]


def rehash(model, **settings):
    from comfyui_streamline.nodes.step_rehash import StepRehashModelPatch

    return StepRehashModelPatch.execute(model, **{**REHASH_SETTINGS, **settings}).result[0]


def report_of(model):
    from comfyui_streamline.host.options import REHASH_KEY as STATE_KEY

    return model.model_options["transformer_options"][STATE_KEY].last.report


def test_the_variant_is_what_comfyui_detects(variant):
    name, spec, model, _ = variant
    assert type(model.model.model_config).__name__ == spec.name
    assert type(model.model).__name__ == expect(name).model_base
    assert type(model.model.diffusion_model).__name__ == expect(name).model_class


def test_what_the_pack_does_with_each_variant(variant):
    from comfy.ldm.wan.model import WanModel

    from comfyui_streamline.families import registry as families
    from comfyui_streamline.families.registry import unsupported_reason
    from comfyui_streamline.families.wan.patch import WAN_SUBCLASSES, wan_subclass

    name, spec, model, _ = variant
    want, dm = expect(name), model.model.diffusion_model
    own_forward = type(dm).forward_orig is not WanModel.forward_orig
    if own_forward and (want.patch == SLICED or want.rehash == SPLIT):
        assert wan_subclass(dm) is not None, "the recorded forward_orig is this host's"
    if own_forward and want.model_class not in WAN_SUBCLASSES:  # one the pack has never seen: ComfyUI's
        assert wan_subclass(dm) is None
        assert "own forward_orig" in unsupported_reason(dm, "slice")
    if not own_forward:
        assert wan_subclass(dm) is None
    assert (families.family_of(dm) == families.WAN) == (want.patch == SLICED)
    reason = unsupported_reason(dm, "slice")
    assert (reason is None) == (want.patch == SLICED), reason
    if reason is not None:
        assert want.model_class in reason
    plan_reason = unsupported_reason(dm, "plan")
    assert (plan_reason is None) == (want.budget == SLICED), plan_reason
    if want.patch == SLICED and want.budget == UNCHANGED:
        assert want.model_class in plan_reason and "Memory Budget" in plan_reason
    reason = unsupported_reason(dm, "rehash")
    assert (reason is None) == (want.rehash == SPLIT), reason
    if reason is not None:
        assert want.model_class in reason


def said_unchanged_once(caplog, name: str) -> None:
    said = warnings(caplog)
    assert len(said) == 1 and expect(name).model_class in said[0] and "unchanged" in said[0], said


def test_streamline_model_patch_matches_plain(variant, caplog):
    name, spec, model, reference = variant
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    with sliced_calls() as slices:
        out = sample(streamline(model), name)
    if expect(name).patch == SLICED:
        assert relative(out, reference) <= TOL, name
        assert slices and all(chunk < tokens for tokens, chunk in slices), slices
        assert not warnings(caplog)
    else:
        assert torch.equal(out, reference), "a model the pack leaves unchanged must sample bit for bit as plain"
        assert not slices
        said_unchanged_once(caplog, name)


def budget_gb(model, name: str) -> float:
    """Memory Budget's budget for `name`. For a variant it plans: halfway between the predicted peaks of the
    finest token slicing and of ComfyUI's forward, by the pack's Wan laws for the call the test samples
    (CFG-batched latent with its concat channels, TOKENS text tokens), so the plan slices. Any other: 2 MiB."""
    if expect(name).budget != SLICED:
        return 0.002
    from comfyui_streamline.core.plan_search import ALLOCATOR_HEADROOM
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families import registry as families
    from comfyui_streamline.host.attention import attention_laws
    from comfyui_streamline.testing.model_families import TOKENS

    dm = model.model.diffusion_model
    x = torch.empty(2, dm.patch_embedding.weight.shape[1], *spec_of(name).latent_shape[2:], device="meta")
    context = torch.empty(2, TOKENS, 4096, device="meta")
    finest, whole = families.peaks_for(families.WAN, dm, x, context, SliceConfig(token_chunk=1), attention_laws())
    assert finest < whole, f"{name}: no token slicing lowers the predicted peak at this size (more tokens needed)"
    return (finest + whole) / 2 / ALLOCATOR_HEADROOM / 2**30


# Animate's face encoder reads 512x512 crops whatever the model's size (seconds per call on one thread): by
# default it runs through detection, Streamline Model Patch and Step Rehash; its Memory Budget refusal (VACE's
# checks the same "work outside the blocks" line) and the two nodes together only in the full matrix
HEAVY = {"WAN22_Animate"}


def skip_heavy_by_default(name: str) -> None:
    from comfyui_streamline.testing.matrix import FULL_MATRIX

    if name in HEAVY and not FULL_MATRIX:
        pytest.skip(f"{name}: the other variants check the same; all: STREAMLINE_FULL_MATRIX=1")


def test_memory_budget_plans_only_what_the_wan_laws_count(variant, caplog):
    """Memory Budget slices a variant whose work the Wan laws count; one with work outside its blocks (VACE
    blocks, Animate's face encoder) or one the pack leaves to ComfyUI runs unchanged, bit-identical, with one
    warning saying why."""
    from comfyui_streamline.nodes.memory_budget import MemoryBudget

    name, spec, model, reference = variant
    skip_heavy_by_default(name)
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    budgeted = MemoryBudget.execute(model, budget_gb(model, name), 64, 64, 5).result[0]
    with sliced_calls() as slices:
        out = sample(budgeted, name)
    if expect(name).budget == SLICED:
        assert relative(out, reference) <= TOL, name
        assert slices and all(chunk < tokens for tokens, chunk in slices), slices
        assert not warnings(caplog)
    else:
        assert torch.equal(out, reference) and not slices
        said_unchanged_once(caplog, name)


def test_vace_block_zero_input_is_not_written_in_place():
    """VaceWanModel keeps block 0's input (x_orig, the first VACE block reads it): sliced in place it would
    change under the hints; the slices of block 0 work on a copy."""
    from comfyui_streamline.families.wan import install_wan_slicing

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
    """SPLIT (Camera, the plain WanModel variants, the control): the rehashed step runs the shallow blocks
    only; FULL (VACE, S2V, Animate, HuMo, and the variants the pack does not know): every step in full, bit
    for bit as plain, one warning saying why."""
    from comfyui_streamline.families.wan.patch import wan_subclass

    name, spec, model, reference = variant
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    patched = rehash(model)
    blocks = len(model.model.diffusion_model.blocks)
    with block_steps(model) as calls:
        out = sample(patched, name)
    report = report_of(patched)
    assert torch.isfinite(out).all()
    if expect(name).rehash == SPLIT:
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
        assert len(said) == 1 and expect(name).model_class in said[0] and "every step runs in full" in said[0], said
        checked = wan_subclass(model.model.diffusion_model)
        if checked is not None and checked.between_blocks:  # VACE, S2V, Animate on the hosts they were checked on
            assert "between its blocks" in said[0], said


def test_step_rehash_with_streamline_model_patch(variant, caplog):
    """Both nodes on one model: sliced and split where each applies, never a crash, one warning per thing
    the pack does not do."""
    name, spec, model, reference = variant
    skip_heavy_by_default(name)
    want = expect(name)
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    patched = rehash(streamline(model))
    with sliced_calls() as slices:
        out = sample(patched, name)
    report = report_of(patched)
    assert torch.isfinite(out).all()
    assert bool(slices) == (want.patch == SLICED)
    said = warnings(caplog)
    assert len(said) == len(set(said)) == (want.patch == UNCHANGED) + (want.rehash == FULL), said
    assert all(want.model_class in line for line in said), said
    if want.rehash == SPLIT:
        assert report.rehashed == 1
        assert relative(out, sample(rehash(model), name)) <= TOL  # the same split, sliced
    else:
        assert report.rehashed == 0
        if want.patch == SLICED:
            assert relative(out, reference) <= TOL
        else:
            assert torch.equal(out, reference)


# -- CausalAR through its own sampler --------------------------------------------------------------------
# The ar_video sampler (SamplerARVideo) is how ComfyUI runs CausalWanModel: block by block with KV caches,
# transformer_options["ar_state"] set, so CausalWanModel.forward calls its forward_block: no forward_orig, no
# block replacements, no DIFFUSION_MODEL wrappers. Distilled (Causal Forcing): CFG 1, one cond per call (the
# KV caches are sized for the latent's batch).

def sample_ar_video(model) -> torch.Tensor:
    import comfy.sample
    import comfy.samplers

    spec = spec_of("WAN21_CausalAR_T2V")
    positive, negative = spec.conds()
    latent = spec.latent()["samples"]
    sampler = comfy.samplers.ksampler("ar_video", {"num_frame_per_block": 1})
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, SEED), 1.0, sampler, sigmas,
                                          positive, negative, latent, seed=SEED).clone()


@functools.lru_cache(maxsize=1)
def ar_video_plain() -> torch.Tensor:
    out = sample_ar_video(loaded("WAN21_CausalAR_T2V"))
    assert torch.isfinite(out).all() and out.abs().max() > 0.1
    return out


def ar_video_node(model, node: str):
    from comfyui_streamline.nodes.memory_budget import MemoryBudget

    if node == "Streamline Model Patch":
        return streamline(model)
    if node == "Memory Budget":
        return MemoryBudget.execute(model, 0.002, 64, 64, 5).result[0]
    return rehash(model)


@pytest.mark.parametrize("node", ["Streamline Model Patch", "Memory Budget", "Step Rehash"])
def test_causal_ar_video_sampler_runs_unchanged(node, caplog):
    """Bit-identical to the plain ar_video run, nothing sliced; Model Patch and Memory Budget say so once."""
    reference = ar_video_plain()
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    with sliced_calls() as slices:
        out = sample_ar_video(ar_video_node(loaded("WAN21_CausalAR_T2V"), node))
    assert torch.equal(out, reference) and not slices
    if node != "Step Rehash":  # Step Rehash's line: the test below
        said_unchanged_once(caplog, "WAN21_CausalAR_T2V")


def test_causal_ar_video_sampler_step_rehash_says_it_runs_in_full(caplog):
    """Under ar_video, CausalWanModel's blocks run outside the DIFFUSION_MODEL wrappers: Step Rehash sees no call,
    every step runs in full (bit-identical), and the run's end says so once, on the node's report too."""
    reference = ar_video_plain()
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    model = rehash(loaded("WAN21_CausalAR_T2V"))
    assert torch.equal(sample_ar_video(model), reference)
    said = warnings(caplog)
    assert len(said) == 1 and "CausalWanModel" in said[0] and "every step runs in full" in said[0], said
    report = report_of(model)
    assert report.steps > 0 and report.full == report.steps and report.rehashed == 0, report
    assert "DIFFUSION_MODEL wrapper" in report.note and "every step ran in full" in report.note, report.note
