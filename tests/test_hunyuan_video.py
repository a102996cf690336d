"""The sliced HunyuanVideo blocks (families/hunyuan_video/) against ComfyUI's own forward, and Step Rehash's split.

Tiny random-weight HunyuanVideo models through ComfyUI's loader and detection (testing/model_families.py
HUNYUAN_VARIANTS): 1.0 T2V (CLIP-L pooled vector, guidance, a text mask), 1.0 I2V (33 input channels; the token
replace of its v2 conditioning: per-token-range modulation rows), 1.5 (SigLIP vision tokens joined to the text,
cond-type embeddings; ComfyUI 0.33 only). Two double and two single blocks, hidden 256 (2 heads of 128). CPU,
fp32; exact means max|patched - plain| <= 1e-5 * max|plain|.
"""
from __future__ import annotations

import functools
import logging
from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch

pytestmark = pytest.mark.host

TOL = 1e-5
STREAMLINE_LOGGER = "ComfyUI-Streamline"
FRAMES, HEIGHT, WIDTH = 3, 10, 12  # latent: 3 x 5 x 6 = 90 image tokens
TEXT = 8


def relative_error(out, ref) -> float:
    assert out.shape == ref.shape
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.1
    return ((out - ref).abs().max() / ref.abs().max()).item()


def spec(name: str):
    from comfyui_streamline.testing.model_families import HUNYUAN_VARIANTS, host_lacks

    family = HUNYUAN_VARIANTS[name]
    lacking = host_lacks(family)
    if lacking:
        pytest.skip(lacking)
    return family


@functools.lru_cache(maxsize=None)
def loaded(name: str, seed: int = 0):
    from comfyui_streamline.testing.model_families import load

    return load(spec(name), seed)


def patched_clone(model, token_chunk: int):
    from comfyui_streamline.families.hunyuan_video.patch import install_hunyuan_slicing

    clone = model.clone()
    assert install_hunyuan_slicing(clone, lambda to, x, tokens_per_frame: token_chunk) == 4
    return clone


def call_options(model) -> dict:
    """transformer_options as sampling hands them to the diffusion model (with the patcher's wrappers)."""
    return {**model.model_options["transformer_options"], "wrappers": model.wrappers}


