"""A Wan attention block (comfy/ldm/wan/model.py WanAttentionBlock) run slice by slice over tokens.

Everything in the block but self-attention acts on each token alone (modulation, LayerNorms, Q/K/V
projections, RMSNorm of q and k, RoPE, cross-attention queries, output projection, feed-forward), and
self-attention's softmax is per query row. So the block runs as two groups over token slices:

1. keys and values: per slice, norm1 + modulation -> k (RMSNorm, RoPE) and v, written into two whole
   buffers; nothing else of the slice is kept;
2. everything else: per slice, norm1 + modulation -> q (RMSNorm, RoPE) -> attention of the slice's
   queries over all keys (ComfyUI's optimized_attention, as the host calls it) -> out-projection and
   gated residual in place into x -> norm3 + cross-attention + residual -> norm2 + modulation + FFN +
   gated residual, in place.

A slice's queries read x before the slice is updated, and the keys and values were all computed from
the block's input in group 1, so writing x in place is what the host computes. Alive at any time: x,
the key and value buffers, the context's cross-attention keys and values (once per block call) and
one slice's intermediates; never the whole modulated input, queries, attention output or FFN hidden.

Per-token modulation (Wan 2.2 5B: e of shape (B, E, 6, C), E > 1) maps token j to the row of e that
`repeat_e` gives it, without materialising repeat_e's (B, L, C) tensors.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import comfy.model_management
import torch
from comfy.ldm.flux.math import apply_rope1
from comfy.ldm.modules.attention import optimized_attention
from comfy.ldm.wan.model import WanAttentionBlock, WanI2VCrossAttention
from torch import Tensor

from ...core.slicing import chunk_ranges
from ...host import fingerprints as host_fingerprints
from ..dit.attention import head_major, key_value_buffers, sliced_attention

# the modulation terms in the order the host unbinds them
SHIFT_ATTN, SCALE_ATTN, GATE_ATTN, SHIFT_FFN, SCALE_FFN, GATE_FFN = range(6)


def modulation_terms(block: WanAttentionBlock, e: Tensor, x: Tensor) -> tuple[Tensor, ...]:
    """The block's six modulation terms, each (B, E, C) with E = 1 or E rows per sequence: the host's
    first lines (block modulation + time projection), unchanged."""
    if e.ndim < 4:
        return (comfy.model_management.cast_to(block.modulation, dtype=x.dtype, device=x.device) + e).chunk(6, dim=1)
    return (comfy.model_management.cast_to(block.modulation, dtype=x.dtype, device=x.device).unsqueeze(0) + e).unbind(2)


@functools.lru_cache(maxsize=None)
def host_calls_attn2_patch() -> bool:
    """Whether the host's WanAttentionBlock.forward calls attn2_patch patches (ComfyUI 0.33 does, 0.3.64 not)."""
    return host_fingerprints.source_mentions(WanAttentionBlock.forward, "attn2_patch", True)


@functools.lru_cache(maxsize=None)
def host_copies_block_input() -> bool:
    """Whether the host's WanAttentionBlock.forward makes x contiguous (ComfyUI 0.33): ComfyUI's forward then
    holds one more (B, L, C) in the first block (families/wan/laws.py WanWork.input_copy). The sliced block
    copies at its end instead, when keys and values are gone (sliced_block_forward)."""
    return host_fingerprints.source_mentions(WanAttentionBlock.forward, "x.contiguous()", False)


@dataclass(frozen=True)
class ModulationRows:
    """Which row of a (B, E, C) modulation term each of L tokens reads, as repeat_e(e, x) arranges them:
    E = 1 broadcasts; E rows repeated L // E times each (once more when that does not cover L, then cut)."""

    rows: int  # E
    tokens: int  # L

    @property
    def tokens_per_row(self) -> int:
        repeats = self.tokens // self.rows if self.rows > 1 else 1
        if repeats <= 1:
            return 1  # repeat_e hands e on as it is (E == L), or cuts E > L rows to L
        return repeats if repeats * self.rows == self.tokens else repeats + 1

    def take(self, term: Tensor, start: int, end: int) -> Tensor:
        """The rows tokens start..end-1 read: (B, 1, C) when they share one, else (B, end - start, C)."""
        if self.rows == 1:
            return term
        step = self.tokens_per_row
        first, last = start // step, (end - 1) // step
        if first == last:
            return term[:, first:first + 1]
        index = torch.arange(start, end, device=term.device) // step
        return term.index_select(1, index)


