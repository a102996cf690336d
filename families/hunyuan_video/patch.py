"""Attach the sliced HunyuanVideo blocks (block.py) to a MODEL clone through ComfyUI's own hooks; no monkeypatching.

HunyuanVideo.forward_orig (comfy/ldm/hunyuan_video/model.py; HunyuanVideo 1.0, its I2V and SkyReels variants and
1.5 share it) calls patches_replace["dit"][("double_block", i)] with {"img", "txt", "vec", "pe", "attention_mask",
"modulation_dims_img", "modulation_dims_txt", "transformer_options"} and [("single_block", i)] with {"img" (text
and image tokens joined), "vec", "pe", "attention_mask", "modulation_dims", "transformer_options"}; neither hands
the block itself. So, as for Wan (families/wan/patch.py):
- a DIFFUSION_MODEL wrapper (key WRAPPER_KEY) puts a HunyuanCall (the block lists, the latent's tokens per frame,
  the conds the pack does not know, whether a ControlNet adds to the streams) into a per-call copy of
  transformer_options under CALL_KEY and hands every argument on unchanged;
- a replacement per double and single block runs it sliced when the run asks for slices and it can be, else the
  host's own block (`original_block`), saying why once per run. With Step Rehash on the call (rehash.py's
  HunyuanRehashCall), the same replacement runs, skips or stores the deep blocks.

A replacement another pack set for a block first is kept (one log line at install).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from comfy.ldm.flux import layers as flux_layers
from comfy.ldm.flux import math as flux_math
from comfy.ldm.hunyuan_video import model as hunyuan_model
from comfy.ldm.hunyuan_video.model import HunyuanVideo
from comfy.model_patcher import ModelPatcher
from torch import Tensor

from ...host import fingerprints as host_fingerprints
from ...host.fingerprints import HOST_0_3_64, HOST_0_33_0
from ...host.log import LogOnce
from ...host.options import DIT_CALL_KEY as CALL_KEY, DIT_REHASH_CALL_KEY as REHASH_KEY
from ...host.options import DIT_WRAPPER_KEY as WRAPPER_KEY
from ..dit.block_hook import SlicedBlockHook, TokenChunkFor, common_unsliced_reason, token_chunk_from_state
from ..dit.hooks import DOUBLE, SINGLE, block_keys, remove_block_hooks, install_sliced_blocks
from .block import sliced_double_block, sliced_single_block


def hunyuan_functions() -> dict[str, Callable]:
    """The host functions the sliced blocks mirror or depend on."""
    return {
        "comfy DoubleStreamBlock.forward": flux_layers.DoubleStreamBlock.forward,
        "comfy SingleStreamBlock.forward": flux_layers.SingleStreamBlock.forward,
        "comfy QKNorm.forward": flux_layers.QKNorm.forward,
        "comfy flux attention": flux_math.attention,
        "comfy HunyuanVideo.forward_orig": hunyuan_model.HunyuanVideo.forward_orig,
    }


# function -> {fingerprint of its source: the hosts tests/test_hunyuan_video.py passed on}
RECORDED: dict[str, dict[str, str]] = {
    "comfy DoubleStreamBlock.forward": {"3056fe2a6cb006fc": HOST_0_33_0, "2384f9feaeeeeb35": HOST_0_3_64},
    "comfy SingleStreamBlock.forward": {"ed9f3800d1ceceee": HOST_0_33_0, "95f36c3bc15b688d": HOST_0_3_64},
    "comfy QKNorm.forward": {"38fcb44f56392800": f"{HOST_0_33_0}, {HOST_0_3_64}"},
    "comfy flux attention": {"5273e029c1ea06b0": HOST_0_33_0, "495c7a495139d231": HOST_0_3_64},
    "comfy HunyuanVideo.forward_orig": {"a6161e17dc2109fd": HOST_0_33_0, "7a135d1d5d86a6ff": HOST_0_3_64},
}


def is_plain_block(block: nn.Module, single: bool) -> bool:
    """The block runs the host's DoubleStreamBlock / SingleStreamBlock forward itself."""
    cls = flux_layers.SingleStreamBlock if single else flux_layers.DoubleStreamBlock
    return isinstance(block, cls) and type(block).forward is cls.forward


def unsupported_hunyuan_reason(diffusion_model: nn.Module) -> str | None:
    """Why the pack leaves this diffusion model to ComfyUI (None: a HunyuanVideo it slices)."""
    if not isinstance(diffusion_model, HunyuanVideo):
        return f"{type(diffusion_model).__name__} is not a HunyuanVideo model"
    if type(diffusion_model).forward_orig is not HunyuanVideo.forward_orig:
        return f"{type(diffusion_model).__name__} runs its own forward_orig, which the pack has not checked"
    if not any(is_plain_block(b, False) for b in diffusion_model.double_blocks) and \
            not any(is_plain_block(b, True) for b in diffusion_model.single_blocks):
        return f"{type(diffusion_model).__name__} has no plain DoubleStreamBlock or SingleStreamBlock"
    return None