def inputs(name: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    dm_in = {"HunyuanVideo": 16, "HunyuanVideoI2V": 33, "HunyuanVideo15": 65}[name]
    x = torch.randn(batch, dm_in, FRAMES, HEIGHT, WIDTH, generator=g)
    t = torch.rand(batch, generator=g)
    context = torch.randn(batch, TEXT, {"HunyuanVideo15": 3584}.get(name, 4096), generator=g)
    mask = torch.ones(1, TEXT, dtype=torch.long)
    mask[:, TEXT - 3:] = 0
    if name == "HunyuanVideo15":  # its vision tokens with a text mask fail in ComfyUI's own forward (a mask of
        kwargs = {"clip_fea": torch.randn(batch, 16, 1152, generator=g)}  # the text's length): no mask
    else:
        kwargs = {"attention_mask": mask, "y": torch.randn(batch, 768, generator=g),
                  "guidance": torch.full((batch,), 6.0)}
    if name == "HunyuanVideoI2V":
        kwargs["guiding_frame_index"] = torch.zeros(batch)  # the token replace: frame 0's tokens read row 0
    return x, t, context, kwargs


@pytest.fixture
def slice_spy(monkeypatch):
    """Records (kind, tokens of the sliced stream, token chunk) of every sliced block call."""
    from comfyui_streamline.families.hunyuan_video import block, patch

    calls = []

    def spy(kind, real):
        def run(blk, x, *args):
            calls.append((kind, x.shape[1], args[-1]))
            return real(blk, x, *args)
        return run

    monkeypatch.setattr(patch, "sliced_double_block", spy("double", block.sliced_double_block))
    monkeypatch.setattr(patch, "sliced_single_block", spy("single", block.sliced_single_block))
    return calls


def text_tokens(name: str) -> int:
    return TEXT + (16 if name == "HunyuanVideo15" else 0)  # 1.5: the vision tokens join the text


@pytest.mark.parametrize("name", ["HunyuanVideo", "HunyuanVideoI2V", "HunyuanVideo15"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("token_chunk", [7, 32])  # 90 image tokens: 13 slices (the last of 6), 3 (the last of 26)
def test_sliced_forward_matches_comfyui(name, batch, token_chunk, slice_spy):
    if name == "HunyuanVideoI2V" and batch == 2 and not _token_replace_takes_batches():
        pytest.skip("ComfyUI 0.3.64's apply_mod broadcasts the token replace's rows over the batch: its own forward "
                    "fails at batch 2")
    model = loaded(name)
    dm = model.model.diffusion_model
    x, t, context, kwargs = inputs(name, batch)
    with torch.no_grad():
        plain = dm(x, t, context, **kwargs)
        out = dm(x, t, context, transformer_options=call_options(patched_clone(model, token_chunk)), **kwargs)
    error = relative_error(out, plain)
    print(f"\n[{name} batch {batch} chunk {token_chunk}] max|diff| / max|plain| = {error:.2e}")
    assert error <= TOL
    joint = 90 + text_tokens(name)
    assert slice_spy == [("double", 90, token_chunk)] * 2 + [("single", joint, token_chunk)] * 2


def _token_replace_takes_batches() -> bool:
    import inspect

    from comfy.ldm.flux.layers import apply_mod

    return "d[2]:d[2] + 1" in inspect.getsource(apply_mod)


def test_dims_for_restricts_modulation_ranges():
    from comfyui_streamline.families.hunyuan_video.block import dims_for

    dims = [(0, 30, 0), (30, None, 1)]
    assert dims_for(None, 0, 10) is None
    assert dims_for(dims, 0, 10) == [(0, 10, 0)]
    assert dims_for(dims, 25, 40) == [(0, 5, 0), (5, 15, 1)]
    assert dims_for(dims, 30, 37) == [(0, 7, 1)]
    assert dims_for([(2, 4, 0)], 10, 20) == []


def test_apply_model_and_ksampler_under_streamline_model_patch(slice_spy):
    """KSampler (nodes.common_ksampler) on a MODEL from Streamline Model Patch, against the plain MODEL."""
    import nodes
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    family, model = spec("HunyuanVideo"), loaded("HunyuanVideo")
    positive, negative = family.conds()
    latent = {"samples": torch.zeros(1, 16, 2, HEIGHT, WIDTH)}  # 2 x 5 x 6 = 60 image tokens

    def sample(m):
        (out,) = nodes.common_ksampler(m, 5, 2, 5.0, "euler", "normal", positive, negative, latent)
        return out["samples"]

    plain = sample(model)
    patched = StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0]
    out = sample(patched)
    assert relative_error(out, plain) <= TOL
    # frame_chunk 1 of cond and uncond batched: 30 token rows / 2 = 15 tokens per slice
    doubles = [c for c in slice_spy if c[0] == "double"]
    assert doubles and all(c[1:] == (60, 15) for c in doubles) and len(slice_spy) == 2 * 4


@pytest.mark.parametrize("name", ["HunyuanVideoSkyreelsI2V", "HunyuanVideo15_SR_Distilled"])
def test_variant_through_detection_and_ksampler(name, slice_spy):
    """The variants told apart by their input width (SkyReels I2V, 1.5's super-resolution): ComfyUI detects
    each, and KSampler under Streamline Model Patch equals the plain MODEL, with every block sliced."""
    import nodes
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    family, model = spec(name), loaded(name)
    assert type(model.model.model_config).__name__ == name
    positive, negative = family.conds()
    latent = {"samples": torch.zeros(family.latent_shape)}

    def sample(m):
        (out,) = nodes.common_ksampler(m, 5, 2, family.cfg, "euler", "normal", positive, negative, latent)
        return out["samples"]

    plain = sample(model)
    out = sample(StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0])
    assert relative_error(out, plain) <= TOL
    assert {c[0] for c in slice_spy} == {"double", "single"} and all(c[2] < c[1] for c in slice_spy), slice_spy


def test_streamline_model_patch_left_automatic_slices_as_the_laws_choose(slice_spy):
    """Streamline Model Patch with its slices left automatic, through KSampler: each call's block hooks get the
    slice the laws choose for it (the adapter's call_slicing: laws.automatic_token_chunk), and the output stays
    within TOL of the plain MODEL's."""
    import nodes
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.hunyuan_video.adapter import HUNYUAN_VIDEO
    from comfyui_streamline.techniques.slicing import apply_streamline

    family, model = spec("HunyuanVideo"), loaded("HunyuanVideo")
    positive, negative = family.conds()
    latent = {"samples": torch.zeros(1, 16, 4, HEIGHT, WIDTH)}  # 4 x 5 x 6 = 120 image tokens

    def sample(m):
        (out,) = nodes.common_ksampler(m, 5, 2, 5.0, "euler", "normal", positive, negative, latent)
        return out["samples"]

    plain = sample(model)
    out = sample(apply_streamline(model, SliceConfig()))
    assert relative_error(out, plain) <= TOL
    dm = model.model.diffusion_model
    x, context = torch.empty(2, 16, 4, HEIGHT, WIDTH), torch.empty(2, TEXT, 4096)
    chunk = HUNYUAN_VIDEO.call_slicing(dm, x, context, SliceConfig()).token_chunk
    assert chunk % 30 == 0  # whole latent frames of 5 x 6 tokens
    assert HUNYUAN_VIDEO.call_slicing(dm, x, context, SliceConfig(token_chunk=7)).token_chunk == 7
    doubles = [c for c in slice_spy if c[0] == "double"]
    assert doubles and all(c[1:] == (120, chunk) for c in doubles), (doubles, chunk)


def test_hunyuan15_through_ksampler(slice_spy):
    import nodes
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    family, model = spec("HunyuanVideo15"), loaded("HunyuanVideo15")
    positive, negative = family.conds()

    def sample(m):
        (out,) = nodes.common_ksampler(m, 5, 2, family.cfg, "euler", "normal", positive, negative, family.latent())
        return out["samples"]

    plain = sample(model)
    out = sample(StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0])
    assert relative_error(out, plain) <= TOL and slice_spy


