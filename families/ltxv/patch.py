"""Attach the sliced LTX blocks (block.py) to a MODEL clone through ComfyUI's own hooks; no monkeypatching.

LTXVModel._process_transformer_blocks hands a ("double_block", i) replacement {"img", "txt", "attention_mask",
"vec", "pe", "transformer_options", "self_attention_mask", "prompt_timestep"}; LTXAVModel's hands {"img": (vx,
ax), "v_context", "a_context", "attention_mask", "v_timestep", "a_timestep", "v_pe", "a_pe", "v_cross_pe",
"a_cross_pe", the four cross-attention timesteps, "transformer_options" (per block: STG's flag),
"self_attention_mask", "v_prompt_timestep", "a_prompt_timestep"}; neither hands the block itself. A
DIFFUSION_MODEL wrapper (families/dit/hooks.py) puts the blocks, the latent's tokens per frame and the conds the
pack does not know into a per-call copy of transformer_options under CALL_KEY.

Each replacement runs its block sliced when the block's class forward is the host's and the run asks for slices,
else calls the host's own block (`original_block`), saying why once per run. With Step Rehash on the call (an
LtxRehashCall, rehash.py) the same replacement runs, skips or stores the deep blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import comfy.model_management
import torch
import torch.nn as nn
from comfy.ldm.lightricks import model as ltx_model
from comfy.model_patcher import ModelPatcher
from torch import Tensor

from ...host import fingerprints as host_fingerprints
from ...host.log import LogOnce
from ...host.options import DIT_CALL_KEY as CALL_KEY, DIT_REHASH_CALL_KEY as REHASH_KEY
from ...host.options import DIT_WRAPPER_KEY as WRAPPER_KEY
from ..dit.block_hook import SlicedBlockHook, TokenChunkFor, common_unsliced_reason, token_chunk_from_state
from ..dit.hooks import block_keys, remove_block_hooks, install_sliced_blocks
from .block import sliced_av_block, sliced_ltxv_block, timestep_rows


def av_module():
    """comfy.ldm.lightricks.av_model (LTX-2), or None on a host without it (ComfyUI 0.3.64)."""
    try:
        from comfy.ldm.lightricks import av_model
    except ImportError:
        return None
    return av_model


def ltxv_functions() -> dict[str, Callable]:
    """The host functions the sliced blocks mirror."""
    functions = {
        "comfy LTX BasicTransformerBlock.forward": ltx_model.BasicTransformerBlock.forward,
        "comfy LTX CrossAttention.forward": ltx_model.CrossAttention.forward,
        "comfy LTX apply_rotary_emb": ltx_model.apply_rotary_emb,
        "comfy LTXVModel._process_transformer_blocks": ltx_model.LTXVModel._process_transformer_blocks,
    }
    for name in ("apply_cross_attention_adaln", "_attention_with_guide_mask"):
        if hasattr(ltx_model, name):
            functions[f"comfy LTX {name}"] = getattr(ltx_model, name)
    av = av_module()
    if av is not None:
        functions.update({
            "comfy LTX BasicAVTransformerBlock.forward": av.BasicAVTransformerBlock.forward,
            "comfy LTX BasicAVTransformerBlock.get_ada_values": av.BasicAVTransformerBlock.get_ada_values,
            "comfy LTX BasicAVTransformerBlock._apply_text_cross_attention":
                av.BasicAVTransformerBlock._apply_text_cross_attention,
            "comfy LTX CompressedTimestep.expand_for_computation": av.CompressedTimestep.expand_for_computation,
            "comfy LTXAVModel._process_transformer_blocks": av.LTXAVModel._process_transformer_blocks,
        })
    return functions


# function -> {fingerprint: the host the exactness tests (tests/test_ltxv.py) passed on}. Apart from
# host/fingerprints.py RECORDED, which lists functions both supported hosts share: ComfyUI 0.3.64's LTX block is
# another one (no fused comfy-kitchen ops, no guide mask, no LTX-2), which the pack leaves to ComfyUI
# (host_reason).
LTX_RECORDED: dict[str, dict[str, str]] = {name: {fingerprint: host_fingerprints.HOST_0_33_0} for name, fingerprint in (
    ("comfy LTX BasicTransformerBlock.forward", "b2ebb5dae88875dd"),
    ("comfy LTX CrossAttention.forward", "066ccef94288a666"),
    ("comfy LTX apply_rotary_emb", "58e409820c02d0da"),
    ("comfy LTXVModel._process_transformer_blocks", "fac7d81b6f1173fb"),
    ("comfy LTX apply_cross_attention_adaln", "5b0243fc324e01d0"),
    ("comfy LTX _attention_with_guide_mask", "a6bfd5a9de678cff"),
    ("comfy LTX BasicAVTransformerBlock.forward", "8f83e2523852ccf8"),
    ("comfy LTX BasicAVTransformerBlock.get_ada_values", "e5b873a7e3503d85"),
    ("comfy LTX BasicAVTransformerBlock._apply_text_cross_attention", "5d760d61145646af"),
    ("comfy LTX CompressedTimestep.expand_for_computation", "3188d00e13fa7a39"),
    ("comfy LTXAVModel._process_transformer_blocks", "dd71c05545350b93"),
)}


def host_reason() -> str | None:
    """Why this host's LTX blocks are not the ones the pack slices (None: they are)."""
    import inspect

    try:
        import comfy.quant_ops as quant_ops
    except ImportError:  # ComfyUI 0.3.64
        quant_ops = None
    parameters = inspect.signature(ltx_model.BasicTransformerBlock.forward).parameters
    if "self_attention_mask" not in parameters or not hasattr(quant_ops, "ck"):
        return ("this host's LTX block is an older one (before LTX-2: no fused comfy-kitchen ops, no guide mask) "
                "that the pack does not mirror")
    return None


