"""Step Rehash's shallow/deep split of a stack of DiT blocks, run by a family's block replacements.

shallow = the first and last `shallow` blocks, which run on every step; deep = the blocks between them. The
deep feature is the residual the deep blocks add: x leaving the last deep block minus x entering the first one.
On a full call the deep blocks run and the residual is stored; on a rehash call the first deep block adds the
reused residual (held or extrapolated: the RehashCall decides, techniques/rehash.py) and the deep blocks return
their input without computing anything. The adaptive mode's shallow feature is x entering the first deep block.
Exact only where the model adds nothing to x between the deep blocks outside them (the family checks).

API:
- shallow_blocks(split_point, blocks, family): the count of shallow blocks at each end from the node's
  cache_block (-1: one at each end), raising core.rehash.RehashConfigError out of range;
- DeepSpanCall(call, first_deep, last_deep).run(position, x, block): block `position` of the stack (counted
  over the stack the family splits) on x, computed, skipped, or given the reused residual.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from ...core.rehash import RehashConfigError

DEFAULT_SHALLOW = 1  # split_point (the node's cache_block) -1: one block at each end


def shallow_blocks(split_point: int, blocks: int, family: str) -> int:
    """The blocks at each end that run on every step, from RehashConfig.split_point (the node's cache_block):
    -1 gives one at each end (none on a model of fewer than 3 blocks, where the deep path is then every block);
    a value >= 0 is the count itself. At least one block must be left deep."""
    if split_point == -1:
        return DEFAULT_SHALLOW if blocks > 2 * DEFAULT_SHALLOW else 0
    if split_point < 0 or 2 * split_point >= blocks:
        raise RehashConfigError(f"cache_block {split_point} is out of range for a {family} model with {blocks} "
                                f"blocks (shallow blocks at each end: 0..{(blocks - 1) // 2}, or -1 for one)")
    return split_point


@dataclass
class DeepSpanCall:
    """One call's split: blocks first_deep..last_deep are the deep path. `call` is the call's RehashCall
    (reuse(shallow) -> the residual to reuse or None; store(residual))."""

    call: object
    first_deep: int
    last_deep: int
    x_in: Tensor | None = None  # full call: x entering the first deep block
    reused: bool = False

    def run(self, index: int, x: Tensor, block: Callable[[Tensor], Tensor]) -> Tensor:
        """Block `index` on x (B, L, C): computed, skipped, or given the reused residual."""
        if not self.first_deep <= index <= self.last_deep:
            return block(x)
        if index == self.first_deep:
            # a copy: a sliced block updates x in place, and the call may keep the shallow feature
            x_in = x.clone()
            cached = self.call.reuse(x_in)
            if cached is not None:
                self.reused = True
                return x_in.add_(cached)
            self.x_in = x_in
        elif self.reused:
            return x
        out = block(x)
        if index == self.last_deep and self.x_in is not None:
            self.call.store(out - self.x_in)
            self.x_in = None
        return out