def test_unknown_block_type_runs_unsliced_with_one_log_line(caplog, slice_spy):
    from comfy.ldm.flux.layers import SingleStreamBlock

    class OtherBlock(SingleStreamBlock):  # another pack's block: its own forward
        def forward(self, x, **kwargs):
            return super().forward(x, **kwargs)

    from comfyui_streamline.testing.model_families import load

    model = load(spec("HunyuanVideo"), seed=1)
    model.model.diffusion_model.single_blocks[1].__class__ = OtherBlock
    x, t, context, kwargs = inputs("HunyuanVideo", 2)
    clone = patched_clone(model, 16)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger=STREAMLINE_LOGGER):
        plain = model.model.diffusion_model(x, t, context, **kwargs)
        for _ in range(2):
            out = model.model.diffusion_model(x, t, context, transformer_options=call_options(clone), **kwargs)
    assert relative_error(out, plain) <= TOL
    notices = [r.getMessage() for r in caplog.records if r.name == STREAMLINE_LOGGER and "OtherBlock" in r.getMessage()]
    assert len(notices) == 1 and "single block 1" in notices[0], notices
    assert [c[0] for c in slice_spy] == ["double", "double", "single"] * 2  # single block 1 never sliced


def test_attention_patches_and_unknown_conds_run_unsliced(caplog, slice_spy):
    model = loaded("HunyuanVideo")
    dm = model.model.diffusion_model
    x, t, context, kwargs = inputs("HunyuanVideo", 1)
    clone = patched_clone(model, 16)
    with torch.no_grad():
        plain = dm(x, t, context, **kwargs)
        with caplog.at_level(logging.WARNING, logger=STREAMLINE_LOGGER):
            options = call_options(clone)
            options["patches"] = {"attn1_output_patch": [lambda attn, extra: attn]}
            out = dm(x, t, context, transformer_options=options, **kwargs)
            odd = dm(x, t, context, transformer_options=call_options(clone), some_new_cond=torch.ones(1), **kwargs)
    assert slice_spy == [] and torch.equal(out, plain) and torch.equal(odd, plain)
    messages = [r.getMessage() for r in caplog.records if r.name == STREAMLINE_LOGGER]
    assert any("attn1_output_patch" in m for m in messages) and any("some_new_cond" in m for m in messages)


