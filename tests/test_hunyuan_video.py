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