def modulated(norm, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """The host's torch.addcmul(shift, norm(x), 1 + scale), for one slice."""
    return torch.addcmul(shift, norm(x), 1 + scale)


def rope_heads(projected: Tensor, freqs: Tensor, heads: int) -> Tensor:
    """(B, n, C) -> RoPE'd (B, heads, n, C / heads) (a view), as WanSelfAttention's qkv_fn_q / qkv_fn_k do
    after the RMSNorm, in the head-major layout the attention call below takes."""
    b, n, c = projected.shape
    return apply_rope1(projected.view(b, n, heads, c // heads), freqs).transpose(1, 2)


def freqs_for(freqs: Tensor, start: int, end: int) -> Tensor:
    """RoPE frequencies (1, L, 1, d/2, 2, 2) of tokens start..end-1 (one row broadcasts to all)."""
    return freqs if freqs.shape[1] == 1 else freqs[:, start:end]


@dataclass
class CrossContext:
    """Keys and values of the cross-attention context, computed once per block call."""

    keys: Tensor
    values: Tensor
    image_keys: Tensor | None = None  # WanI2VCrossAttention: the CLIP-image tokens apart
    image_values: Tensor | None = None


def cross_context(attn, context: Tensor, context_img_len: int | None) -> CrossContext:
    """What WanT2VCrossAttention / WanI2VCrossAttention compute from the context alone."""
    if not isinstance(attn, WanI2VCrossAttention):
        return CrossContext(attn.norm_k(attn.k(context)), attn.v(context))
    context_img = context[:, :context_img_len]
    context = context[:, context_img_len:]
    return CrossContext(attn.norm_k(attn.k(context)), attn.v(context),
                        attn.norm_k_img(attn.k_img(context_img)), attn.v_img(context_img))


def cross_attention(attn, x: Tensor, ctx: CrossContext, transformer_options: dict) -> Tensor:
    """The cross-attention of one slice's tokens, as the host's forward computes it."""
    q = attn.norm_q(attn.q(x))
    if ctx.image_keys is None:
        return attn.o(optimized_attention(q, ctx.keys, ctx.values, heads=attn.num_heads,
                                          transformer_options=transformer_options))
    # ComfyUI 0.33 keeps the image attention off low-precision kernels (SageAttention); 0.3.64 ignores the flag
    img_x = optimized_attention(q, ctx.image_keys, ctx.image_values, heads=attn.num_heads,
                                transformer_options=transformer_options, low_precision_attention=False)
    x = optimized_attention(q, ctx.keys, ctx.values, heads=attn.num_heads, transformer_options=transformer_options)
    x = x + img_x
    return attn.o(x)


def sliced_block_forward(block: WanAttentionBlock, x: Tensor, e: Tensor, freqs: Tensor, context: Tensor,
                         context_img_len: int | None, transformer_options: dict, token_chunk: int) -> Tensor:
    """WanAttentionBlock.forward(x, e, freqs, context, context_img_len, transformer_options), computed in
    slices of `token_chunk` tokens; x (B, L, C) is updated in place and returned contiguous. ComfyUI 0.33's
    block copies its first input (forward_orig's transposed x) contiguous at its start, while keys and values
    are still to come; this one copies it at its end, once keys and values are freed, so the copy raises no
    peak (x and its copy, against x, keys and values before) and every later block reads a contiguous x.
    With attn2_patch patches (ComfyUI 0.33's MultiTalk), the per-slice group stops after the
    cross-attention, the patches get the whole x as the host gives it to them, and the feed-forward runs per
    slice on what they return."""
    b, tokens, channels = x.shape
    attn2_patches = transformer_options.get("patches", {}).get("attn2_patch", []) if host_calls_attn2_patch() else []
    terms = modulation_terms(block, e, x)
    rows = ModulationRows(terms[0].shape[1], tokens)
    sa = block.self_attn
    # head-major (B, heads, L, C / heads), as families/dit/attention.py's sliced_attention reads them
    keys, values = key_value_buffers(x, sa.num_heads, tokens, channels // sa.num_heads)

    def attention_input(start: int, end: int) -> Tensor:
        return modulated(block.norm1, x[:, start:end], rows.take(terms[SHIFT_ATTN], start, end),
                         rows.take(terms[SCALE_ATTN], start, end))

    for start, end in chunk_ranges(tokens, token_chunk):  # group 1: keys and values of every token
        xm = attention_input(start, end)
        keys[:, :, start:end] = rope_heads(sa.norm_k(sa.k(xm)), freqs_for(freqs, start, end), sa.num_heads)
        values[:, :, start:end] = head_major(sa.v(xm), sa.num_heads)
        del xm

    ctx = cross_context(block.cross_attn, context, context_img_len)

    def attention(xs: Tensor, start: int, end: int) -> None:  # self- and cross-attention of one slice, in place
        q = rope_heads(sa.norm_q(sa.q(attention_input(start, end))), freqs_for(freqs, start, end),
                       sa.num_heads)
        y = sa.o(sliced_attention(q, keys, values, sa.num_heads, transformer_options))
        del q
        xs.addcmul_(y, rows.take(terms[GATE_ATTN], start, end))
        del y
        xs.add_(cross_attention(block.cross_attn, block.norm3(xs), ctx, transformer_options))

    def feed_forward(xs: Tensor, start: int, end: int) -> None:  # of one slice, in place
        y = block.ffn(modulated(block.norm2, xs, rows.take(terms[SHIFT_FFN], start, end),
                                rows.take(terms[SCALE_FFN], start, end)))
        xs.addcmul_(y, rows.take(terms[GATE_FFN], start, end))

    if not attn2_patches:
        for start, end in chunk_ranges(tokens, token_chunk):  # group 2: the rest of the block, per slice
            xs = x[:, start:end]  # a view: the updates below land in x
            attention(xs, start, end)
            feed_forward(xs, start, end)
        del keys, values, ctx
        return x.contiguous()  # a copy only in the first block (forward_orig's transposed x)
    for start, end in chunk_ranges(tokens, token_chunk):  # group 2a: attention, per slice
        attention(x[:, start:end], start, end)
    del keys, values, ctx
    for p in attn2_patches:  # as the host calls them: on the whole x after the cross-attention
        x = p({"x": x, "transformer_options": transformer_options})
    x = x.contiguous()
    for start, end in chunk_ranges(tokens, token_chunk):  # group 2b: the feed-forward, per slice
        feed_forward(x[:, start:end], start, end)
    return x