def test_another_packs_block_replacement_is_kept(caplog):
    from comfyui_streamline.families.hunyuan_video.patch import install_hunyuan_slicing

    model = loaded("HunyuanVideo")
    clone = model.clone()
    seen = []

    def theirs(args, extra):
        seen.append(1)
        return extra["original_block"](args)

    clone.set_model_patch_replace(theirs, "dit", "single_block", 0)
    with caplog.at_level(logging.WARNING, logger=STREAMLINE_LOGGER):
        assert install_hunyuan_slicing(clone, lambda *a: 16) == 3
    assert sum("already have a block replacement" in r.getMessage() for r in caplog.records) == 1
    x, t, context, kwargs = inputs("HunyuanVideo", 1)
    with torch.no_grad():
        plain = model.model.diffusion_model(x, t, context, **kwargs)
        out = model.model.diffusion_model(x, t, context, transformer_options=call_options(clone), **kwargs)
    assert seen == [1] and relative_error(out, plain) <= TOL


def test_family_and_reasons():
    from comfyui_streamline.families.registry import family_of, unsupported_reason

    dm = loaded("HunyuanVideo").model.diffusion_model
    assert family_of(dm).name == "HunyuanVideo" and unsupported_reason(dm) is None
    assert unsupported_reason(dm, "rehash") is None


def test_recorded_host_fingerprints_are_this_hosts():
    from comfyui_streamline.families.hunyuan_video.patch import RECORDED, hunyuan_functions
    from comfyui_streamline.host.fingerprints import unrecorded

    assert unrecorded(hunyuan_functions(), RECORDED) == []


def test_self_check_is_within_the_bound_and_catches_a_changed_block(monkeypatch):
    """The self-check (run where a host function is unrecorded) passes on this host, and a sliced block that drops
    a term (the MLP's gate) fails it."""
    from comfyui_streamline.families.hunyuan_video import block, patch

    assert patch.hunyuan_self_check() <= TOL
    monkeypatch.setattr(block, "single_mlp", lambda blk, mlp: 0 * mlp)
    assert patch.hunyuan_self_check() > 1e-3


# --- memory: the live-tensor counter on the CPU against families/hunyuan_video/laws.py ------------------------

MEMORY_LATENT = (2, 32, 32)  # 2 x 16 x 16 = 512 image tokens


@functools.lru_cache(maxsize=None)
def sized(depth: int, single: int):
    """HunyuanVideo 1.0 with `depth` double and `single` single blocks, through ComfyUI's loader."""
    import dataclasses

    from comfyui_streamline.testing.model_families import HUNYUAN_VARIANTS, hunyuan_video, load

    family = HUNYUAN_VARIANTS["HunyuanVideo"]
    return load(dataclasses.replace(family, build=functools.partial(hunyuan_video, depth=depth, single=single)))


def measured_peak(model, batch: int, token_chunk: int | None) -> int:
    from comfyui_streamline.core.memtrace import LiveTensorMeter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 16, *MEMORY_LATENT, generator=g)
    t = torch.rand(batch, generator=g)
    context = torch.randn(batch, TEXT, 4096, generator=g)
    kwargs = dict(y=torch.randn(batch, 768, generator=g), guidance=torch.full((batch,), 6.0))
    options = {} if token_chunk is None else call_options(_install(model, token_chunk))
    with torch.no_grad(), LiveTensorMeter() as meter:
        model.model.diffusion_model(x, t, context, transformer_options=options, **kwargs)
    return meter.peak_bytes


def _install(model, token_chunk: int):
    from comfyui_streamline.families.hunyuan_video.patch import install_hunyuan_slicing

    clone = model.clone()
    install_hunyuan_slicing(clone, lambda *a: token_chunk)
    return clone