@dataclass(frozen=True)
class HunyuanCall:
    """What one diffusion-model call tells the block replacements."""

    double_blocks: nn.ModuleList
    single_blocks: nn.ModuleList
    tokens_per_frame: int  # patch tokens of one latent frame
    unknown_conds: tuple[str, ...] = ()  # conds the call hands the model that the pack does not know
    control: bool = False  # a ControlNet adds to the streams after blocks (outside them)


# Patch keys: forward_orig reads none; attn1_patch / attn1_output_patch (read by the blocks) need whole sequences.
KNOWN_PATCHES: frozenset[str] = frozenset()


@functools.lru_cache(maxsize=None)
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls._forward)


def add_call_info(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: a per-call copy of transformer_options with the HunyuanCall; the rest unchanged.
    HunyuanVideo._forward's parameters differ by host (0.33 adds clip_fea): they are bound by name."""
    model = executor.class_obj
    bound = _forward_signature(type(model)).bind(model, *args, **kwargs)
    named = bound.arguments
    x = named["x"]
    patch = model.patch_size
    tokens_per_frame = -(-x.shape[-2] // patch[-2]) * -(-x.shape[-1] // patch[-1])
    extra = named.get("kwargs", {})
    unknown = tuple(sorted(k for k, v in extra.items() if v is not None))
    call = HunyuanCall(model.double_blocks, model.single_blocks, tokens_per_frame, unknown,
                       named.get("control") is not None)
    named["transformer_options"] = {**(named.get("transformer_options") or {}), CALL_KEY: call}
    return executor(*bound.args[1:], **bound.kwargs)


@dataclass
class SlicedHunyuanBlock(SlicedBlockHook):
    """The base of the ("double_block", i) and ("single_block", i) replacements."""

    family = "HunyuanVideo"
    single = False

    def verdict(self) -> "host_fingerprints.Verdict":
        return hunyuan_verdict()

    def block_of(self, call: HunyuanCall) -> nn.Module:
        return (call.single_blocks if self.single else call.double_blocks)[self.index]

    def unsliced_reason(self, call: HunyuanCall | None, to: dict, x: Tensor, tokens: int, pe, mask) -> str | None:
        if call is not None:
            block = self.block_of(call)
            if not is_plain_block(block, self.single):
                return f"{type(block).__name__} is not a plain {'Single' if self.single else 'Double'}StreamBlock"
            if getattr(block, "modulation", True) in (None, False):  # 0.33's modulation=False: mod from vec
                return "the block takes its modulation from vec"
        reason = common_unsliced_reason(call, to, x, KNOWN_PATCHES)
        if reason is None and pe is not None and pe.shape[2] != tokens:
            return "its RoPE frequencies do not match the tokens"
        if reason is None and mask is not None and mask.ndim >= 2 and mask.shape[-2] != 1:
            return "its attention mask has a row per query"
        return reason


@dataclass
class SlicedDoubleBlock(SlicedHunyuanBlock):
    kind = "double block"

    def __call__(self, args: dict, extra: dict) -> dict:
        rehash = args["transformer_options"].get(REHASH_KEY)
        if rehash is None:
            img, txt = self.forward(args, extra)
        else:
            img, txt = rehash.double(self.index, args["img"], args["txt"], args["transformer_options"],
                                     lambda i, t: self.forward({**args, "img": i, "txt": t}, extra))
        return {"img": img, "txt": txt}

    def forward(self, args: dict, extra: dict) -> tuple[Tensor, Tensor]:
        to, img, txt = args["transformer_options"], args["img"], args["txt"]
        call: HunyuanCall | None = to.get(CALL_KEY)
        reason = self.unsliced_reason(call, to, img, img.shape[1] + txt.shape[1], args["pe"], args["attention_mask"])
        chunk = self.slice_size(to, img, call, reason)
        if chunk is None:
            out = extra["original_block"](args)
            return out["img"], out["txt"]
        return sliced_double_block(self.block_of(call), img, txt, args["vec"], args["pe"], args["attention_mask"],
                                   args["modulation_dims_img"], args["modulation_dims_txt"], to, chunk)


@dataclass
class SlicedSingleBlock(SlicedHunyuanBlock):
    kind = "single block"
    single = True

    def __call__(self, args: dict, extra: dict) -> dict:
        rehash = args["transformer_options"].get(REHASH_KEY)
        if rehash is None:
            return {"img": self.forward(args, extra)}
        return {"img": rehash.single(self.index, args["img"], args["transformer_options"],
                                     lambda x: self.forward({**args, "img": x}, extra))}

    def forward(self, args: dict, extra: dict) -> Tensor:
        to, x = args["transformer_options"], args["img"]
        call: HunyuanCall | None = to.get(CALL_KEY)
        chunk = self.slice_size(to, x, call, self.unsliced_reason(call, to, x, x.shape[1], args["pe"],
                                                                  args["attention_mask"]))
        if chunk is None:
            return extra["original_block"](args)["img"]
        return sliced_single_block(self.block_of(call), x, args["vec"], args["pe"], args["attention_mask"],
                                   args["modulation_dims"], to, chunk)


def tiny_hunyuan(seed: int = 0, token_replace: bool = False) -> nn.Module:
    """A HunyuanVideo of two double and two single blocks, 2 heads of 16 channels, float32 (the self-check's)."""
    import comfy.ops

    from ...host.tiny_models import randomize

    fields = {f.name for f in dataclasses.fields(hunyuan_model.HunyuanVideoParams)}
    params = dict(in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=8, hidden_size=32, mlp_ratio=2.0,
                  num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=256, patch_size=[1, 2, 2],
                  qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False, use_cond_type_embedding=False,
                  vision_in_dim=None, meanflow_sum=False)
    model = HunyuanVideo(dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init,
                         **{k: v for k, v in params.items() if k in fields})
    return randomize(model, seed)


def hunyuan_self_check() -> float:
    """The pack's sliced blocks against ComfyUI's on a tiny float32 HunyuanVideo: whole forwards through
    forward_orig's block hooks, slices that do not divide the tokens, a text mask, and the I2V token replace
    (per-token modulation). The largest relative difference."""
    from ...host import tiny_models

    model = tiny_hunyuan()
    x = tiny_models.inputs((2, 4, 3, 6, 6), 1, torch.float32)
    t = torch.tensor([0.3, 0.7])
    context = tiny_models.inputs((2, 5, 8), 2, torch.float32)
    y = tiny_models.inputs((2, 8), 3, torch.float32)
    mask = torch.tensor([[1, 1, 1, 0, 0]])  # forward_orig builds a (1, 1, L) mask: one row for the batch
    worst = 0.0
    # the token replace at batch 1: ComfyUI 0.3.64's apply_mod broadcasts its rows over the batch
    for batch, guiding in ((2, None), (1, torch.tensor([0.0]))):
        def run(sliced: bool) -> Tensor:
            to = {}
            if sliced:
                to[CALL_KEY] = HunyuanCall(model.double_blocks, model.single_blocks, 9)
                hooks = {(DOUBLE, i): SlicedDoubleBlock(i, lambda *_: 5) for i in range(len(model.double_blocks))}
                hooks |= {(SINGLE, i): SlicedSingleBlock(i, lambda *_: 7) for i in range(len(model.single_blocks))}
                to["patches_replace"] = {"dit": hooks}
            with torch.no_grad():
                return model(x[:batch], t[:batch], context[:batch], y[:batch], guidance=torch.full((batch,), 3.5),
                             attention_mask=mask, guiding_frame_index=guiding, transformer_options=to)

        worst = max(worst, host_fingerprints.relative_difference(run(True), run(False)))
    return worst


def hunyuan_verdict() -> "host_fingerprints.Verdict":
    """The host verdict on ComfyUI's functions the sliced HunyuanVideo blocks mirror."""
    return host_fingerprints.verdict("HunyuanVideo", hunyuan_functions(), hunyuan_self_check, recorded=RECORDED,
                                     tolerance=1e-5)


def install_hunyuan_slicing(model: ModelPatcher, token_chunk_for: TokenChunkFor = token_chunk_from_state) -> int:
    """Add the block replacements and the call wrapper to `model` (a clone the caller owns) for every double and
    single block of its HunyuanVideo. Blocks another pack already replaces keep that replacement (logged once).
    Returns the number of blocks patched."""
    dm, log = model.model.diffusion_model, LogOnce()

    def make(key) -> SlicedHunyuanBlock:
        cls = SlicedSingleBlock if key[0] == SINGLE else SlicedDoubleBlock
        return cls(key[1], token_chunk_for, log)

    keys = block_keys(len(dm.double_blocks), DOUBLE) + block_keys(len(dm.single_blocks), SINGLE)
    return len(install_sliced_blocks(model, "HunyuanVideo", unsupported_hunyuan_reason(dm), keys, make,
                                     SlicedHunyuanBlock, WRAPPER_KEY, add_call_info))


def remove_hunyuan_slicing(model: ModelPatcher) -> None:
    """Undo install_hunyuan_slicing on `model` (a clone the caller owns)."""
    remove_block_hooks(model, SlicedHunyuanBlock, WRAPPER_KEY)
