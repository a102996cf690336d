"""What today's ComfyUI (0.33) calls in the functions the pack mirrors, honoured exactly, and what the pack does
not know never dropped:

- UNet: middle_block_after_patch, and an output_block_patch that hands back no skip (`hsp is None`);
- Wan: attn2_patch (core's MultiTalk patch class, on its tiny audio model), double_block patches (run by
  forward_orig after each block; Step Rehash then runs every step in full), Bernini's context_latents, and
  the per-block transformer_options keys (block_index, total_blocks, grid_sizes);
- an invented patch key, replacement or cond: that call (UNet) or those blocks (Wan) run ComfyUI's own
  code, bit-identical, with one log line naming it;
- the host verdict: on a host the pack has not recorded, its self-check runs once (equal: sliced, one info
  line; not equal: ComfyUI's own forward, bit-identical, one warning with the check command).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import types

import pytest
import torch

pytestmark = pytest.mark.host

LOGGER = "ComfyUI-Streamline"
TOL = 1e-5


def _host_has_0_33_hooks() -> bool:
    try:
        from comfy.ldm.modules.diffusionmodules import openaimodel
    except ImportError:  # no host: the host marker skips these tests
        return False
    import inspect

    return "middle_block_after_patch" in inspect.getsource(openaimodel.UNetModel._forward)


HOST_0_33 = pytest.mark.skipif(not _host_has_0_33_hooks(), reason="a ComfyUI 0.33 hook (this host is older)")


def relative_error(out, ref) -> float:
    assert out.shape == ref.shape
    assert torch.isfinite(ref).all() and ref.abs().max() > 1e-3
    return ((out - ref).abs().max() / ref.abs().max()).item()


def streamline_records(caplog, level=logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= level]


# --- UNet --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def sd15():
    from comfyui_streamline.testing.model_families import FAMILIES, load

    return load(FAMILIES["SD15"])


def unet_call(model, patches: dict, **extra_kwargs):
    """One diffusion-model call through the model's wrappers (batch 2, 16x16 latent)."""
    import comfy.patcher_extension

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([500.0, 400.0])
    context = torch.randn(2, 7, 768, generator=g)
    to = {**model.model_options["transformer_options"], "patches": {k: list(v) for k, v in patches.items()},
          "wrappers": model.wrappers}
    dm = model.model.diffusion_model
    with torch.no_grad():
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            dm._forward, dm, comfy.patcher_extension.get_all_wrappers(
                comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, to, is_model_options=False)
        ).execute(x, t, context, None, None, to, **extra_kwargs)


def streamlined(model):
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.techniques.slicing import apply_streamline

    return apply_streamline(model, SliceConfig(frame_chunk=1, spatial_chunk=16, scale_with_level=False))


@pytest.fixture
def sliced_calls(monkeypatch):
    """Counts the calls the pack's sliced UNet forward runs."""
    from comfyui_streamline.families.unet import forward as streamlined_unet

    calls = []
    real = streamlined_unet.streamlined_unet_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(streamlined_unet, "streamlined_unet_forward", spy)
    return calls


@HOST_0_33
def test_unet_middle_block_after_patch_is_honoured(caplog, sliced_calls):
    patches = {"middle_block_after_patch": [lambda a: {"h": a["h"] * 1.5 + a["emb"].mean()}]}
    plain = unet_call(sd15(), patches)
    assert relative_error(plain, unet_call(sd15(), {})) > 1e-3  # the patch changes the output
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = unet_call(streamlined(sd15()), patches)
    assert sliced_calls == [1]
    assert relative_error(out, plain) <= TOL
    assert not streamline_records(caplog, logging.WARNING)


@HOST_0_33
def test_unet_output_block_patch_without_skip(sliced_calls):
    """A patch that takes over the concatenation (hands back hsp None): ComfyUI 0.33 then skips its own."""
    patches = {"output_block_patch": [lambda h, hsp, to: (torch.cat([h, hsp * 0.5], dim=1), None)]}
    plain = unet_call(sd15(), patches)
    out = unet_call(streamlined(sd15()), patches)
    assert sliced_calls == [1]
    assert relative_error(out, plain) <= TOL