@pytest.mark.parametrize("depth, single", [(1, 1), (1, 0)])  # the single blocks' peak, the double blocks'
def test_memory_laws_match_the_live_tensor_meter(depth, single):
    from comfyui_streamline.families.hunyuan_video.laws import (
        SUB_QUADRATIC, HunyuanWork, forward_peak_bytes, hunyuan_shape,
    )

    model = sized(depth, single)
    shape = hunyuan_shape(model.model.diffusion_model)
    tokens = MEMORY_LATENT[0] * MEMORY_LATENT[1] * MEMORY_LATENT[2] // 4
    rows = []
    for batch, chunk in [(2, None), (2, 64), (2, 200), (1, None), (1, 128)]:
        measured = measured_peak(model, batch, chunk)
        predicted = forward_peak_bytes(shape, HunyuanWork(batch, tokens, TEXT, 4), chunk, SUB_QUADRATIC)
        rows.append(measured)
        print(f"\n[{depth}+{single} blocks, batch {batch} chunk {chunk}] measured {measured / 2**20:.3f} MiB, "
              f"predicted {predicted / 2**20:.3f} MiB ({predicted / measured - 1:+.2%})")
        assert abs(predicted / measured - 1) <= 0.01
    assert rows[0] / rows[1] >= 2.5  # ComfyUI's forward against slices of 64 tokens


def test_planned_token_slice_fits_and_is_largest():
    from comfyui_streamline.core.plan_search import BudgetError, PlanSearch
    from comfyui_streamline.families.dit.laws import SDPA
    from comfyui_streamline.families.hunyuan_video.laws import HunyuanShape, HunyuanWork, forward_peak_bytes, plan_tokens

    shape = HunyuanShape(3072, 24, 12288, doubles=20, singles=40)  # HunyuanVideo 1.0 (13B)
    work = HunyuanWork(2, 33 * 45 * 80, text_tokens=256, dtype_bytes=2)  # 720x1280x129, CFG batched, bf16

    def planned(budget: float) -> int:
        return plan_tokens(shape, work, PlanSearch(budget, "a test", headroom=1.0), SDPA).candidate

    budget = forward_peak_bytes(shape, work, None, SDPA) / 3
    n = planned(budget)
    assert forward_peak_bytes(shape, work, n, SDPA) <= budget < forward_peak_bytes(shape, work, n + 1, SDPA)
    assert planned(forward_peak_bytes(shape, work, work.joint, SDPA)) == work.joint
    with pytest.raises(BudgetError):
        planned(1.0)


@pytest.mark.parametrize("kernel_name", ["SDPA", "SUB_QUADRATIC"])
def test_planned_token_slice_is_the_first_that_fits_in_a_scan(kernel_name):
    """The plan search bisects: for budgets across the range (those between ComfyUI's forward's peak and that of
    its blocks under the hooks among them), it finds the slice a scan from the joint tokens down to one finds."""
    from comfyui_streamline.core.plan_search import PlanSearch
    from comfyui_streamline.families.dit import laws as dit_laws
    from comfyui_streamline.families.hunyuan_video.laws import (
        HunyuanShape, HunyuanWork, forward_peak_bytes, plan_tokens, token_slices,
    )

    kernel = getattr(dit_laws, kernel_name)
    shape, work = HunyuanShape(64, 2, 256, doubles=2, singles=2), HunyuanWork(1, 3 * 8 * 8, text_tokens=7, dtype_bytes=4)
    peaks = [forward_peak_bytes(shape, work, n, kernel) for n in token_slices(work)]
    unhooked = forward_peak_bytes(shape, work, None, kernel)
    assert unhooked < peaks[0]  # the hooks keep the image stream: a budget between the two is not the joint tokens
    budgets = [peaks[-1] + (peaks[0] - peaks[-1]) * i / 40 for i in range(41)] + [(unhooked + peaks[0]) / 2]
    for budget in budgets:
        scanned = next(n for n, p in zip(token_slices(work), peaks) if p <= budget)
        assert plan_tokens(shape, work, PlanSearch(budget, "a test", headroom=1.0), kernel).candidate == scanned


