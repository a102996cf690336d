"""Every node of the pack on every model family ComfyUI can build on a CPU (testing/model_families.py).

Each family is a tiny random-weight model loaded through ComfyUI's own diffusion-model loader (which
detects the family from the weights) and sampled with nodes.common_ksampler (what KSampler runs), 2
steps, plain and through each node: Streamline Model Patch, Memory Budget (auto and a set budget),
Step Rehash Sampler and Step Rehash (Model Patch).

- Families the pack slices (SD1.5 and SDXL UNets, here without motion modules: slices over the
  batch; SVD's video UNet; Wan 2.1's and LTXV's DiT blocks, over tokens): the output matches the plain run to
  1e-5 of its largest value, slicing really ran, the memory estimate is the pack's, and nothing is logged at
  warning level. Step Rehash splits the UNets', SVD's, Wan's and LTXV's calls.
- Every other family (Flux): the output is bit-identical to the plain run, the pack's code never
  sliced anything, the memory estimate is ComfyUI's own, and the node logged exactly one warning,
  naming the model it leaves unchanged.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import pytest
import torch

pytestmark = pytest.mark.host

STEPS = 2
SEED = 7
TOL = 1e-5
STREAMLINE_LOGGER = "ComfyUI-Streamline"
# SVD samples from sigma 700: the first steps scale a 1e-6 difference of one UNet call (float32 rounding
# of the sliced forward, tests/test_svd_exact.py) by sigma in x - denoised, so its runs take the karras
# schedule over 4 steps, whose last steps wash that out (a plain run repeats bit for bit either way)
SCHEDULES = {"SVD_img2vid": (4, "karras")}
REHASH_SETTINGS = dict(rehash_mode="fixed", interval=2, warmup_steps=max(STEPS, 4), tail_steps=1, threshold=0.15,
                       full_steps=13, cache_block=-1, start_percent=0.0, end_percent=1.0, reuse="extrapolate")
FAMILY_NAMES = ["SD15", "SDXL", "SVD_img2vid", "SV3D_u", "SV3D_p", "WAN21_T2V", "LTXV", "Flux"]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
    """(Family, MODEL, plain output): one family at a time (Flux's weights alone are 1.6 GB)."""
    from comfyui_streamline.testing.model_families import FAMILIES, load

    spec = FAMILIES[request.param]
    model = load(spec)
    with frame_slices() as slices:
        plain = sample(model, spec)
    assert not slices, "the plain run ran the pack's code"
    assert torch.isfinite(plain).all() and plain.abs().max() > 0
    yield spec, model, plain
    del model


@contextmanager
def frame_slices():
    """(batch, chunk) of every per-frame group the pack's UNet and SVD forwards run, and (tokens, chunk)
    of every Wan block it slices."""
    import comfyui_streamline.families.unet.forward as streamlined_unet
    import comfyui_streamline.families.svd.forward as svd_unet
    from comfyui_streamline.families.ltxv import patch as ltx_patch
    from comfyui_streamline.families.wan import patch as wan_patch

    seen: list[tuple[int, int]] = []
    real = streamlined_unet.run_frame_chunked
    real_wan = wan_patch.sliced_block_forward
    real_ltx = ltx_patch.sliced_ltxv_block

    def spy(group, batch, chunk):
        seen.append((batch, chunk))
        return real(group, batch, chunk)

    def wan_spy(block, x, *args):
        seen.append((x.shape[1], args[-1]))
        return real_wan(block, x, *args)

    def ltx_spy(block, x, *args):
        seen.append((x.shape[1], args[-1]))
        return real_ltx(block, x, *args)

    streamlined_unet.run_frame_chunked = svd_unet.run_frame_chunked = spy
    wan_patch.sliced_block_forward = wan_spy
    ltx_patch.sliced_ltxv_block = ltx_spy
    try:
        yield seen
    finally:
        streamlined_unet.run_frame_chunked = svd_unet.run_frame_chunked = real
        wan_patch.sliced_block_forward = real_wan
        ltx_patch.sliced_ltxv_block = real_ltx


def sample(model, spec) -> torch.Tensor:
    import nodes

    positive, negative = spec.conds()
    with torch.inference_mode():
        steps, scheduler = SCHEDULES.get(spec.name, (STEPS, "normal"))
        (out,) = nodes.common_ksampler(model, SEED, steps, spec.cfg, "euler", scheduler, positive, negative,
                                       spec.latent())
    return out["samples"].clone()


def rehash_sampler(model, spec) -> torch.Tensor:
    from comfyui_streamline.nodes.step_rehash import StepRehashSampler

    positive, negative = spec.conds()
    with torch.inference_mode():
        steps, scheduler = SCHEDULES.get(spec.name, (STEPS, "normal"))
        out = StepRehashSampler.execute(model, SEED, steps, spec.cfg, "euler", scheduler, positive, negative,
                                        spec.latent(), 1.0, **REHASH_SETTINGS)
    return out.result[0]["samples"].clone()


def slicing_budget(model, spec) -> int:
    """A budget under which the planner slices this model's forward (a set budget, or what "auto" finds free)."""
    from comfyui_streamline.core.budget import Workload, plan, predict_peak_bytes
    from comfyui_streamline.core.plan_search import ALLOCATOR_HEADROOM
    from comfyui_streamline.core.plan_search import BudgetError
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families import registry as families
    from comfyui_streamline.families.ltxv import laws as ltx_laws
    from comfyui_streamline.families.wan import laws as wan_laws
    from comfyui_streamline.host.attention import attention_laws
    from comfyui_streamline.families.unet.planning import planned_shape
    from comfyui_streamline.testing.model_families import TOKENS

    dm, laws = model.model.diffusion_model, attention_laws()
    family = families.family_of(dm)
    if family in (families.SVD, families.WAN, families.LTXV):  # cond and uncond batched: SVD's frames are its batch
        latent = (2 * spec.latent_shape[0], *spec.latent_shape[1:])
        frames = spec.latent_shape[0] if family == families.SVD else None
        x, context = torch.zeros(latent), torch.zeros(latent[0], TOKENS, 1)
        unsliced = families.peaks_for(family, dm, x, context, SliceConfig(), laws, frames)[1]

        def slices(budget: int) -> bool:
            config = families.plan_for(family, dm, latent, 4, budget, laws, TOKENS, frames).config
            if family == families.LTXV:
                return config.token_chunk < ltx_laws.ltx_tokens(latent)[0]
            return config.frame_chunk < latent[0] if family == families.SVD else \
                config.token_chunk < wan_laws.wan_tokens(dm, latent)[0]
    else:
        batch = 2 * spec.latent_shape[0]
        work = Workload(batch, spec.latent_shape[0], *spec.latent_shape[-2:], context_tokens=TOKENS)
        shape = planned_shape(dm, [])
        unsliced = predict_peak_bytes(shape, work, None, laws)

        def slices(budget: int) -> bool:
            return plan(shape, work, budget, laws).config.frame_chunk < batch
    for fraction in (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4):  # tiny models: slicing saves little next to what stays whole
        budget = int(unsliced * fraction / ALLOCATOR_HEADROOM)
        try:
            if slices(budget):
                return budget
        except BudgetError:
            break
    raise AssertionError(f"no budget makes the planner slice {spec.name}")


def streamline_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == STREAMLINE_LOGGER and r.levelno >= logging.WARNING]


