"""Step Rehash's shallow/deep split of a HunyuanVideo, run by the pack's block replacements (patch.py).

The split is over one stack: the double blocks, then the single blocks (positions 0..D-1, then D..D+S-1);
shallow = the first and last `shallow` positions (families/dit/rehash.py shallow_blocks), deep = those between.
The deep span may cross the double -> single boundary, where forward_orig joins the two streams (text and image
tokens, in the host's order) into one outside the blocks; that join is a reordering, so the residual is kept in
the form the stream has where the span ends:
- ending in a double block: the image and text residuals, joined (image first) into one tensor;
- ending in a single block: x leaving it minus the joined entry streams (joined as forward_orig joins them).
On a full call the deep blocks run and the residual is stored; on a rehash call the deep blocks return their input
and the residual is added where the stream has the exit's form (at the first deep block, or at the first deep single
block when the span starts among the double blocks). The adaptive mode's shallow feature is the entry, joined.

A ControlNet adds to the streams after blocks, outside them: such a call runs its deep blocks and neither stores
nor reuses (one log line).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ...host.log import logger
from ...host.options import DIT_CALL_KEY as CALL_KEY
def position_key(position: int, doubles: int) -> tuple[str, int]:
    """The hook key of stack position `position`."""
    return ("double_block", position) if position < doubles else ("single_block", position - doubles)


@dataclass
class HunyuanRehashCall:
    """One call's split: stack positions first_deep..last_deep are the deep path. `call` is the call's RehashCall
    (reuse(shallow) -> the residual to reuse or None; store(residual))."""

    call: object
    first_deep: int
    last_deep: int
    doubles: int | None = None  # D: positions below it are double blocks (from the call's HunyuanCall)
    txt_first: bool = True  # forward_orig joins (txt, img) (ComfyUI 0.33) or (img, txt) (0.3.64)
    entry: Tensor | None = None  # full call: the streams entering the first deep block, in the exit's form
    residual: Tensor | None = None  # rehash call: the residual to add
    skipped: bool = False  # deep blocks computed, nothing stored or reused (a ControlNet on the call)

    def _bind(self, to: dict) -> None:
        """The stack's layout, from the call's HunyuanCall (patch.py add_call_info) at the first block."""
        if self.doubles is None:
            call = to[CALL_KEY]
            self.doubles = len(call.double_blocks)
            first = call.double_blocks[0] if len(call.double_blocks) else None
            self.txt_first = not getattr(first, "flipped_img_txt", False)

    def _deep(self, position: int) -> bool:
        return self.first_deep <= position <= self.last_deep

    def _exit_is_double(self) -> bool:
        return self.last_deep < self.doubles

    def _joined(self, img: Tensor, txt: Tensor) -> Tensor:
        """The streams in the exit's form: image first (a double exit) or as forward_orig joins them."""
        if self._exit_is_double() or not self.txt_first:
            return torch.cat((img, txt), 1)
        return torch.cat((txt, img), 1)

    def _enter(self, joined: Tensor, transformer_options: dict) -> None:
        call = transformer_options.get(CALL_KEY)
        if call is not None and call.control:
            self.skipped = True
            logger.info("Step Rehash: a ControlNet adds to HunyuanVideo's streams between blocks; this call runs "
                        "in full.")
            return
        cached = self.call.reuse(joined)
        if cached is not None:
            self.residual = cached
        else:
            self.entry = joined

    def double(self, index: int, img: Tensor, txt: Tensor, to: dict,
               block: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Double block `index` on (img, txt): computed, skipped, or given the reused residual."""
        self._bind(to)
        if not self._deep(index):
            return block(img, txt)
        if index == self.first_deep:
            self._enter(self._joined(img, txt), to)  # a new tensor: the blocks update img and txt in place
        if self.residual is not None:
            if index == self.first_deep and self._exit_is_double():
                img_part, txt_part = self.residual.split([img.shape[1], txt.shape[1]], 1)
                return img + img_part, txt + txt_part
            return img, txt
        img, txt = block(img, txt)
        if index == self.last_deep and self.entry is not None:
            self.call.store(torch.cat((img, txt), 1) - self.entry)
            self.entry = None
        return img, txt

    def single(self, index: int, x: Tensor, to: dict, block: Callable[[Tensor], Tensor]) -> Tensor:
        """Single block `index` on the joint stream x: computed, skipped, or given the reused residual."""
        self._bind(to)
        position = self.doubles + index
        if not self._deep(position):
            return block(x)
        if position == self.first_deep:
            self._enter(x.clone(), to)  # the sliced block updates x in place
        if self.residual is not None:
            if position == max(self.first_deep, self.doubles):
                return x + self.residual
            return x
        out = block(x)
        if position == self.last_deep and self.entry is not None:
            self.call.store(out - self.entry)
            self.entry = None
        return out


def install_for_rehash(model) -> None:
    """The block replacements Step Rehash runs through, on `model` (a clone the caller owns), unless the pack's
    own are there already. Without a run state they slice nothing: each block is ComfyUI's own."""
    from ..dit.hooks import block_hooks
    from .patch import SlicedHunyuanBlock, install_hunyuan_slicing, unsupported_hunyuan_reason

    if unsupported_hunyuan_reason(model.model.diffusion_model) is not None:
        return
    hooks = block_hooks(model.model_options.get("transformer_options", {}))
    if not any(isinstance(v, SlicedHunyuanBlock) for v in hooks.values()):
        install_hunyuan_slicing(model)


def foreign_deep_blocks(transformer_options: dict, first_deep: int, last_deep: int, doubles: int) -> list:
    """Deep blocks whose replacement is not the pack's (another node's, or none): they cannot be skipped."""
    from ..dit.hooks import block_hooks
    from .patch import SlicedHunyuanBlock

    dit = block_hooks(transformer_options)
    keys = [position_key(p, doubles) for p in range(first_deep, last_deep + 1)]
    return [key for key in keys if not isinstance(dit.get(key), SlicedHunyuanBlock)]