def test_automatic_slice_is_the_coarsest_close_to_one_frame():
    """A config left automatic: the most latent frames per slice whose predicted peak is within
    AUTO_PEAK_CLOSENESS of one frame per slice's; the next coarser candidate is not."""
    from comfyui_streamline.core.plan_search import AUTO_PEAK_CLOSENESS
    from comfyui_streamline.core.slicing import frame_slices
    from comfyui_streamline.families.dit.laws import SDPA, SUB_QUADRATIC
    from comfyui_streamline.families.hunyuan_video.laws import (
        HunyuanShape, HunyuanWork, automatic_token_chunk, forward_peak_bytes,
    )

    cases = [(HunyuanShape(3072, 24, 12288, doubles=20, singles=40), HunyuanWork(2, 33 * 45 * 80, 256, 2), 45 * 80),
             (HunyuanShape(64, 2, 256, doubles=2, singles=2), HunyuanWork(1, 6 * 8 * 8, 7, 4), 8 * 8)]
    for shape, work, per_frame in cases:
        for kernel in (SDPA, SUB_QUADRATIC):
            slices = frame_slices(work.tokens, per_frame)
            peak = lambda n: forward_peak_bytes(shape, work, n, kernel)  # noqa: E731
            chosen = automatic_token_chunk(shape, work, per_frame, kernel)
            bound = (1 + AUTO_PEAK_CLOSENESS) * peak(slices[-1])
            assert chosen in slices[1:] and peak(chosen) <= bound
            assert peak(slices[slices.index(chosen) - 1]) > bound


def test_memory_budget_plans_hunyuan_video(slice_spy):
    """Memory Budget plans each call by the laws: the blocks run with the plan's slice, the output is ComfyUI's."""
    import nodes
    from comfyui_streamline.core.plan_search import ALLOCATOR_HEADROOM
    from comfyui_streamline.families.hunyuan_video.laws import (
        HunyuanWork, attention_kernel, forward_peak_bytes, hunyuan_shape, plan_hunyuan,
    )
    from comfyui_streamline.nodes.memory_budget import MemoryBudget

    family, model = spec("HunyuanVideo"), loaded("HunyuanVideo")
    dm = model.model.diffusion_model
    latent = (2, 16, 2, 16, 16)  # cond and uncond batched: 2 x 8 x 8 = 128 image tokens
    shape, work = hunyuan_shape(dm), HunyuanWork(2, 128, TEXT, 4)
    sliced, plain_peak = (forward_peak_bytes(shape, work, n, attention_kernel()) for n in (16, None))
    budget = int((sliced + plain_peak) / 2 / ALLOCATOR_HEADROOM)
    chunk = plan_hunyuan(dm, latent, 4, budget, TEXT).config.token_chunk
    assert 16 <= chunk < 128
    positive, negative = family.conds()
    samples = {"samples": torch.zeros(1, *latent[1:])}

    def sample(m):
        (out,) = nodes.common_ksampler(m, 5, 2, 5.0, "euler", "normal", positive, negative, samples)
        return out["samples"]

    plain = sample(model)
    budgeted, text = MemoryBudget.execute(model, budget / 2**30, 128, 128, 5).result[:2]
    out = sample(budgeted)
    assert relative_error(out, plain) <= TOL
    assert slice_spy and {c for kind, tokens, c in slice_spy if kind == "double"} == {chunk}
    assert text.startswith("budget ")  # the node's preview (it assumes 256 text tokens: here no slicing fits)


# --- Step Rehash: the shallow/deep split over the double + single stack (families/hunyuan_video/rehash.py) -------

STEPS = 6  # fixed schedule (warm-up 1, interval 2, tail 1): full 0, 1, 3, 5; rehashed 2, 4
FULL, REHASHED = [0, 1, 3, 5], [2, 4]
REHASH_LATENT = (1, 16, 3, 4, 4)


def rehash_patch(model, **kw):
    from comfyui_streamline.nodes.step_rehash import rehash_config
    from comfyui_streamline.techniques.rehash import apply_rehash

    settings = dict(rehash_mode="fixed", interval=2, warmup_steps=1, tail_steps=1, threshold=0.15, full_steps=3,
                    cache_block=-1, start_percent=0.0, end_percent=1.0, reuse="extrapolate")
    return apply_rehash(model, rehash_config(**{**settings, **kw}))