def check(node: str, spec, model, out: torch.Tensor, plain: torch.Tensor, slices, caplog,
          handled: bool | None = None) -> None:
    """handled: the node runs this family its own way (default: spec.sliced)."""
    warnings = streamline_warnings(caplog)
    if spec.sliced if handled is None else handled:
        assert out.shape == plain.shape
        ratio = ((out - plain).abs().max() / plain.abs().max()).item()
        print(f"\n[{spec.name} {node}] max|diff| / max|plain| = {ratio:.2e}")
        tol = spec.sampled_tolerance or TOL
        assert ratio <= tol, f"{spec.name} {node}: {ratio:.2e} > {tol:.0e}"
        assert not warnings, warnings
    else:
        assert torch.equal(out, plain), f"{spec.name} {node}: the output changed"
        assert not slices, f"{spec.name} {node}: the pack sliced a model it does not handle"
        name = type(model.model.diffusion_model).__name__
        assert len(warnings) == 1 and name in warnings[0], warnings


def check_comfy_estimate(spec, model, patched) -> None:
    """A model the pack does not slice keeps ComfyUI's own memory estimate; one it slices gets the pack's."""
    base = model.model
    for batch in (1, 2):
        shape = [batch * spec.latent_shape[0], *spec.latent_shape[1:]]
        own = type(base).memory_required(base, shape)
        estimate = patched.object_patches["memory_required"](shape, cond_shapes={})
        assert (estimate == own) != spec.sliced, (spec.name, estimate, own)


def test_the_family_is_what_comfyui_detects(family):
    spec, model, plain = family
    assert type(model.model.model_config).__name__ == spec.name
    assert plain.shape == spec.latent_shape


def test_streamline_model_patch(family, caplog):
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    spec, model, plain = family
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    patched = StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0]
    check_comfy_estimate(spec, model, patched)
    with frame_slices() as slices:
        out = sample(patched, spec)
    check("Streamline Model Patch", spec, model, out, plain, slices, caplog)
    if spec.sliced:
        assert any(chunk < batch for batch, chunk in slices), slices


@pytest.mark.parametrize("auto", [True, False], ids=["auto", "set"])
def test_memory_budget(family, caplog, monkeypatch, auto):
    from comfyui_streamline.nodes import memory_budget
    from comfyui_streamline.techniques import budget as budget_technique

    spec, model, plain = family
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    budget = slicing_budget(model, spec) if spec.sliced else 2**30
    if auto:  # "auto" plans with what the pack finds free: make that a budget that needs slicing
        monkeypatch.setattr(budget_technique, "free_activation_bytes", lambda device, patcher=None: budget)
    patched, text = memory_budget.MemoryBudget.execute(model, budget_gb=0.0 if auto else budget / 2**30,
                                                       width=64, height=64, frames=2).result
    check_comfy_estimate(spec, model, patched)
    assert ("cannot plan for this model" in text) != spec.sliced, text
    with frame_slices() as slices:
        out = sample(patched, spec)
    check("Memory Budget " + ("auto" if auto else "set"), spec, model, out, plain, slices, caplog)
    if spec.sliced:
        assert any(chunk < batch for batch, chunk in slices), slices


def test_step_rehash_sampler(family, caplog):
    spec, model, plain = family
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    with frame_slices() as slices:
        out = rehash_sampler(model, spec)
    check("Step Rehash Sampler", spec, model, out, plain, [s for s in slices if s[1] < s[0]], caplog, spec.rehashes)


def test_step_rehash_model_patch(family, caplog):
    from comfyui_streamline.nodes.step_rehash import StepRehashModelPatch

    spec, model, plain = family
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    patched = StepRehashModelPatch.execute(model, **REHASH_SETTINGS).result[0]
    with frame_slices() as slices:
        out = sample(patched, spec)
    check("Step Rehash (Model Patch)", spec, model, out, plain, [s for s in slices if s[1] < s[0]], caplog,
          spec.rehashes)