def plain_block_kind(block: nn.Module) -> str | None:
    """"av" / "video" for a block that runs the host's own forward (subclasses that override it are not sliced)."""
    av = av_module()
    if av is not None and type(block).forward is av.BasicAVTransformerBlock.forward:
        return "av"
    if type(block).forward is ltx_model.BasicTransformerBlock.forward:
        return "video"
    return None


def is_ltx(diffusion_model: nn.Module) -> bool:
    return isinstance(diffusion_model, ltx_model.LTXVModel)


def unsupported_ltxv_reason(diffusion_model: nn.Module) -> str | None:
    """Why the pack leaves this diffusion model to ComfyUI (None: it slices it)."""
    name = type(diffusion_model).__name__
    if not is_ltx(diffusion_model):
        return f"{name} is not an LTX model"
    if host_reason() is not None:
        return host_reason()
    av = av_module()
    known = {ltx_model.LTXVModel} | ({av.LTXAVModel} if av is not None else set())
    if type(diffusion_model) not in known:
        return f"{name} is a subclass of LTXVModel the pack has not checked"
    if not any(plain_block_kind(block) for block in diffusion_model.transformer_blocks):
        kinds = sorted({type(block).__name__ for block in diffusion_model.transformer_blocks})
        return f"{name} has no block of the host's own forward ({', '.join(kinds)})"
    return None


# conds LTXBaseModel._forward / LTXAVModel read before the blocks (the blocks see only their hook's arguments)
KNOWN_CONDS = frozenset({"denoise_mask", "audio_denoise_mask", "keyframe_idxs", "guide_attention_entries",
                         "generated_keyframes", "ref_audio", "a_timestep", "control", "audio_length"})


@dataclass(frozen=True)
class LtxCall:
    """What one diffusion-model call tells the block replacements."""

    blocks: nn.ModuleList
    tokens_per_frame: int  # video tokens of one latent frame (patch size 1)
    unknown_conds: tuple[str, ...] = ()


def video_latent(x) -> Tensor:
    """The video latent of a call's x (LTX-2: [video, audio])."""
    return x[0] if isinstance(x, (list, tuple)) else x


def add_call_info(executor, x, timestep, context, attention_mask, frame_rate=25, transformer_options=None,
                  keyframe_idxs=None, **kwargs):
    """DIFFUSION_MODEL wrapper: a per-call copy of transformer_options with the LtxCall; the rest unchanged."""
    model = executor.class_obj
    video = video_latent(x)
    unknown = tuple(sorted(k for k, v in kwargs.items() if v is not None and k not in KNOWN_CONDS))
    call = LtxCall(model.transformer_blocks, video.shape[-2] * video.shape[-1], unknown)
    transformer_options = {**(transformer_options or {}), CALL_KEY: call}
    return executor(x, timestep, context, attention_mask, frame_rate, transformer_options, keyframe_idxs, **kwargs)


# LTX's blocks call no patches (ComfyUI's LTX forward reads none): any patch set runs ComfyUI's own block, as a
# patch the pack has not checked (dit/block_hook.py common_unsliced_reason)
KNOWN_PATCHES = frozenset()


