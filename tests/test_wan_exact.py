"""The sliced Wan block (families/wan/) against ComfyUI's own Wan forward, and its memory laws (families/wan/laws.py).

Tiny random-weight Wan models through ComfyUI's loader (testing/model_families.py WAN_VARIANTS): Wan 2.1
t2v, Wan 2.1 i2v (CLIP-image tokens, WanI2VCrossAttention), Wan 2.2 5B (48 channels; per-token
modulation from per-frame timesteps, as WAN22.process_timestep gives them with a denoise mask). The
Wan 2.2 14B high/low-noise pair is the 2.1 architecture. The patch goes on a clone through ComfyUI's
block-replace hook; the forward is the diffusion model's own. CPU, fp32; exact means
max|patched - plain| <= 1e-5 * max|plain|.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import pytest
import torch

pytestmark = pytest.mark.host

TOL = 1e-5
STREAMLINE_LOGGER = "ComfyUI-Streamline"
FRAMES, HEIGHT, WIDTH = 3, 10, 12  # latent: 3 x 5 x 6 = 90 tokens


def relative_error(out, ref) -> float:
    assert out.shape == ref.shape
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.1
    return ((out - ref).abs().max() / ref.abs().max()).item()


def variant(name: str, **sizes):
    from comfyui_streamline.testing.model_families import WAN_VARIANTS, wan

    spec = WAN_VARIANTS[name]
    kind = {"WAN21_T2V": dict(model_type="t2v"), "WAN21_I2V": dict(model_type="i2v", in_dim=36),
            "WAN22_T2V": dict(model_type="t2v", in_dim=48, out_dim=48)}[name]
    return dataclasses.replace(spec, build=functools.partial(wan, **kind, **sizes))


@functools.lru_cache(maxsize=None)
def loaded(name: str, **sizes):
    from comfyui_streamline.testing.model_families import load

    return load(variant(name, num_layers=2, **sizes))


def patched_clone(model, token_chunk: int):
    from comfyui_streamline.families.wan import install_wan_slicing

    clone = model.clone()
    assert install_wan_slicing(clone, lambda to, x, tokens_per_frame: token_chunk) == [0, 1]
    return clone


def call_options(model) -> dict:
    """transformer_options as sampling hands them to the diffusion model (with the patcher's wrappers)."""
    return {**model.model_options["transformer_options"], "wrappers": model.wrappers}


def inputs(name: str, batch: int, seed: int = 0, modulation_rows: int = FRAMES):
    g = torch.Generator().manual_seed(seed)
    dm_in = {"WAN21_T2V": 16, "WAN21_I2V": 36, "WAN22_T2V": 48}[name]
    x = torch.randn(batch, dm_in, FRAMES, HEIGHT, WIDTH, generator=g)
    if name == "WAN22_T2V":  # one timestep per latent frame: per-token modulation, e of shape (B, E, 6, C)
        t = torch.rand(batch, modulation_rows, generator=g) * 1000
    else:
        t = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, 8, 4096, generator=g)
    kwargs = {"clip_fea": torch.randn(batch, 257, 1280, generator=g)} if name == "WAN21_I2V" else {}
    return x, t, context, kwargs


@pytest.fixture
def slice_spy(monkeypatch):
    """Records the token chunk of every sliced block call."""
    from comfyui_streamline.families.wan import block, patch

    calls = []
    original = block.sliced_block_forward

    def spy(blk, x, *args):
        calls.append((x.shape[1], args[-1]))
        return original(blk, x, *args)

    monkeypatch.setattr(patch, "sliced_block_forward", spy)
    return calls


