"""Attach the sliced Wan block (block.py) to a MODEL clone through ComfyUI's own hooks; no monkeypatching.

Two pieces, both on the clone's model_options:
- a DIFFUSION_MODEL wrapper (key WRAPPER_KEY) that sees the diffusion model's call. WanModel.forward_orig
  hands a block replacement {"img", "txt", "vec", "pe", "transformer_options"}, but not context_img_len
  (the number of CLIP-image tokens at the front of the context, clip_fea.shape[-2]) nor the block itself.
  The wrapper puts both, with the latent's tokens per frame, into a per-call copy of transformer_options
  under CALL_KEY and hands every argument on unchanged;
- a "dit" / ("double_block", i) replacement for each block (model.set_model_patch_replace), which runs
  block i sliced when its class forward is exactly WanAttentionBlock.forward and the run asks for
  slices, else calls the host's own block (`original_block`), saying why once per run. With Step Rehash
  on the call (a DeepSpanCall, families/dit/rehash.py), the same replacement runs, skips or stores the deep blocks.

WanModel's subclasses with their own forward_orig (VACE, Camera, S2V, HuMo, Animate) are handled as
WAN_SUBCLASSES records what their forward_orig does around the blocks; an unknown one is left to ComfyUI.

A replacement another pack set for a block first is kept (one log line at install); one set later
replaces this pack's (ComfyUI keeps one replacement per block).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from comfy.ldm.wan import model as wan_model
from comfy.ldm.wan.model import WanAttentionBlock, WanModel
from comfy.model_patcher import ModelPatcher
from torch import Tensor

from ...host import fingerprints as host_fingerprints
from ...host.log import LogOnce
from ...host.options import DIT_CALL_KEY as CALL_KEY, DIT_REHASH_CALL_KEY as WAN_REHASH_KEY
from ...host.options import DIT_WRAPPER_KEY as WRAPPER_KEY
from ..dit.block_hook import SlicedBlockHook, TokenChunkFor, common_unsliced_reason, token_chunk_from_state
from ..dit.hooks import block_keys, remove_block_hooks, install_sliced_blocks
from .block import sliced_block_forward


def wan_functions() -> dict[str, Callable]:
    return {
        "comfy WanAttentionBlock.forward": wan_model.WanAttentionBlock.forward,
        "comfy WanSelfAttention.forward": wan_model.WanSelfAttention.forward,
        "comfy WanT2VCrossAttention.forward": wan_model.WanT2VCrossAttention.forward,
        "comfy WanI2VCrossAttention.forward": wan_model.WanI2VCrossAttention.forward,
        "comfy repeat_e": wan_model.repeat_e,
        "comfy WanModel.forward_orig": wan_model.WanModel.forward_orig,
    }


def is_plain_wan_block(block: nn.Module) -> bool:
    """The block runs WanAttentionBlock.forward itself (subclasses that override it are not sliced)."""
    return isinstance(block, WanAttentionBlock) and type(block).forward is WanAttentionBlock.forward


@dataclass(frozen=True)
class WanSubclass:
    """A WanModel subclass with its own forward_orig, as the pack checked it (ComfyUI 0.3.64)."""

    fingerprints: frozenset[str]  # host_fingerprints.fingerprint of its forward_orig on the hosts checked
    hook_args: bool  # its block hook hands replacements {"img", "txt", "vec", "pe", "transformer_options"}
    between_blocks: str | None = None  # what forward_orig adds to x after some blocks, outside them
    keeps_first_input: bool = False  # forward_orig reads block 0's input after block 0 ran (VACE's x_orig)


# What each subclass's forward_orig does around the blocks decides what the pack may do with it:
# - slicing needs the hook's arguments (WanModel_S2V passes no transformer_options) and plain blocks
#   (HumoWanModel's are WanAttentionBlockAudio: left to ComfyUI by is_plain_wan_block);
# - Step Rehash reuses the residual of the deep blocks, so nothing may be added to x between them outside
#   the blocks: VACE's hints, S2V's audio and Animate's face adapter are (after block 0, and every few
#   blocks after it, whatever cache_block is), so Step Rehash runs those models in full.
# A subclass not listed here, or whose forward_orig differs from the one checked, is left to ComfyUI.
# Fingerprints: ComfyUI 0.3.64's, then 0.33.0's (which adds the double_block patches after each block and the
# block_index / total_blocks / grid_sizes bookkeeping; both outside the blocks). S2V and HuMo are recorded
# for 0.3.64 only: they run unchanged either way.
WAN_SUBCLASSES = {
    "VaceWanModel": WanSubclass(frozenset({"408db2421efda0e1", "8c10d6751cf3c4cf"}), True, "its VACE hints",
                                keeps_first_input=True),
    # camera adapter: on the patch embedding only
    "CameraWanModel": WanSubclass(frozenset({"e33720dd3ebd16be", "7f8bcdf583d751a0"}), True),
    "WanModel_S2V": WanSubclass(frozenset({"9bbd910877338989"}), False, "its audio injection"),
    "HumoWanModel": WanSubclass(frozenset({"5964154364782f39"}), True),  # audio inside its (non-plain) blocks
    "AnimateWanModel": WanSubclass(frozenset({"be081796c4d77dae", "41f7750279225f3b"}), True,
                                   "its face adapter's output"),
}


@functools.lru_cache(maxsize=None)
def _checked_forward_orig(cls: type) -> bool:
    known = WAN_SUBCLASSES.get(cls.__name__)
    if known is None or not cls.__module__.startswith("comfy.ldm.wan."):
        return False
    return host_fingerprints.fingerprint(cls.forward_orig) in known.fingerprints


def wan_subclass(diffusion_model: nn.Module) -> WanSubclass | None:
    """The checked subclass entry of a WanModel with its own forward_orig (None: WanModel's own, or unknown)."""
    cls = type(diffusion_model)
    if cls.forward_orig is WanModel.forward_orig or not _checked_forward_orig(cls):
        return None
    return WAN_SUBCLASSES[cls.__name__]


def blocks_followed_by_additions(diffusion_model: nn.Module) -> list[int]:
    """The blocks after which a subclass's forward_orig adds to x (VACE hints, S2V audio, Animate's face)."""
    blocks = len(diffusion_model.blocks)
    if hasattr(diffusion_model, "vace_layers_mapping"):
        return sorted(i for i in diffusion_model.vace_layers_mapping if i < blocks)
    injector = getattr(diffusion_model, "audio_injector", None)
    if injector is not None:
        return sorted(i for i in injector.injected_block_id if i < blocks)
    adapter = getattr(diffusion_model, "face_adapter", None)
    if adapter is not None:
        return [i for i in range(blocks) if i % 5 == 0 and i // 5 < len(adapter.fuser_blocks)]
    return []


def unsupported_wan_reason(diffusion_model: nn.Module, purpose: str = "slice") -> str | None:
    """Why the pack leaves this diffusion model to ComfyUI for `purpose` (None: it handles it).
    purpose: "slice" / "plan" (its blocks sliced, the memory estimate) or "rehash" (Step Rehash's split)."""
    if not isinstance(diffusion_model, WanModel):
        return f"{type(diffusion_model).__name__} is not a Wan model"
    name = type(diffusion_model).__name__
    own_forward = type(diffusion_model).forward_orig is not WanModel.forward_orig
    variant = wan_subclass(diffusion_model)
    if own_forward and variant is None:
        changed = " (not one the pack checked)" if name in WAN_SUBCLASSES else ""
        return f"{name} runs its own forward_orig{changed}, which the pack has not checked"
    rehash_reason = None
    if variant is not None and variant.between_blocks:
        after = blocks_followed_by_additions(diffusion_model)
        where = f" (after blocks {after})" if after else ""
        rehash_reason = (f"{name} adds {variant.between_blocks} to x between its blocks{where}, outside the blocks "
                         "Step Rehash skips, so a reused deep residual would count it twice")
    if variant is not None and not variant.hook_args:
        slice_reason = f"{name} calls block replacements without transformer_options"
    elif not any(is_plain_wan_block(block) for block in diffusion_model.blocks):
        kinds = sorted({type(block).__name__ for block in diffusion_model.blocks})
        slice_reason = f"{name} has no plain WanAttentionBlock ({', '.join(kinds)})"
    else:
        slice_reason = None
    if purpose == "rehash":
        return rehash_reason or slice_reason
    return slice_reason


@dataclass(frozen=True)
class WanCall:
    """What one diffusion-model call tells the block replacements."""

    blocks: nn.ModuleList
    context_img_len: int | None  # as forward_orig derives it: clip_fea.shape[-2], None without clip_fea
    tokens_per_frame: int  # patch tokens of one latent frame
    copy_first_input: bool = False  # forward_orig reads block 0's input later (VACE): block 0 slices a copy
    unknown_conds: tuple[str, ...] = ()  # conds the call hands the model that the pack does not know


# What the sliced blocks know of a call. Patch keys: attn2_patch (run on the whole x between the attention and
# the feed-forward, block.py) and double_block (forward_orig calls those after each block, outside it); an
# attn1_patch needs the whole self-attention output: that block runs unsliced. patches_replace: "dit" (the
# block replacements). Conds: those WanModel's _forward / forward_orig read (context_latents: Bernini's
# in-context reference tokens, appended to x and RoPE'd by the host; reference_latent), and those a checked
# subclass's forward_orig names. Anything else: ComfyUI's own blocks for that call, with one log line.
KNOWN_PATCHES = frozenset({"attn2_patch", "double_block"})
_WAN_CONDS = frozenset({"context_latents", "reference_latent"})


@functools.lru_cache(maxsize=None)
def known_conds(cls: type) -> frozenset[str]:
    import inspect

    names = set(_WAN_CONDS)
    if cls.forward_orig is not WanModel.forward_orig:
        names |= set(inspect.signature(cls.forward_orig).parameters) - {"self", "kwargs"}
        names |= set(inspect.signature(cls._forward).parameters) - {"self", "kwargs"}
    return frozenset(names)


def add_call_info(executor, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options=None,
                  **kwargs):
    """DIFFUSION_MODEL wrapper: a per-call copy of transformer_options with the WanCall; the rest unchanged."""
    model = executor.class_obj
    patch = getattr(model, "patch_size", (1, 2, 2))
    tokens_per_frame = -(-x.shape[-2] // patch[1]) * -(-x.shape[-1] // patch[2])
    variant = wan_subclass(model)
    unknown = tuple(sorted(k for k, v in kwargs.items() if v is not None and k not in known_conds(type(model))))
    call = WanCall(model.blocks, clip_fea.shape[-2] if clip_fea is not None else None, tokens_per_frame,
                   copy_first_input=variant is not None and variant.keeps_first_input, unknown_conds=unknown)
    transformer_options = {**(transformer_options or {}), CALL_KEY: call}
    return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)


@dataclass
class SlicedWanBlock(SlicedBlockHook):
    """The ("double_block", index) replacement: block `index` sliced over tokens when it can be."""

    family = "Wan"

    def verdict(self) -> "host_fingerprints.Verdict":
        return wan_verdict()

    def __call__(self, args: dict, extra: dict) -> dict:
        if "transformer_options" not in args:  # a hook that passes none (WanModel_S2V): the host's own block
            return extra["original_block"](args)
        rehash = args["transformer_options"].get(WAN_REHASH_KEY)  # Step Rehash's DeepSpanCall (dit/rehash.py)
        if rehash is None:
            return {"img": self.forward(args, extra)}
        return {"img": rehash.run(self.index, args["img"], lambda x: self.forward({**args, "img": x}, extra))}

    def forward(self, args: dict, extra: dict) -> Tensor:
        """Block `index` on args["img"]: sliced when the run asks for slices and it can be, else ComfyUI's."""
        to = args["transformer_options"]
        x, e, freqs = args["img"], args["vec"], args["pe"]
        call: WanCall | None = to.get(CALL_KEY)
        chunk = self.slice_size(to, x, call, self.unsliced_reason(call, to, x, freqs))
        if chunk is None:
            return extra["original_block"](args)["img"]
        block = call.blocks[self.index]
        if self.index == 0 and call.copy_first_input:  # the sliced block writes x in place
            x = x.clone()
        return sliced_block_forward(block, x, e, freqs, args["txt"], call.context_img_len, to, chunk)

    def unsliced_reason(self, call: WanCall | None, to: dict, x: Tensor, freqs: Tensor) -> str | None:
        if call is not None and not is_plain_wan_block(call.blocks[self.index]):
            return f"{type(call.blocks[self.index]).__name__} is not a plain WanAttentionBlock"
        reason = common_unsliced_reason(call, to, x, KNOWN_PATCHES,
                                        no_call="the diffusion-model wrapper did not run (no context_img_len)")
        if reason is None and (freqs is None or freqs.shape[1] not in (1, x.shape[1])):
            return "its RoPE frequencies do not match the tokens"
        return reason


def wan_self_check() -> float:
    """The pack's sliced blocks against ComfyUI's on tiny float32 WanModels (t2v, and i2v with CLIP-image
    tokens), whole forwards through forward_orig's block hook, slices that do not divide the tokens; with an
    attn2_patch and a double_block patch set. The largest relative difference."""
    from ...host import tiny_models

    patches = {"attn2_patch": [lambda a: a["x"] * 1.05],
               "double_block": [lambda a: {"img": a["img"] * 0.98}]}
    worst = 0.0
    for i2v in (False, True):
        model = tiny_models.wan(i2v=i2v)
        x = tiny_models.inputs((2, 4, 3, 6, 6), 1, torch.float32)
        t = torch.tensor([300.0, 700.0])
        context = tiny_models.inputs((2, 8, 8), 2, torch.float32)
        clip = tiny_models.inputs((2, 5, 1280), 3, torch.float32) if i2v else None

        def run(sliced: bool) -> Tensor:
            to = {"patches": {k: list(v) for k, v in patches.items()}}
            if sliced:
                tokens_per_frame = 9
                to[CALL_KEY] = WanCall(model.blocks, None if clip is None else clip.shape[-2], tokens_per_frame)
                to["patches_replace"] = {"dit": {("double_block", i): SlicedWanBlock(i, lambda *_: 5)
                                                 for i in range(len(model.blocks))}}
            with torch.no_grad():
                return model(x, t, context, clip_fea=clip, transformer_options=to)

        worst = max(worst, host_fingerprints.relative_difference(run(True), run(False)))
    return worst


def wan_verdict() -> "host_fingerprints.Verdict":
    """The host verdict on ComfyUI's Wan functions the sliced block mirrors."""
    # float32 (the host's RoPE kernel takes no float64): the exactness tests' bound
    return host_fingerprints.verdict("Wan", wan_functions(), wan_self_check, tolerance=1e-5)


def install_wan_slicing(model: ModelPatcher, token_chunk_for: TokenChunkFor = token_chunk_from_state) -> list[int]:
    """Add the block replacements and the call wrapper to `model` (a clone the caller owns) for every block
    of its Wan diffusion model. Blocks another pack already replaces keep that replacement (logged once).
    Returns the indices of the blocks patched."""
    diffusion_model, log = model.model.diffusion_model, LogOnce()
    patched = install_sliced_blocks(model, "Wan", unsupported_wan_reason(diffusion_model),
                                    block_keys(len(diffusion_model.blocks)),
                                    lambda key: SlicedWanBlock(key[1], token_chunk_for, log), SlicedWanBlock,
                                    WRAPPER_KEY, add_call_info)
    return [i for _, i in patched]


def remove_wan_slicing(model: ModelPatcher) -> None:
    """Undo install_wan_slicing on `model` (a clone the caller owns)."""
    remove_block_hooks(model, SlicedWanBlock, WRAPPER_KEY)