@dataclass
class SlicedLtxBlock(SlicedBlockHook):
    """The ("double_block", index) replacement: block `index` sliced over video tokens when it can be."""

    family = "LTX"

    def verdict(self) -> "host_fingerprints.Verdict":
        return ltxv_verdict()

    def __call__(self, args: dict, extra: dict) -> dict:
        rehash = args["transformer_options"].get(REHASH_KEY)  # Step Rehash's LtxRehashCall (rehash.py), if any
        if rehash is None:
            return {"img": self.forward(args, extra)}
        return {"img": rehash.run(self.index, args["img"], lambda x: self.forward({**args, "img": x}, extra))}

    def forward(self, args: dict, extra: dict):
        """Block `index` on args["img"] (x, or LTX-2's (vx, ax)): sliced when it can be, else ComfyUI's."""
        to = args["transformer_options"]
        av = isinstance(args["img"], (tuple, list))
        video = args["img"][0] if av else args["img"]
        call: LtxCall | None = to.get(CALL_KEY)
        chunk = self.slice_size(to, video, call, self.unsliced_reason(call, to, args, video, av))
        if chunk is None:
            return extra["original_block"](args)["img"]
        block = call.blocks[self.index]
        if av:
            return sliced_av_block(block, args["img"][0], args["img"][1], args, to, chunk)
        return sliced_ltxv_block(block, video, args["txt"], args["attention_mask"], args["vec"], args["pe"], to,
                                 args.get("self_attention_mask"), args.get("prompt_timestep"), chunk)

    def unsliced_reason(self, call: LtxCall | None, to: dict, args: dict, video: Tensor, av: bool) -> str | None:
        if call is not None and plain_block_kind(call.blocks[self.index]) != ("av" if av else "video"):
            return f"{type(call.blocks[self.index]).__name__} does not run the host's own block forward"
        reason = common_unsliced_reason(call, to, video, KNOWN_PATCHES, "the diffusion-model wrapper did not run "
                                        "(no blocks)")
        if reason is None and comfy.model_management.in_training:
            reason = "ComfyUI runs in training mode (its blocks' unfused paths)"
        return reason or self.mask_reason(args, video, av)

    @staticmethod
    def mask_reason(args: dict, video: Tensor, av: bool) -> str | None:
        tokens = video.shape[1]
        mask = args.get("self_attention_mask")
        if isinstance(mask, Tensor) and mask.shape[-2] not in (1, tokens):
            return f"its self-attention mask has {mask.shape[-2]} query rows for {tokens} tokens"
        if mask is not None and not isinstance(mask, Tensor) and not hasattr(mask, "tracked_mask"):
            return f"its self-attention mask is a {type(mask).__name__} the pack does not know"
        text_mask = args.get("attention_mask")
        if isinstance(text_mask, Tensor) and text_mask.shape[-2] not in (1, tokens):
            return f"its text attention mask has {text_mask.shape[-2]} query rows for {tokens} tokens"
        timesteps = [args["v_timestep"], args["v_cross_scale_shift_timestep"], args["v_cross_gate_timestep"]] if av \
            else [args["vec"]]
        if any(t is not None and timestep_rows(t) not in (1, tokens) and not _divides(t, tokens) for t in timesteps):
            return "its timestep rows do not cover the video tokens"
        return None


def _divides(timestep, tokens: int) -> bool:
    data = getattr(timestep, "data", timestep)
    return data.shape[1] * getattr(timestep, "patches_per_frame", 1) == tokens


# -- host verdict --------------------------------------------------------------------------------------------

def ltxv_self_check() -> float:
    """The pack's sliced blocks against ComfyUI's on tiny float32 LTX models (LTXV, and LTX-2 where the host
    has it), whole forwards through the block hook, slices that do not divide the tokens. The largest relative
    difference."""
    from ...host import tiny_models

    worst = 0.0
    for audio in ((False, True) if av_module() is not None else (False,)):
        model = tiny_models.ltxv(audio=audio)
        inputs = tiny_models.ltxv_inputs(model, audio=audio)

        def run(sliced: bool) -> Tensor:
            to = {}
            if sliced:
                to["patches_replace"] = {"dit": {key: SlicedLtxBlock(key[1], lambda *_: 5)
                                                 for key in block_keys(len(model.transformer_blocks))}}
                to["wrappers"] = {"diffusion_model": {WRAPPER_KEY: [add_call_info]}}
            with torch.no_grad():
                out = model(*inputs["args"], transformer_options=to, **inputs["kwargs"])
            return torch.cat([o.flatten() for o in out]) if isinstance(out, (list, tuple)) else out

        worst = max(worst, host_fingerprints.relative_difference(run(True), run(False)))
    return worst


def ltxv_verdict() -> "host_fingerprints.Verdict":
    """The host verdict on ComfyUI's LTX functions the sliced blocks mirror (float32: the exactness tests' bound)."""
    return host_fingerprints.verdict("LTX", ltxv_functions(), ltxv_self_check, recorded=LTX_RECORDED,
                                     tolerance=1e-5)


# -- install ------------------------------------------------------------------------------------------------

def install_ltxv_slicing(model: ModelPatcher, token_chunk_for: TokenChunkFor = token_chunk_from_state) -> list[int]:
    """Add the block replacements and the call wrapper to `model` (a clone the caller owns) for every block of its
    LTX diffusion model. Blocks another pack already replaces keep that replacement (logged once). Returns the
    indices of the blocks patched."""
    diffusion_model, log = model.model.diffusion_model, LogOnce()
    patched = install_sliced_blocks(model, "LTX", unsupported_ltxv_reason(diffusion_model),
                                    block_keys(len(diffusion_model.transformer_blocks)),
                                    lambda key: SlicedLtxBlock(key[1], token_chunk_for, log), SlicedLtxBlock,
                                    WRAPPER_KEY, add_call_info)
    return [i for _, i in patched]


def remove_ltxv_slicing(model: ModelPatcher) -> None:
    """Undo install_ltxv_slicing on `model` (a clone the caller owns)."""
    remove_block_hooks(model, SlicedLtxBlock, WRAPPER_KEY)