def test_unet_unknown_patch_and_cond_run_comfyuis_forward(caplog, sliced_calls):
    invented = {"streamline_test_invented_patch": [lambda *a: None]}
    plain = unet_call(sd15(), {})
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = streamlined(sd15())
        for _ in range(2):
            assert torch.equal(unet_call(model, invented), plain)
        assert torch.equal(unet_call(model, {}, streamline_test_invented_cond=torch.ones(2)), plain)
    assert sliced_calls == []
    messages = streamline_records(caplog, logging.WARNING)
    assert len(messages) == 2, messages  # one per unknown thing, not one per call
    assert "'streamline_test_invented_patch'" in messages[0] and "ComfyUI's own forward" in messages[0]
    assert "'streamline_test_invented_cond'" in messages[1]


def test_a_patched_builtin_layer_type_runs_through_the_hosts_dispatch():
    """forward_timestep_embed_patch on a ResBlock: 0.33 hands it to the patch, 0.3.64 to ResBlock; the pack
    runs such a layer through the host's own dispatch either way."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    from comfyui_streamline.families.unet_common.layer_roles import Role, role_of

    block = sd15().model.diffusion_model.input_blocks[1][0]
    assert isinstance(block, ResBlock)
    assert role_of(block, ()) is Role.RES_BLOCK
    assert role_of(block, (ResBlock,)) is Role.WHOLE


# --- the host verdict --------------------------------------------------------------------------------------

@pytest.fixture
def unrecorded_host(monkeypatch):
    """A host the pack has not recorded: no fingerprint matches; verdicts start afresh."""
    from comfyui_streamline.host import fingerprints as host_fingerprints

    monkeypatch.setattr(host_fingerprints, "RECORDED", {})
    monkeypatch.setattr(host_fingerprints, "_VERDICTS", {})
    return host_fingerprints


def test_self_checks_give_comfyuis_output_on_this_host():
    from comfyui_streamline.families.svd.forward import svd_self_check
    from comfyui_streamline.families.unet.forward import unet_self_check
    from comfyui_streamline.families.wan.patch import wan_self_check

    assert unet_self_check() <= 1e-12
    assert svd_self_check() <= 1e-12
    assert wan_self_check() <= 1e-5


@HOST_0_33
def test_self_check_catches_a_mirror_that_drops_a_hook(monkeypatch):
    """The self-checks exercise the hooks: a sliced forward that dropped middle_block_after_patch (the fault
    the pack had on 0.33), or Wan's attn2_patch, is told apart from ComfyUI's."""
    from comfyui_streamline.families.unet import forward as streamlined_unet
    from comfyui_streamline.families.svd import forward as svd_unet
    from comfyui_streamline.families.wan import block
    from comfyui_streamline.families.wan.patch import wan_self_check

    dropped = lambda patches, h, *args: h  # noqa: E731
    monkeypatch.setattr(streamlined_unet, "middle_block_after", dropped)
    monkeypatch.setattr(svd_unet, "middle_block_after", dropped)
    assert streamlined_unet.unet_self_check() > 1e-3
    assert svd_unet.svd_self_check() > 1e-3
    monkeypatch.setattr(block, "host_calls_attn2_patch", lambda: False)
    assert wan_self_check() > 1e-3


def test_unrecorded_host_that_checks_equal_runs_sliced_with_one_info_line(unrecorded_host, caplog, sliced_calls):
    plain = unet_call(sd15(), {})
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = streamlined(sd15())
        outs = [unet_call(model, {}) for _ in range(2)]
    assert sliced_calls == [1, 1, 1]  # the self-check's, then the two calls
    assert all(relative_error(out, plain) <= TOL for out in outs)
    messages = streamline_records(caplog)
    verdicts = [m for m in messages if "self-check" in m]
    assert len(verdicts) == 1 and "runs sliced" in verdicts[0]
    assert not streamline_records(caplog, logging.WARNING)


def test_unrecorded_host_that_checks_different_runs_comfyuis_forward(unrecorded_host, monkeypatch, caplog,
                                                                     sliced_calls):
    from comfyui_streamline.families.unet import forward as streamlined_unet

    monkeypatch.setattr(streamlined_unet, "unet_self_check", lambda video=False: 0.02)
    plain = unet_call(sd15(), {})
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = streamlined(sd15())
        outs = [unet_call(model, {}) for _ in range(2)]
    assert sliced_calls == []
    assert all(torch.equal(out, plain) for out in outs)
    messages = streamline_records(caplog)
    assert len(messages) == 1 and "ComfyUI's own" in messages[0]
    assert unrecorded_host.CHECK_COMMAND in messages[0]


def test_a_self_check_that_fails_is_a_verdict_for_comfyui(unrecorded_host, caplog):
    def broken():
        raise RuntimeError("no kernel for this dtype")

    with caplog.at_level(logging.INFO, logger=LOGGER):
        verdicts = [unrecorded_host.verdict("Test", {"comfy f": len}, broken) for _ in range(3)]
    assert not any(v.sliced for v in verdicts)
    assert verdicts[0].failure == "RuntimeError: no kernel for this dtype"
    assert len(streamline_records(caplog)) == 1


# --- Wan ---------------------------------------------------------------------------------------------------

FRAMES, HEIGHT, WIDTH = 3, 10, 12  # 3 x 5 x 6 = 90 tokens (patch 1x2x2)
DIM = 160  # MultiTalk's audio attention has 40 heads


@functools.lru_cache(maxsize=None)
def wan_model():
    from comfyui_streamline.testing.model_families import WAN_VARIANTS, load, wan

    spec = dataclasses.replace(WAN_VARIANTS["WAN21_T2V"], build=functools.partial(wan, dim=DIM, num_layers=2))
    return load(spec)


def wan_clone(token_chunk: int | None = 7):
    from comfyui_streamline.families.wan import install_wan_slicing

    clone = wan_model().clone()
    if token_chunk is not None:
        assert install_wan_slicing(clone, lambda to, x, tokens_per_frame: token_chunk) == [0, 1]
    return clone


def wan_call(model, **kwargs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, FRAMES, HEIGHT, WIDTH, generator=g)
    sigma = torch.tensor([0.7, 0.7])
    context = torch.randn(2, 8, 4096, generator=g)
    to = {**model.model_options["transformer_options"], "wrappers": model.wrappers}
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=context, transformer_options=to, **kwargs)


@pytest.fixture
def wan_slices(monkeypatch):
    from comfyui_streamline.families.wan import patch

    seen = []
    real = patch.sliced_block_forward

    def spy(block, x, *args):
        seen.append(args[-1])
        return real(block, x, *args)

    monkeypatch.setattr(patch, "sliced_block_forward", spy)
    return seen


def multitalk_patch():
    """Core's MultiTalk cross-attention patch (what WanInfiniteTalkToVideo sets) on a tiny audio model."""
    import comfy.ops
    from comfy.ldm.wan.model_multitalk import MultiTalkCrossAttnPatch
    from comfy_extras.nodes_model_patch import MultiTalkModelPatch
    from comfyui_streamline.host.tiny_models import randomize

    audio = MultiTalkModelPatch(audio_window=5, intermediate_dim=32, in_dim=DIM, out_dim=24, context_tokens=4,
                                num_layers=2, dtype=torch.float32, device="cpu",
                                operations=comfy.ops.disable_weight_init)
    return MultiTalkCrossAttnPatch(types.SimpleNamespace(model=randomize(audio, 5).float()), audio_scale=1.0)


