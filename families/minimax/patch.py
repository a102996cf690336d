"""Attach the sliced MiniMax H3 block (block.py) to a MODEL clone through ComfyUI's own hooks (families/dit/).

MiniMaxH3Model._forward hands each ("double_block", i) replacement {"img": h (S, C), "t_emb", "mod_segments",
"rope_freqs", "transformer_options"}, not the block; its DIFFUSION_MODEL wrapper (add_call_info) puts the
blocks and the video's tokens per frame into a per-call copy of transformer_options (a MiniMaxCall). The
replacement runs block i sliced when the block is the host's plain DiTBlock and the run asks for slices, else
the host's own block (`original_block`), saying why once per run; with Step Rehash on the call (a
DeepSpanCall, families/dit/rehash.py) it runs, skips or stores the deep blocks.

What the block reads of the call's conds (keyframes, references, denoise masks, text tags) reaches it only
through mod_segments and rope_freqs, which the host computes and the sliced block takes as they are.
MiniMax H3 is ComfyUI 0.33's (0.3.64 has none); its functions are recorded here, for 0.33.0 only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from comfy.ldm.minimax import model as h3
from comfy.model_patcher import ModelPatcher
from torch import Tensor

from ...host import fingerprints as host_fingerprints
from ...host.options import DIT_CALL_KEY as CALL_KEY, DIT_REHASH_CALL_KEY as REHASH_KEY
from ...host.options import DIT_WRAPPER_KEY as WRAPPER_KEY
from ..dit.block_hook import SlicedBlockHook, TokenChunkFor, common_unsliced_reason, token_chunk_from_state
from ..dit.hooks import block_keys, remove_block_hooks, install_sliced_blocks
from .block import sliced_block_forward


def minimax_functions() -> dict[str, Callable]:
    """The host functions the sliced block mirrors or relies on (how it calls them)."""
    return {
        "comfy minimax DiTBlock.forward": h3.DiTBlock.forward,
        "comfy minimax Attention.forward": h3.Attention.forward,
        "comfy minimax _mod_scale_shift": h3._mod_scale_shift,
        "comfy minimax _mod_gate": h3._mod_gate,
        "comfy minimax _mod_row": h3._mod_row,
        "comfy MiniMaxH3Model._forward": h3.MiniMaxH3Model._forward,
    }


RECORDED = {  # host_fingerprints.fingerprint of minimax_functions() on the hosts checked (ComfyUI 0.33.0 only)
    "comfy minimax DiTBlock.forward": {"c5cfdc371c38bf84": host_fingerprints.HOST_0_33_0},
    "comfy minimax Attention.forward": {"f5f03243dc85d715": host_fingerprints.HOST_0_33_0},
    "comfy minimax _mod_scale_shift": {"eff7855d8cd8fd61": host_fingerprints.HOST_0_33_0},
    "comfy minimax _mod_gate": {"e97aa716f897e198": host_fingerprints.HOST_0_33_0},
    "comfy minimax _mod_row": {"f2bca0e18a1c9fc4": host_fingerprints.HOST_0_33_0},
    "comfy MiniMaxH3Model._forward": {"332594832155192b": host_fingerprints.HOST_0_33_0},
}

_PLAIN_FORWARDS = ((h3.DiTBlock, None), (h3.Attention, "attn"), (h3.MLP, "mlp"), (h3.AdalnProj, "adaln_proj"))


def is_plain_block(block: nn.Module) -> bool:
    """The block and its parts run the host's own forwards (a subclass that overrides one is not sliced)."""
    for cls, part in _PLAIN_FORWARDS:
        module = block if part is None else getattr(block, part, None)
        if not isinstance(module, cls) or type(module).forward is not cls.forward:
            return False
    return True


def unsupported_minimax_reason(diffusion_model: nn.Module) -> str | None:
    """Why the pack leaves this diffusion model to ComfyUI (None: it slices, plans and splits it)."""
    if not isinstance(diffusion_model, h3.MiniMaxH3Model):
        return f"{type(diffusion_model).__name__} is not a MiniMax H3 model"
    name = type(diffusion_model).__name__
    if type(diffusion_model)._forward is not h3.MiniMaxH3Model._forward:
        return f"{name} runs its own _forward, which the pack has not checked"
    if not any(is_plain_block(block) for block in diffusion_model.blocks):
        kinds = sorted({type(block).__name__ for block in diffusion_model.blocks})
        return f"{name} has no plain DiTBlock ({', '.join(kinds)})"
    return None


@dataclass(frozen=True)
class MiniMaxCall:
    """What one diffusion-model call tells the block replacements."""

    blocks: nn.ModuleList
    tokens_per_frame: int  # packed video tokens of one latent frame (2x2 patches)
    unknown_conds: tuple[str, ...] = ()  # _forward reads its conds before the blocks: none is unknown to them


