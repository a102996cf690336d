"""Step Rehash's shallow/deep split of an LTX DiT (families/dit/rehash.py's), run by the pack's block replacements
(patch.py).

shallow = the first and last `shallow` blocks, which run on every step; deep = the blocks between them. The deep
feature is the residual the deep blocks add: x leaving the last deep block minus x entering the first one. On a
full call the deep blocks run and the residual is stored; on a rehash call the first deep block adds the reused
residual (held or extrapolated: the RehashCall decides, techniques/rehash.py) and the deep blocks return their
input without computing anything. The adaptive mode's shallow feature is x entering the first deep block.

LTX-2 (x = (video, audio)): each stream's residual is its own, both kept per cond: one cache row per cond holds
the video residual then the audio residual (flattened), so the RehashCall's per-cond split (along the batch)
keeps every cond's streams together and apart from the other conds', and a rehash step adds to each stream its
own part. LTXModel's forward adds nothing to x between the blocks, so the split is exact where the deep blocks'
residual is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..dit import rehash as dit_rehash


def packed(streams) -> Tensor:
    """x (B, T, C), or LTX-2's (video, audio), as one (B, n) row per sample: each stream flattened, in order."""
    if isinstance(streams, Tensor):
        return streams
    return torch.cat([s.reshape(s.shape[0], -1) for s in streams], dim=1)


def unpacked(row: Tensor, like):
    """packed's inverse, shaped as `like` (views of row)."""
    if isinstance(like, Tensor):
        return row
    parts, start = [], 0
    for s in like:
        size = s[0].numel()
        parts.append(row[:, start:start + size].view(s.shape))
        start += size
    return tuple(parts)


def added(x, residual: Tensor):
    """x + residual (packed), a new tensor per stream."""
    if isinstance(x, Tensor):
        return x + residual
    return tuple(s + r for s, r in zip(x, unpacked(residual, x)))


@dataclass
class LtxRehashCall(dit_rehash.DeepSpanCall):
    """One LTX call's split (DeepSpanCall), LTX-2's (video, audio) x packed per cond into one row."""

    def run(self, index: int, x, block: Callable):
        """Block `index` on x ((B, T, C) or (video, audio)): computed, skipped, or given the reused residual."""
        if isinstance(x, Tensor) or not self.first_deep <= index <= self.last_deep:
            return super().run(index, x, block)
        if index == self.first_deep:
            x_in = packed(x)  # a new tensor: the blocks update x in place
            cached = self.call.reuse(x_in)
            if cached is not None:
                self.reused = True
                return added(x, cached)
            self.x_in = x_in
        elif self.reused:
            return x
        out = block(x)
        if index == self.last_deep and self.x_in is not None:
            self.call.store(packed(out) - self.x_in)
            self.x_in = None
        return out


def install_for_rehash(model) -> None:
    """The block replacements Step Rehash runs through, on `model` (a clone the caller owns), unless the pack's
    own are there already. Without their run state they slice nothing: each block is ComfyUI's own."""
    from ..dit.hooks import block_hooks
    from .patch import SlicedLtxBlock, install_ltxv_slicing, unsupported_ltxv_reason

    if unsupported_ltxv_reason(model.model.diffusion_model) is not None:
        return
    hooks = block_hooks(model.model_options.get("transformer_options", {}))
    if not any(isinstance(v, SlicedLtxBlock) for v in hooks.values()):
        install_ltxv_slicing(model)


def foreign_deep_blocks(transformer_options: dict, first_deep: int, last_deep: int) -> list[int]:
    """Deep blocks whose replacement is not the pack's (another node's, or none): they cannot be skipped."""
    from ..dit.hooks import foreign_blocks
    from .patch import SlicedLtxBlock

    return foreign_blocks(transformer_options, first_deep, last_deep, SlicedLtxBlock)