def with_multitalk(model):
    model.set_model_patch(multitalk_patch(), "attn2_patch")
    g = torch.Generator().manual_seed(9)
    model.model_options["transformer_options"]["audio_embeds"] = torch.randn(2 * FRAMES, 4, 24, generator=g)
    return model


@HOST_0_33
def test_wan_multitalk_attn2_patch_is_honoured(caplog, wan_slices):
    plain = wan_call(wan_model().clone())
    reference = wan_call(with_multitalk(wan_clone(None)))
    assert relative_error(reference, plain) > 1e-3  # the patch's effect
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = wan_call(with_multitalk(wan_clone(7)))
    assert wan_slices == [7, 7]
    assert relative_error(out, reference) <= TOL
    assert not streamline_records(caplog, logging.WARNING)


@HOST_0_33
def test_wan_double_block_patch_and_block_keys(wan_slices):
    """A double_block patch (forward_orig runs it after each block) sees the block_index, total_blocks and
    grid_sizes the host sets, with the sliced blocks as without."""
    def record(seen):
        def patch(args):
            to = args["transformer_options"]
            seen.append((args["block_index"], to["block_index"], to["total_blocks"], tuple(to["grid_sizes"])))
            return {"img": args["img"] * 0.9 + args["x"].mean()}
        return patch

    ref_seen, seen = [], []
    ref_model, model = wan_clone(None), wan_clone(5)
    ref_model.set_model_double_block_patch(record(ref_seen))
    model.set_model_double_block_patch(record(seen))
    reference, out = wan_call(ref_model), wan_call(model)
    assert wan_slices == [5, 5]
    assert relative_error(out, reference) <= TOL
    assert seen == ref_seen == [(0, 0, 2, (3, 5, 6)), (1, 1, 2, (3, 5, 6))]


