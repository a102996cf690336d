"""Operator Grouping: run a group of consecutive operators on one sub-feature before the next.

Only one chunk's intermediates are alive at a time; each chunk's result is written into one output
buffer. When a single chunk covers the whole batch the group runs once, with no extra copy.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .slicing import chunk_ranges

ChunkFn = Callable[[int, int], Tensor]


def run_frame_chunked(group: ChunkFn, batch: int, chunk: int) -> Tensor:
    """Evaluate `group(start, end)` for consecutive batch ranges and stack the results on dim 0.

    group(start, end) must return the group's output for samples [start, end) of the batch; samples
    must not interact (per-frame operators), which is what makes the result exact.
    """
    if chunk >= batch:
        return group(0, batch)
    out: Tensor | None = None
    for start, end in chunk_ranges(batch, chunk):
        part = group(start, end)
        if out is None:
            out = torch.empty((batch, *part.shape[1:]), device=part.device, dtype=part.dtype)
        out[start:end].copy_(part)
        del part
    return out
