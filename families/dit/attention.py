"""Attention of a slice of queries over all keys and values of a block, as a sliced DiT block runs it.

The keys and values of every token are computed first (in slices) into whole head-major buffers
(B, heads, L, d); then each query slice attends over them through ComfyUI's optimized_attention with
skip_reshape=True (the layout flag Flux's attention uses), which its kernels read as they are. In the host's
(B, L, C) layout ComfyUI's sub-quadratic attention (its CPU default) copies keys (transposed) and values whole
on every call, which per query slice would bring back two whole tensors.

API:
- head_major(t, heads): (B, n, C) -> (B, heads, n, C / heads), a view;
- key_value_buffers(like, heads, tokens, head_dim): two empty (B, heads, L, d) buffers;
- sliced_attention(q, keys, values, heads, transformer_options, mask=None): (B, heads, n, d) queries over
  whole head-major keys and values -> (B, n, C);
- token_rows(term, start, end): rows start..end-1 of a per-token (B, L, ...) term, or the term itself when it
  broadcasts over tokens (dimension 1 of size 1).
"""
from __future__ import annotations

import torch
from comfy.ldm.modules.attention import optimized_attention
from torch import Tensor


def head_major(t: Tensor, heads: int) -> Tensor:
    """(B, n, C) -> (B, heads, n, C / heads), a view."""
    return t.unflatten(2, (heads, -1)).transpose(1, 2)


def key_value_buffers(like: Tensor, heads: int, tokens: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """Empty whole key and value buffers (B, heads, L, d), of like's batch, dtype and device."""
    shape = (like.shape[0], heads, tokens, head_dim)
    return (torch.empty(shape, dtype=like.dtype, device=like.device),
            torch.empty(shape, dtype=like.dtype, device=like.device))


def sliced_attention(q: Tensor, keys: Tensor, values: Tensor, heads: int, transformer_options: dict,
                     mask: Tensor | None = None) -> Tensor:
    """optimized_attention of head-major queries (B, heads, n, d) over head-major keys and values
    (B, heads, L, d): (B, n, heads * d). `mask`: the rows of the block's attention mask for these queries."""
    return optimized_attention(q, keys, values, heads=heads, mask=mask, skip_reshape=True,
                               transformer_options=transformer_options)


def token_rows(term: Tensor, start: int, end: int) -> Tensor:
    """Rows start..end-1 (dimension 1) of a per-token term, or the term itself when it broadcasts."""
    return term if term.shape[1] == 1 else term[:, start:end]