@pytest.mark.parametrize("name", ["WAN21_T2V", "WAN21_I2V", "WAN22_T2V"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("token_chunk", [7, 30])  # 90 tokens: 13 slices (the last of 6), 3 slices
def test_sliced_forward_matches_comfyui(name, batch, token_chunk, slice_spy):
    model = loaded(name)
    dm = model.model.diffusion_model
    x, t, context, kwargs = inputs(name, batch)
    with torch.no_grad():
        plain = dm(x, t, context, **kwargs)
        out = dm(x, t, context, transformer_options=call_options(patched_clone(model, token_chunk)), **kwargs)
    error = relative_error(out, plain)
    print(f"\n[{name} batch {batch} chunk {token_chunk}] max|diff| / max|plain| = {error:.2e}")
    assert error <= TOL
    assert slice_spy == [(90, token_chunk)] * 2  # both blocks sliced


def test_the_first_block_returns_forward_origs_transposed_x_contiguous(monkeypatch):
    """forward_orig hands the first block a transposed x; the sliced block returns it contiguous (as ComfyUI
    0.33's block makes it), so the later blocks read and update a contiguous x."""
    from comfyui_streamline.families.wan import block, patch

    seen, original = [], block.sliced_block_forward

    def spy(blk, x, *args):
        given = x.is_contiguous()
        out = original(blk, x, *args)
        seen.append((given, out.is_contiguous()))
        return out

    monkeypatch.setattr(patch, "sliced_block_forward", spy)
    model = loaded("WAN21_T2V")
    x, t, context, kwargs = inputs("WAN21_T2V", 2)
    with torch.no_grad():
        model.model.diffusion_model(x, t, context, transformer_options=call_options(patched_clone(model, 30)))
    assert seen == [(False, True), (True, True)]


@pytest.mark.parametrize("rows", [2, 4, 7])  # 90 tokens over 2 rows (45 each), 4 (23, cut), 7 (13, cut)
def test_per_token_modulation_whatever_the_row_count(rows, slice_spy):
    """Wan 2.2 5B: token j reads the row of e that repeat_e gives it, also where rows do not divide tokens."""
    model = loaded("WAN22_T2V")
    x, t, context, kwargs = inputs("WAN22_T2V", 2, seed=rows, modulation_rows=rows)
    with torch.no_grad():
        plain = model.model.diffusion_model(x, t, context)
        out = model.model.diffusion_model(x, t, context, transformer_options=call_options(patched_clone(model, 11)))
    assert relative_error(out, plain) <= TOL
    assert len(slice_spy) == 2


def test_modulation_rows_are_repeat_e():
    from comfy.ldm.wan.model import repeat_e
    from comfyui_streamline.families.wan.block import ModulationRows

    for rows, tokens in [(1, 10), (2, 10), (3, 10), (4, 90), (10, 10), (12, 10), (21, 21 * 6 + 5)]:
        e = torch.randn(2, rows, 3)
        whole = repeat_e(e, torch.empty(2, tokens, 3)).expand(2, tokens, 3)
        take = ModulationRows(rows, tokens)
        for start, end in [(0, tokens), (0, 1), (3, 7), (tokens - 4, tokens)]:
            assert torch.equal(take.take(e, start, end).expand(2, end - start, 3), whole[:, start:end]), (rows, tokens)


def test_model_forward_through_apply_model():
    """BaseModel.apply_model (what the samplers call) with the i2v conds as WAN21.extra_conds makes them."""
    model = loaded("WAN21_I2V")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, FRAMES, HEIGHT, WIDTH, generator=g)
    sigma = torch.tensor([0.7, 0.7])
    conds = dict(c_concat=torch.randn(2, 20, FRAMES, HEIGHT, WIDTH, generator=g),
                 c_crossattn=torch.randn(2, 8, 4096, generator=g), clip_fea=torch.randn(2, 257, 1280, generator=g))
    with torch.no_grad():
        plain = model.model.apply_model(x, sigma, **conds)
        out = model.model.apply_model(x, sigma, transformer_options=call_options(patched_clone(model, 16)), **conds)
    assert relative_error(out, plain) <= TOL


@pytest.mark.parametrize("name", ["WAN21_T2V", "WAN21_I2V"])
def test_ksampler_with_the_patch_matches_without(name, slice_spy):
    import nodes
    from comfyui_streamline.testing.model_families import WAN_VARIANTS

    model, spec = loaded(name), WAN_VARIANTS[name]
    positive, negative = spec.conds()
    latent = {"samples": torch.zeros(1, 16, 2, HEIGHT, WIDTH)}  # 2 frames, as the i2v conds' start image

    def sample(m):
        (out,) = nodes.common_ksampler(m, 5, 2, spec.cfg, "euler", "normal", positive, negative, latent)
        return out["samples"]

    plain = sample(model)
    out = sample(patched_clone(model, 16))
    assert relative_error(out, plain) <= TOL
    assert slice_spy == [(60, 16)] * 2 * 2  # 2 steps x 2 blocks, cond and uncond batched


def test_unknown_block_type_runs_unsliced_with_one_log_line(caplog, slice_spy):
    from comfy.ldm.wan.model import WanAttentionBlock
    from comfyui_streamline.testing.model_families import load

    class OtherBlock(WanAttentionBlock):  # another pack's block: its own forward
        def forward(self, x, **kwargs):
            return super().forward(x, **kwargs)

    model = load(variant("WAN21_T2V", num_layers=2), seed=1)
    model.model.diffusion_model.blocks[1].__class__ = OtherBlock
    x, t, context, kwargs = inputs("WAN21_T2V", 2)
    clone = patched_clone(model, 16)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger=STREAMLINE_LOGGER):
        plain = model.model.diffusion_model(x, t, context)
        for _ in range(2):
            out = model.model.diffusion_model(x, t, context, transformer_options=call_options(clone))
    assert relative_error(out, plain) <= TOL
    notices = [r.getMessage() for r in caplog.records if r.name == STREAMLINE_LOGGER and "OtherBlock" in r.getMessage()]
    assert len(notices) == 1, notices
    assert slice_spy == [(90, 16)] * 2  # block 0 sliced in both calls, block 1 never


