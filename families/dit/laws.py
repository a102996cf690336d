"""What every DiT family's memory laws share: a running count of the values alive (Live), the norms' working sets,
and the attention kernels' laws. A family's laws read its block's operator sequence off the host's code and the
sliced forward's, allocating each step's output and freeing what it no longer needs (families/wan/laws.py,
families/hunyuan_video/laws.py).

API:
- Live: alloc(values), free(values), transient(values) (made and dropped within one step); .now, .peak;
- AttentionKernel, SUB_QUADRATIC (ComfyUI's CPU default), SDPA (its CUDA default), attention_kernel() (the one
  ComfyUI runs in this process);
- layer_norm(live, rows, dim), rms_norm(live, rows, dim, kernel): leave their output alive;
- attention(live, batch, queries, keys, dim, heads, kernel, head_major, contiguous_queries=False):
  optimized_attention of batch x queries over `keys` tokens; leaves its (B, queries, C) output alive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...host.attention import runs_pytorch_attention


@dataclass(frozen=True)
class AttentionKernel:
    """What optimized_attention holds besides its inputs and output."""

    name: str
    query_chunk: int  # queries per score block; 0: the kernel never materialises scores
    composite_rms_norm: bool  # RMSNorm as PyTorch's composite (one extra tensor while it runs)


SUB_QUADRATIC = AttentionKernel("sub-quadratic (ComfyUI's CPU default)", 4096, True)
SDPA = AttentionKernel("PyTorch SDPA (ComfyUI's CUDA default)", 0, False)


def attention_kernel() -> AttentionKernel:
    """The law of the attention ComfyUI runs in this process."""
    return SDPA if runs_pytorch_attention() else SUB_QUADRATIC


class Live:
    """Running total of the values alive, and its peak."""

    def __init__(self) -> None:
        self.now = 0.0
        self.peak = 0.0

    def alloc(self, values: float) -> None:
        self.now += values
        self.peak = max(self.peak, self.now)

    def free(self, values: float) -> None:
        self.now -= values

    def transient(self, values: float) -> None:
        """Values made and dropped within one step."""
        self.peak = max(self.peak, self.now + values)


def layer_norm(live: Live, rows: float, dim: int) -> None:
    live.alloc(rows * dim)
    live.transient(2 * rows)  # mean and rstd


def rms_norm(live: Live, rows: float, dim: int, kernel: AttentionKernel) -> None:
    if kernel.composite_rms_norm:
        live.transient(2 * rows * dim + rows)  # x * rsqrt and * weight both alive
    live.alloc(rows * dim)


def attention(live: Live, batch: int, queries: int, keys: int, dim: int, heads: int, kernel: AttentionKernel,
              head_major: bool, contiguous_queries: bool = False) -> None:
    """optimized_attention of batch x queries over `keys` tokens: leaves its (B, queries, C) output alive.
    head_major: q, k, v handed in (B, heads, L, d) with skip_reshape; contiguous_queries: q is contiguous in that
    layout (else the kernel copies it into (B x heads, L, d) order)."""
    c, h = dim, heads
    out = batch * queries * c
    if kernel.query_chunk == 0:  # SDPA: its output, then a copy back to (B, L, C) with several heads
        live.alloc(out)
        live.transient(out if h > 1 else 0)
        return
    # into (B x heads, L, d) order: views with one head or one sample; else copies of q, and of k and v
    # unless handed head-major
    copies = 0 if h == 1 or batch == 1 else (0 if contiguous_queries else batch * queries * c) + \
        (0 if head_major else 2 * batch * keys * c)
    live.alloc(copies)
    chunk = min(queries, kernel.query_chunk)
    scores = batch * h * chunk * keys
    if queries <= chunk:
        live.transient(2 * scores)
        live.alloc(out)
    else:
        chunks = math.ceil(queries / chunk)
        live.transient(out * (chunks - 1) / chunks + 2 * scores)  # earlier chunks' outputs, this chunk's scores
        live.alloc(out)
        live.transient(out)  # torch.cat of the chunks
    live.transient(out if h > 1 else 0)  # back to (B, L, C)
    live.free(copies)