def video_tokens_per_frame(model, video: Tensor) -> int:
    """Packed video tokens of one latent frame (2x2 patches)."""
    return -(-video.shape[-2] // model.patch_size[1]) * -(-video.shape[-1] // model.patch_size[2])


def add_call_info(executor, x, timestep, context, transformer_options=None, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: a per-call copy of transformer_options with the MiniMaxCall; the rest unchanged.
    x: [video (1, C, T, H, W), audio (1, C, 2, T)]."""
    model = executor.class_obj
    video = x.tensors[0] if hasattr(x, "tensors") else x[0]  # a NestedTensor indexes each of its tensors
    call = MiniMaxCall(model.blocks, video_tokens_per_frame(model, video))
    transformer_options = {**(transformer_options or {}), CALL_KEY: call}
    return executor(x, timestep, context, transformer_options, *args, **kwargs)


class SlicedMiniMaxBlock(SlicedBlockHook):
    """The ("double_block", index) replacement: block `index` sliced over the packed tokens when it can be."""

    family = "MiniMax"

    def verdict(self) -> "host_fingerprints.Verdict":
        return minimax_verdict()

    def __call__(self, args: dict, extra: dict) -> dict:
        rehash = args["transformer_options"].get(REHASH_KEY)  # Step Rehash's DeepSpanCall (dit/rehash.py)
        if rehash is None:
            return {"img": self.forward(args, extra)}
        return {"img": rehash.run(self.index, args["img"], lambda x: self.forward({**args, "img": x}, extra))}

    def forward(self, args: dict, extra: dict) -> Tensor:
        """Block `index` on args["img"] (S, C): sliced when the run asks for slices and it can be, else ComfyUI's."""
        to, x, rope = args["transformer_options"], args["img"], args["rope_freqs"]
        call: MiniMaxCall | None = to.get(CALL_KEY)
        rows = x.unsqueeze(0)  # (1, S, C), as the slice size reads a DiT's tokens
        chunk = self.slice_size(to, rows, call, self.unsliced_reason(call, to, x, rope))
        if chunk is None:
            return extra["original_block"](args)["img"]
        return sliced_block_forward(call.blocks[self.index], x, args["t_emb"], args["mod_segments"], rope, to, chunk)

    def unsliced_reason(self, call: MiniMaxCall | None, to: dict, x: Tensor, rope: Tensor | None) -> str | None:
        if call is not None and not is_plain_block(call.blocks[self.index]):
            return f"{type(call.blocks[self.index]).__name__} is not the host's plain DiTBlock"
        reason = common_unsliced_reason(call, to, x, frozenset())
        if reason is None and x.ndim != 2:
            return f"its input is not one packed sequence (shape {tuple(x.shape)})"
        if reason is None and rope is not None and rope.shape[1] != x.shape[0]:
            return "its RoPE table does not match the tokens"
        if reason is None and comfy_in_training():
            return "ComfyUI is training (its out-of-place RoPE path)"
        return reason


def comfy_in_training() -> bool:
    import comfy.model_management

    return bool(getattr(comfy.model_management, "in_training", False))


def minimax_self_check() -> float:
    """The pack's sliced blocks against ComfyUI's on a tiny float32 MiniMaxH3Model: whole forwards through
    _forward's block hook, slices that do not divide the tokens. The largest relative difference."""
    from ...host import tiny_models

    model = tiny_models.minimax()
    x = [tiny_models.inputs((1, 24, 2, 4, 6), 1, torch.float32), tiny_models.inputs((1, 32, 2, 5), 2, torch.float32)]
    t = torch.tensor([600.0])
    context = tiny_models.inputs((1, 6, model.hidden_size), 3, torch.float32)

    def run(sliced: bool) -> Tensor:
        to = {}
        if sliced:
            to[CALL_KEY] = MiniMaxCall(model.blocks, 6)
            to["patches_replace"] = {"dit": {("double_block", i): SlicedMiniMaxBlock(i, lambda *_: 7)
                                             for i in range(len(model.blocks))}}
        with torch.inference_mode():
            video, audio = model(x, t, context, transformer_options=to)
        return torch.cat([video.flatten(), audio.flatten()])

    return host_fingerprints.relative_difference(run(True), run(False))


def minimax_verdict() -> "host_fingerprints.Verdict":
    """The host verdict on ComfyUI's MiniMax H3 functions the sliced block mirrors (float32: the exactness bound)."""
    return host_fingerprints.verdict("MiniMax", minimax_functions(), minimax_self_check, recorded=RECORDED,
                                     tolerance=1e-5)


def install_minimax_slicing(model: ModelPatcher, token_chunk_for: TokenChunkFor = token_chunk_from_state) -> list:
    """Add the block replacements and the call wrapper to `model` (a clone the caller owns) for every block of
    its MiniMax H3 model. Blocks another node already replaces keep that replacement (logged once). Returns the
    hook keys patched."""
    from ...host.log import LogOnce

    diffusion_model, log = model.model.diffusion_model, LogOnce()
    return install_sliced_blocks(model, "MiniMax", unsupported_minimax_reason(diffusion_model),
                                 block_keys(len(diffusion_model.blocks)),
                                 lambda key: SlicedMiniMaxBlock(key[1], token_chunk_for, log), SlicedMiniMaxBlock,
                                 WRAPPER_KEY, add_call_info)


def remove_minimax_slicing(model: ModelPatcher) -> None:
    """Undo install_minimax_slicing on `model` (a clone the caller owns)."""
    remove_block_hooks(model, SlicedMiniMaxBlock, WRAPPER_KEY)