def rehash_report(model):
    from comfyui_streamline.host.options import REHASH_KEY

    return model.model_options["transformer_options"][REHASH_KEY].last.report


def rehash_sample(model, steps: int = STEPS) -> torch.Tensor:
    import nodes

    positive, negative = spec("HunyuanVideo").conds()
    with torch.inference_mode():
        (out,) = nodes.common_ksampler(model, 7, steps, 5.0, "euler", "normal", positive, negative,
                                       {"samples": torch.zeros(REHASH_LATENT)})
    return out["samples"].clone()


@contextmanager
def stack_calls(model):
    """[(step, stack position, input, output)] of every block the forward runs: a double block's (img, txt) joined
    image first, a single block's joint stream as forward_orig joined it."""
    dm = model.model.diffusion_model
    doubles = len(dm.double_blocks)
    calls, handles, given = [], [], {}

    def step_of(kwargs) -> int:
        to = kwargs.get("transformer_options", {})
        return int((to["sample_sigmas"] == to["sigmas"].max()).nonzero()[0, 0])

    for position, block in enumerate([*dm.double_blocks, *dm.single_blocks]):
        def pre(module, args, kwargs, position=position):
            streams = torch.cat((kwargs["img"], kwargs["txt"]), 1) if position < doubles else args[0]
            given[position] = streams.clone()  # the blocks update their inputs in place

        def post(module, args, kwargs, out, position=position):
            streams = torch.cat(out, 1) if position < doubles else out
            calls.append((step_of(kwargs), position, given.pop(position), streams.clone()))
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def exit_form(t: torch.Tensor, double_stream: bool, exit_double: bool, txt_first: bool) -> torch.Tensor:
    """Streams in the form the deep span's exit has: image first after a double block, forward_orig's join after a
    single one."""
    if not txt_first or double_stream == exit_double:
        return t
    if double_stream:  # (img, txt) -> (txt, img)
        return torch.cat((t[:, t.shape[1] - TEXT:], t[:, :t.shape[1] - TEXT]), 1)
    return torch.cat((t[:, TEXT:], t[:, :TEXT]), 1)  # (txt, img) -> (img, txt)


def test_rehash_off_and_all_full_are_bit_identical():
    model = sized(2, 2)
    plain = rehash_sample(model)
    assert torch.equal(rehash_sample(rehash_patch(model, rehash_mode="off")), plain)
    all_full = rehash_patch(model, warmup_steps=STEPS)
    assert torch.equal(rehash_sample(all_full), plain)
    assert rehash_report(all_full).full == STEPS