@HOST_0_33
def test_wan_bernini_context_latents(wan_slices):
    """Bernini's in-context reference latents: tokens appended to x, with their own RoPE, cut after the
    blocks. The sliced blocks slice those tokens too."""
    g = torch.Generator().manual_seed(4)
    import comfy.conds

    lat = [torch.randn(2, 16, 1, HEIGHT, WIDTH, generator=g)]
    kwargs = {"context_latents": lat}
    plain = wan_call(wan_clone(None))
    reference = wan_call(wan_clone(None), **kwargs)
    assert relative_error(reference, plain) > 1e-3
    out = wan_call(wan_clone(7), **kwargs)
    assert wan_slices == [7, 7]
    assert relative_error(out, reference) <= TOL
    assert comfy.conds.CONDList  # what model_base wraps them in for sampling


def test_wan_unknown_patch_and_cond_run_comfyuis_blocks(caplog, wan_slices):
    plain = wan_call(wan_clone(None))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = wan_clone(7)
        model.set_model_patch(lambda args: args, "streamline_test_invented_patch")
        out = wan_call(model)
        out_cond = wan_call(wan_clone(7), streamline_test_invented_cond=torch.ones(2))
    assert wan_slices == []
    assert torch.equal(out, plain) and torch.equal(out_cond, plain)
    messages = streamline_records(caplog, logging.WARNING)
    assert len(messages) == 2, messages  # once per thing, not once per block
    assert "streamline_test_invented_patch" in messages[0] and "ComfyUI's own block" in messages[0]
    assert "streamline_test_invented_cond" in messages[1]


def test_wan_unrecorded_host_runs_the_self_check_once(unrecorded_host, caplog, wan_slices):
    reference = wan_call(wan_clone(None))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = wan_call(wan_clone(7))
    assert wan_slices == [5] * 4 + [7, 7]  # the self-check's (two tiny models, two blocks), then the call's
    assert relative_error(out, reference) <= TOL
    verdicts = [m for m in streamline_records(caplog) if "self-check" in m]
    assert len(verdicts) == 1 and "Wan runs sliced" in verdicts[0]


def test_wan_unrecorded_host_that_checks_different_runs_comfyuis_blocks(unrecorded_host, monkeypatch, caplog,
                                                                         wan_slices):
    from comfyui_streamline.families.wan import patch

    monkeypatch.setattr(patch, "wan_self_check", lambda: 0.05)
    reference = wan_call(wan_clone(None))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = wan_call(wan_clone(7))
    assert wan_slices == []
    assert torch.equal(out, reference)
    messages = streamline_records(caplog)
    assert len(messages) == 1 and "Wan runs ComfyUI's own code" in messages[0]


# --- AnimateDiff-Evolved ----------------------------------------------------------------------------------

def ade_options():
    from comfyui_streamline.testing import synthetic

    return synthetic.ade_transformer_options(1)


def test_ade_self_check_equal_here_and_catches_a_dropped_motion_scale(monkeypatch):
    from comfyui_streamline.families.unet import forward as streamlined_unet

    (module_class, handler), = ade_options()["patches"]["forward_timestep_embed_patch"]
    assert streamlined_unet.ade_self_check(module_class, handler) <= 1e-12
    real = streamlined_unet.run_motion_module_sliced

    def drops_the_scale(module, *args, **kwargs):
        effect, module.effect = module.effect, None
        try:
            return real(module, *args, **kwargs)
        finally:
            module.effect = effect

    monkeypatch.setattr(streamlined_unet, "run_motion_module_sliced", drops_the_scale)
    assert streamlined_unet.ade_self_check(module_class, handler) > 1e-3


def test_unrecorded_ade_motion_modules_check_themselves_whole_video_groupnorm_runs_ades(unrecorded_host, caplog):
    from comfyui_streamline.families.unet.forward import ade_verdict

    with caplog.at_level(logging.INFO, logger=LOGGER):
        verdicts = [ade_verdict(ade_options()) for _ in range(3)]
    assert verdicts == [(True, False)] * 3
    messages = streamline_records(caplog)
    assert len(messages) == 2
    assert "motion modules runs sliced" in messages[0]
    assert "whole-video GroupNorm runs ComfyUI's own code" in messages[1] and "no self-check" in messages[1]