def test_another_packs_block_replacement_is_kept(caplog):
    from comfyui_streamline.families.wan import install_wan_slicing

    model = loaded("WAN21_T2V")
    clone = model.clone()
    seen = []

    def theirs(args, extra):
        seen.append(1)
        return extra["original_block"](args)

    clone.set_model_patch_replace(theirs, "dit", "double_block", 0)
    with caplog.at_level(logging.WARNING, logger=STREAMLINE_LOGGER):
        assert install_wan_slicing(clone, lambda *a: 16) == [1]
    assert sum("already have a block replacement" in r.getMessage() for r in caplog.records) == 1
    x, t, context, _ = inputs("WAN21_T2V", 1)
    with torch.no_grad():
        plain = model.model.diffusion_model(x, t, context)
        out = model.model.diffusion_model(x, t, context, transformer_options=call_options(clone))
    assert seen == [1] and relative_error(out, plain) <= TOL


def test_unsupported_wan_reason():
    from comfyui_streamline.families.wan import unsupported_wan_reason

    assert unsupported_wan_reason(loaded("WAN21_T2V").model.diffusion_model) is None
    assert "not a Wan model" in unsupported_wan_reason(torch.nn.Linear(2, 2))


def test_recorded_host_fingerprints_are_this_hosts():
    from comfyui_streamline.host.fingerprints import unrecorded
    from comfyui_streamline.families.wan.patch import wan_functions

    assert unrecorded(wan_functions()) == []


# --- memory: the live-tensor counter on the CPU against families/wan/laws.py ------------------------------

MEMORY_SIZES = dict(dim=256, ffn_dim=1536)  # 2 heads; FFN 6x wide as Wan 2.1 1.3B's (8960 / 1536)
MEMORY_LATENT = (2, 64, 64)  # 2 x 32 x 32 = 2048 tokens


def measured_peak(model, batch: int, token_chunk: int | None, name: str = "WAN21_T2V", latent=MEMORY_LATENT) -> int:
    from comfyui_streamline.core.memtrace import LiveTensorMeter

    dm = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dm.in_dim, *latent, generator=g)
    t = torch.rand(batch, *latent[:1] * (name == "WAN22_T2V"), generator=g) * 1000  # 5B: per frame
    context = torch.randn(batch, 8, 4096, generator=g)
    kwargs = {"clip_fea": torch.randn(batch, 257, 1280, generator=g)} if name == "WAN21_I2V" else {}
    options = {} if token_chunk is None else call_options(patched_clone(model, token_chunk))
    with torch.no_grad(), LiveTensorMeter() as meter:
        dm(x, t, context, transformer_options=options, **kwargs)
    return meter.peak_bytes