@pytest.mark.parametrize("depth, single, cache_block, deep", [
    (2, 2, -1, [1, 2]),  # the deep span crosses the double -> single boundary
    (3, 1, 1, [1, 2]),  # the deep span ends in a double block
    (1, 3, 1, [1, 2]),  # the deep span is in the single blocks
])
def test_rehash_steps_skip_the_deep_blocks_and_add_the_stored_residual(monkeypatch, depth, single, cache_block,
                                                                       deep):
    """Full steps run every block and store what the deep span adds (in the form the stream has where it ends);
    rehash steps run only the shallow blocks, and the block after the span gets its input plus the residual that
    core.rehash.reused_feature makes of the stored ones (fidelity tied to the full steps)."""
    from comfyui_streamline.core.rehash import reused_feature
    from comfyui_streamline.techniques import rehash as step_rehash

    stored, reused = [], []
    real_store, real_reuse = step_rehash.RehashCallState.store, step_rehash.RehashCallState.reuse

    def store(self, feature):
        stored.append((self.sigma, feature.clone()))
        return real_store(self, feature)

    def reuse(self, shallow):
        out = real_reuse(self, shallow)
        if out is not None:
            reused.append((self.sigma, out.clone()))
        return out

    monkeypatch.setattr(step_rehash.RehashCallState, "store", store)
    monkeypatch.setattr(step_rehash.RehashCallState, "reuse", reuse)
    model = sized(depth, single)
    patched = rehash_patch(model, cache_block=cache_block)
    with stack_calls(model) as calls:
        out = rehash_sample(patched)
    positions = depth + single
    per_step = defaultdict(list)
    for step, position, _, _ in calls:
        per_step[step].append(position)
    shallow = [p for p in range(positions) if p not in deep]
    for step in FULL:
        assert per_step[step] == list(range(positions)), (step, per_step[step])
    for step in REHASHED:
        assert per_step[step] == shallow, (step, per_step[step])
    assert len(stored) == len(FULL) and len(reused) == len(REHASHED)
    assert torch.isfinite(out).all() and rehash_report(patched).rehashed == len(REHASHED)

    first, last = deep[0], deep[-1]
    exit_double = last < depth
    txt_first = not getattr(model.model.diffusion_model.double_blocks[0], "flipped_img_txt", False)

    def streams(step, position, which):  # 2: input, 3: output; in the exit's form
        (t,) = [c[which] for c in calls if c[0] == step and c[1] == position]
        return exit_form(t, position < depth, exit_double, txt_first)

    for (sigma, residual), step in zip(stored, FULL):
        assert torch.allclose(residual, streams(step, last, 3) - streams(step, first, 2), rtol=0, atol=1e-5)
    for (sigma, cached), step in zip(reused, REHASHED):
        history = [(s, d) for s, d in stored if s > sigma][-2:]
        expected = torch.cat([reused_feature([(s, d.chunk(2)[i]) for s, d in history], sigma, "extrapolate")
                              for i in range(2)])
        assert torch.allclose(cached, expected, rtol=0, atol=1e-6)
        # the block after the span runs on the streams leaving the last shallow block plus the reused residual
        assert torch.allclose(streams(step, last + 1, 2), streams(step, first - 1, 3) + cached, rtol=0, atol=1e-5)


def test_streamline_slicing_and_step_rehash_compose(slice_spy):
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    model = sized(2, 2)
    alone = rehash_patch(model)
    unsliced = rehash_sample(alone)
    assert not slice_spy
    for both in (rehash_patch(StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0]),
                 StreamlineModelPatch.execute(rehash_patch(model), frame_chunk=1, spatial_chunk=0).result[0]):
        out = rehash_sample(both)
        assert slice_spy and relative_error(out, unsliced) <= 1e-5
        assert rehash_report(both).rehashed == rehash_report(alone).rehashed > 0
        slice_spy.clear()


def test_a_deep_block_another_node_replaces_keeps_every_step_full(caplog):
    calls = []

    def theirs(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    other = sized(2, 2).clone()
    other.set_model_patch_replace(theirs, "dit", "single_block", 0)  # stack position 2: deep
    expected = rehash_sample(other)
    calls.clear()
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    model = rehash_patch(other)
    assert torch.equal(rehash_sample(model), expected) and len(calls) == STEPS
    assert rehash_report(model).rehashed == 0
    assert any("('single_block', 0)" in r.getMessage() for r in caplog.records)


def test_rehash_split_bytes_and_the_tokens_the_laws_count():
    """Step Rehash's split keeps the deep span's entry, joined: (batch, image + text tokens, C), planned as held;
    1.5's laws count SigLIP's tokens joined to the text."""
    from comfyui_streamline.families.hunyuan_video.adapter import HUNYUAN_VIDEO
    from comfyui_streamline.families.hunyuan_video.laws import TEXT_TOKENS, hunyuan_work

    dm = loaded("HunyuanVideo").model.diffusion_model
    latent = (2, 16, 3, 10, 12)  # 90 image tokens
    assert HUNYUAN_VIDEO.rehash_split_bytes(dm, latent, 4) == 2 * (90 + TEXT_TOKENS) * 256 * 4
    assert hunyuan_work(dm, latent, 4, TEXT).joint == 90 + TEXT


def test_hunyuan15_laws_count_the_vision_tokens():
    from comfyui_streamline.families.hunyuan_video.laws import VISION_TOKENS, hunyuan_work

    v15 = loaded("HunyuanVideo15").model.diffusion_model
    assert hunyuan_work(v15, (2, 32, 3, 10, 12), 4, TEXT).joint == 90 + TEXT + VISION_TOKENS