def test_ade_motion_modules_that_check_different_run_through_ades_forward(unrecorded_host, monkeypatch):
    """A motion module under a "not equal" verdict runs through ADE's own dispatch (ComfyUI's
    forward_timestep_embed and ADE's patch), not the pack's sliced path, and gives ADE's output."""
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.unet import forward as streamlined_unet
    from comfyui_streamline.host import tiny_models

    monkeypatch.setattr(streamlined_unet, "ade_self_check", lambda *a: 0.3)
    sliced = []
    real = streamlined_unet.run_motion_module_sliced
    monkeypatch.setattr(streamlined_unet, "run_motion_module_sliced", lambda *a, **k: sliced.append(1) or real(*a, **k))
    options = ade_options()
    (module_class, handler), = options["patches"]["forward_timestep_embed_patch"]
    module = tiny_models.randomize(module_class(in_channels=32, block_type="down", block_idx=0, module_idx=0,
                                                num_attention_heads=2, temporal_pe_max_len=8,
                                                zero_initialize=False), 4).double()
    module.set_video_length(4, 4)
    x = tiny_models.inputs((8, 32, 4, 4), 5)
    modules_sliced, _ = streamlined_unet.ade_verdict(options)
    run = streamlined_unet.StreamlinedForward(tiny_models.unet(), SliceConfig(2, 5, scale_with_level=False),
                                              streamlined_unet.LogOnce(), x, torch.zeros(8, 128, dtype=x.dtype),
                                              None, options, {}, None, modules_sliced)
    with torch.no_grad():
        out = run.run_motion(module, x.clone(), owned=False)
        reference = handler(module, x.clone(), None, None, options, None, None, None, None)
    assert not modules_sliced and sliced == []
    assert torch.equal(out, reference)


def test_motion_module_norm_reads_comfyuis_cast_path():
    """A motion module's GroupNorm with a weight patch (what lowvram or a LoRA on the norm installs:
    weight_function): the sliced path reads the norm through ComfyUI's cast path, once per call, as the
    layer's own forward does."""
    from comfyui_streamline.host import tiny_models
    from comfyui_streamline.families.unet.motion_module import norm_parameters, run_motion_module_sliced

    (module_class, handler), = ade_options()["patches"]["forward_timestep_embed_patch"]
    module = tiny_models.randomize(module_class(in_channels=32, block_type="down", block_idx=0, module_idx=0,
                                                num_attention_heads=2, temporal_pe_max_len=8,
                                                zero_initialize=False), 4).double()
    module.set_video_length(4, 4)
    norm = module.temporal_transformer.norm
    norm.weight_function = [lambda w: w * 1.5]
    x = tiny_models.inputs((8, 32, 4, 4), 5)
    weight, _ = norm_parameters(norm, x)
    assert torch.allclose(weight, norm.weight * 1.5)
    with torch.no_grad():
        theirs = handler(module, x.clone(), None, None, {}, None, None, None, None)
        ours = run_motion_module_sliced(module, x.clone(), None, {}, spatial_chunk=5, in_place=False)
        norm.weight_function = []
        unpatched = handler(module, x.clone(), None, None, {}, None, None, None, None)
    assert relative_error(theirs, unpatched) > 1e-3  # the patch matters
    assert relative_error(ours, theirs) <= 1e-12


def test_block_quantised_attention_keeps_query_blocks_whole(monkeypatch, caplog, wan_slices):
    """Under SageAttention or ComfyUI's int8 attention (queries quantised in blocks of 128 rows) token slices
    are multiples of 128, or the block runs unsliced with one line. (The kernel is stood in for by the one
    this host runs: what is tested is the pack's choice of slices.)"""
    import comfy.ldm.modules.attention as attention

    from comfyui_streamline.families.dit import block_hook
    from comfyui_streamline.families.wan import block

    monkeypatch.setattr(attention, "attention_sage", block.optimized_attention, raising=False)
    assert block_hook.block_quantised_attention() == "attention_sage"
    plain = wan_call(wan_clone(None))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = wan_call(wan_clone(7))  # 90 tokens: no multiple of 128 fits in a slice of 7
    assert wan_slices == [] and torch.equal(out, plain)
    messages = streamline_records(caplog, logging.WARNING)
    assert len(messages) == 1 and "quantises queries in blocks of 128" in messages[0]
    assert block_hook.exact_token_chunk(300) == 256 and block_hook.exact_token_chunk(127) == 0
    monkeypatch.undo()
    assert block_hook.block_quantised_attention() is None and block_hook.exact_token_chunk(300) == 300