def predicted_peak(name: str, batch: int, token_chunk: int | None, latent=MEMORY_LATENT) -> float:
    from comfyui_streamline.families.wan.laws import SUB_QUADRATIC, WanShape, WanWork, forward_peak_bytes

    frames, h, w = latent
    shape = WanShape(MEMORY_SIZES["dim"], MEMORY_SIZES["ffn_dim"], MEMORY_SIZES["dim"] // 128, layers=2,
                     in_dim={"WAN21_I2V": 36, "WAN22_T2V": 48}.get(name, 16), out_dim=48 if name == "WAN22_T2V" else 16,
                     i2v=name == "WAN21_I2V")
    from comfyui_streamline.families.wan.block import host_copies_block_input

    work = WanWork(batch, frames * (h // 2) * (w // 2), text_tokens=8, image_tokens=257 if name == "WAN21_I2V" else 0,
                   modulation_rows=frames if name == "WAN22_T2V" else 1, input_copy=host_copies_block_input())
    return forward_peak_bytes(shape, work, token_chunk, SUB_QUADRATIC)


@pytest.mark.parametrize("name", ["WAN21_T2V", "WAN21_I2V", "WAN22_T2V"])
def test_memory_fine_slicing_and_predictions(name):
    model = loaded(name, **MEMORY_SIZES)
    rows = []
    for batch, chunk in [(2, None), (2, 64), (2, 512), (1, None), (1, 128)]:
        measured = measured_peak(model, batch, chunk, name)
        predicted = predicted_peak(name, batch, chunk)
        rows.append((batch, chunk, measured, predicted))
        print(f"\n[{name} batch {batch} chunk {chunk}] measured {measured / 2**20:.2f} MiB, predicted "
              f"{predicted / 2**20:.2f} MiB ({predicted / measured - 1:+.1%})")
        assert abs(predicted / measured - 1) <= 0.05
    ratio = rows[0][2] / rows[1][2]
    print(f"[{name}] ComfyUI / sliced (64 tokens) peak: {ratio:.1f}x")
    assert ratio >= 3


def test_planned_token_slice_fits_and_is_largest():
    from comfyui_streamline.core.plan_search import BudgetError, PlanSearch
    from comfyui_streamline.families.wan.laws import SDPA, WanShape, WanWork, forward_peak_bytes, plan_tokens

    shape = WanShape(1536, 8960, 12, layers=30)  # Wan 2.1 1.3B
    work = WanWork(2, 21 * 30 * 52, text_tokens=512, dtype_bytes=2)  # 480x832x81, CFG batched, fp16
    plain = forward_peak_bytes(shape, work, None, SDPA)

    def planned(budget: float) -> int:
        return plan_tokens(shape, work, PlanSearch(budget, "a test", headroom=1.0), SDPA).candidate

    n = planned(plain / 3)
    assert forward_peak_bytes(shape, work, n, SDPA) <= plain / 3 < forward_peak_bytes(shape, work, n + 1, SDPA)
    assert planned(plain) == work.tokens
    with pytest.raises(BudgetError):
        planned(1.0)


@pytest.mark.parametrize("kernel_name", ["SDPA", "SUB_QUADRATIC"])
def test_planned_token_slice_is_the_first_that_fits_in_a_scan(kernel_name):
    """The plan search bisects: at Wan 2.1 1.3B's dims over one 480x832 latent frame, for budgets across the
    range, it finds the slice a scan of every slice from all tokens down to one finds."""
    from comfyui_streamline.core.plan_search import PlanSearch
    from comfyui_streamline.families.wan import laws
    from comfyui_streamline.families.wan.laws import WanShape, WanWork, forward_peak_bytes, plan_tokens, token_slices

    kernel = getattr(laws, kernel_name)
    shape, work = WanShape(1536, 8960, 12, layers=2), WanWork(2, 1560, text_tokens=512, input_copy=True)
    peaks = [forward_peak_bytes(shape, work, n, kernel) for n in token_slices(work)]
    for f in (0.0, 0.01, 0.1, 0.3, 0.6, 0.9, 0.999, 1.0):
        budget = peaks[-1] + (peaks[0] - peaks[-1]) * f
        scanned = next(n for n, p in zip(token_slices(work), peaks) if p <= budget)
        assert plan_tokens(shape, work, PlanSearch(budget, "a test", headroom=1.0), kernel).candidate == scanned


def test_automatic_slice_at_wan_1_3b_block_dims():
    """Issue 24's case: Wan 2.1 1.3B's block dims, 2 blocks, 480x832 with 17 frames (5 latent frames of 1560
    tokens: 7800), CFG batched, fp32, the CPU's sub-quadratic attention. The automatic slice is the most
    latent frames per slice whose predicted peak is within AUTO_PEAK_CLOSENESS of one frame per slice's; the
    next larger is not. Against the fixed count of values it replaces (6826 of 7800 tokens) and ComfyUI's
    forward, it predicts over 2.4x less."""
    from comfyui_streamline.core.plan_search import AUTO_PEAK_CLOSENESS
    from comfyui_streamline.core.slicing import SliceConfig, frame_slices, token_chunk_size
    from comfyui_streamline.families.wan.block import host_copies_block_input
    from comfyui_streamline.families.wan.laws import (SUB_QUADRATIC, WanShape, WanWork, automatic_token_chunk,
                                                      forward_peak_bytes)

    shape = WanShape(1536, 8960, 12, layers=2)
    work = WanWork(2, 7800, text_tokens=512, input_copy=host_copies_block_input())
    slices = frame_slices(work.tokens, 1560)

    def peak(n):
        return forward_peak_bytes(shape, work, n, SUB_QUADRATIC)

    chosen = automatic_token_chunk(shape, work, 1560, SUB_QUADRATIC)
    bound = (1 + AUTO_PEAK_CLOSENESS) * peak(slices[-1])
    assert chosen in slices and peak(chosen) <= bound
    assert chosen == slices[0] or peak(slices[slices.index(chosen) - 1]) > bound
    fixed = token_chunk_size(SliceConfig(), work.batch, work.tokens, 1560, shape.dim)  # the count it replaces
    print(f"\nautomatic {chosen} tokens: {peak(chosen) / 2**30:.2f} GiB; fixed count {fixed}: "
          f"{peak(fixed) / 2**30:.2f} GiB; ComfyUI: {peak(None) / 2**30:.2f} GiB")
    assert peak(fixed) / peak(chosen) > 2.4 and peak(None) / peak(chosen) > 2.4


def test_automatic_slice_measured_is_exact_and_its_law(slice_spy):
    """Streamline Model Patch left automatic, through the node's wrappers: the block hooks get the slice the
    laws choose (5 latent frames of 256 tokens at these dims), the output is bit-identical to ComfyUI's
    forward, and the live-tensor peak of that slice is within 1% of the law."""
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.wan.adapter import WAN
    from comfyui_streamline.techniques.slicing import apply_streamline

    latent = (5, 32, 32)  # 5 x 16 x 16 = 1280 tokens
    model = loaded("WAN21_T2V", **MEMORY_SIZES)
    dm = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 16, *latent, generator=g), torch.tensor([0.7, 0.7])
    context = torch.randn(2, 8, 4096, generator=g)
    tokens = 5 * 16 * 16
    chunk = WAN.call_slicing(dm, x, context, SliceConfig()).token_chunk
    assert chunk % 256 == 0 and chunk < tokens  # whole latent frames, sliced
    clone = apply_streamline(model, SliceConfig())
    with torch.no_grad():
        plain = model.model.apply_model(x, sigma, c_crossattn=context)
        out = model.model.apply_model(x, sigma, c_crossattn=context, transformer_options=call_options(clone))
    assert torch.equal(out, plain)
    assert slice_spy == [(tokens, chunk)] * 2  # both blocks, at the automatic slice
    measured = measured_peak(model, 2, chunk, latent=latent)
    predicted = predicted_peak("WAN21_T2V", 2, chunk, latent)
    print(f"\nautomatic {chunk} of {tokens} tokens: measured {measured / 2**20:.2f} MiB, predicted "
          f"{predicted / 2**20:.2f} MiB ({predicted / measured - 1:+.2%})")
    assert abs(predicted / measured - 1) <= 0.01


def test_token_chunk_from_slice_config():
    from comfyui_streamline.core.slicing import token_chunk_size
    from comfyui_streamline.core.slicing import SliceConfig

    # frame_chunk counts (batch x frames) samples: 4 with CFG batched = 2 latent frames of 1560 tokens
    assert token_chunk_size(SliceConfig(frame_chunk=4), batch=2, tokens=21 * 1560, tokens_per_frame=1560,
                            dim=1536) == 2 * 1560
    assert token_chunk_size(SliceConfig(), batch=2, tokens=21 * 1560, tokens_per_frame=1560, dim=1536) == 6826
    assert token_chunk_size(SliceConfig(frame_chunk=100), batch=1, tokens=90, tokens_per_frame=30, dim=128) == 90
