"""HunyuanVideo's Flux-style blocks (comfy/ldm/flux/layers.py DoubleStreamBlock, SingleStreamBlock) run slice by
slice over tokens.

Everything in a block but its attention acts on each token alone (LayerNorm, modulation, the qkv / linear1
projections, the RMSNorm of q and k, RoPE, the output projection, the MLP), and attention's softmax is per
query row. So each block runs as two groups over token slices, as the Wan block does (families/wan/block.py):

1. keys and values of every token (per slice) into whole head-major buffers;
2. per slice: its queries over all keys (families/dit/attention.py), then the rest of the block, written into
   the stream in place (a slice's queries read it before the slice is updated).

Double block: the image stream is sliced; the text stream (a few hundred tokens) runs whole, its keys and values
written into the same buffers at its place in the joint sequence (ComfyUI 0.33: text first; 0.3.64: image first,
the block's flipped_img_txt). Single block: the joint stream (text and image tokens as forward_orig concatenated
them) is sliced as one sequence; its linear1 runs in both groups (keys/values, then queries and the MLP input),
so no (L, 3C + 4C) tensor is ever whole.

The host's own apply_mod runs on every slice with the slice's part of modulation_dims (the I2V token replace:
per-token-range rows of the modulation), so per-token modulation is the host's own. RoPE: the host's attention
ropes q and k through comfy.ldm.flux.math (ComfyUI 0.33: apply_rope, one function per tensor; 0.3.64: its own
lines inside attention, mirrored by rope_inline); each slice takes its tokens' rows of pe (B, 1, L, d/2, 2, 2).
"""
from __future__ import annotations

import functools

import torch
from comfy.ldm.flux import layers as flux_layers
from comfy.ldm.flux import math as flux_math
from torch import Tensor

from ...core.slicing import chunk_ranges
from ...host import fingerprints as host_fingerprints
from ..dit.attention import key_value_buffers, sliced_attention

def dims_for(dims, start: int, end: int):
    """modulation_dims (token ranges -> modulation row) restricted to tokens start..end-1, relative to start."""
    if dims is None:
        return None
    out = []
    for first, last, row in dims:
        lo, hi = max(first, start), end if last is None else min(last, end)
        if lo < hi:
            out.append((lo - start, hi - start, row))
    return out


@functools.lru_cache(maxsize=None)
def host_ropes_with_apply_rope() -> bool:
    """Whether the host's flux attention ropes q and k through math.apply_rope (ComfyUI 0.33) rather than its own
    inline lines (0.3.64)."""
    return host_fingerprints.source_mentions(flux_math.attention, "apply_rope(q, k, pe)", True)


def rope_inline(x: Tensor, pe: Tensor, like: Tensor) -> Tensor:
    """ComfyUI 0.3.64's attention(): RoPE of q (or k) as its own lines compute it."""
    shape = x.shape
    x = x.to(dtype=pe.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * x[..., 0] + pe[..., 1] * x[..., 1]).reshape(*shape).type_as(like)


def rope(x: Tensor, pe: Tensor, like: Tensor) -> Tensor:
    """RoPE of head-major q or k (B, H, n, d) with pe (B, 1, n, d/2, 2, 2), as the host's attention does it."""
    if pe is None:
        return x
    if host_ropes_with_apply_rope():
        return flux_math.apply_rope1(x, pe)
    return rope_inline(x, pe, like)


def heads_of(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, n, 3C) -> q, k, v (B, H, n, d), as the host's blocks view and permute them."""
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)


def tokens_of(pe: Tensor | None, start: int, end: int) -> Tensor | None:
    return None if pe is None else pe[:, :, start:end]


def sliced_double_block(block, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | None, dims_img,
                        dims_txt, transformer_options: dict, token_chunk: int) -> tuple[Tensor, Tensor]:
    """DoubleStreamBlock.forward(img, txt, vec, pe, mask, dims_img, dims_txt, transformer_options) with the image
    stream in slices of `token_chunk` tokens; img and txt are updated in place and returned."""
    apply_mod, heads = flux_layers.apply_mod, block.num_heads
    img_mod1, img_mod2 = block.img_mod(vec)
    txt_mod1, txt_mod2 = block.txt_mod(vec)
    img_tokens, txt_tokens = img.shape[1], txt.shape[1]
    txt_first = not getattr(block, "flipped_img_txt", False)
    img_at, txt_at = (txt_tokens, 0) if txt_first else (0, img_tokens)
    keys, values = key_value_buffers(img, heads, img_tokens + txt_tokens, img.shape[2] // heads)

    # the text stream, whole: its keys and values into the buffers, its queries kept
    txt_q, txt_k, txt_v = heads_of(block.txt_attn.qkv(apply_mod(block.txt_norm1(txt), 1 + txt_mod1.scale,
                                                                txt_mod1.shift, dims_txt)), heads)
    txt_q, txt_k = block.txt_attn.norm(txt_q, txt_k, txt_v)
    txt_pe = tokens_of(pe, txt_at, txt_at + txt_tokens)
    keys[:, :, txt_at:txt_at + txt_tokens] = rope(txt_k, txt_pe, txt_v)
    values[:, :, txt_at:txt_at + txt_tokens] = txt_v
    txt_q = rope(txt_q, txt_pe, txt_v)
    del txt_k, txt_v

    def img_qkv(start: int, end: int) -> tuple[Tensor, Tensor, Tensor]:
        modulated = apply_mod(block.img_norm1(img[:, start:end]), 1 + img_mod1.scale, img_mod1.shift,
                              dims_for(dims_img, start, end))
        return heads_of(block.img_attn.qkv(modulated), heads)

    for start, end in chunk_ranges(img_tokens, token_chunk):  # group 1: the image keys and values
        _, k, v = img_qkv(start, end)
        k = block.img_attn.norm.key_norm(k).to(v)  # QKNorm.forward's k
        keys[:, :, img_at + start:img_at + end] = rope(k, tokens_of(pe, img_at + start, img_at + end), v)
        values[:, :, img_at + start:img_at + end] = v
        del _, k, v

    txt_attn = sliced_attention(txt_q, keys, values, heads, transformer_options, mask)
    del txt_q
    for start, end in chunk_ranges(img_tokens, token_chunk):  # group 2: the image stream, per slice
        q, k, v = img_qkv(start, end)
        q = block.img_attn.norm.query_norm(q).to(v)  # QKNorm.forward's q
        q = rope(q, tokens_of(pe, img_at + start, img_at + end), v)
        del k, v
        attn = sliced_attention(q, keys, values, heads, transformer_options, mask)
        del q
        dims = dims_for(dims_img, start, end)
        xs = img[:, start:end]  # a view: the updates land in img
        xs += apply_mod(block.img_attn.proj(attn), img_mod1.gate, None, dims)
        del attn
        xs += apply_mod(block.img_mlp(apply_mod(block.img_norm2(xs), 1 + img_mod2.scale, img_mod2.shift, dims)),
                        img_mod2.gate, None, dims)
    del keys, values

    txt += apply_mod(block.txt_attn.proj(txt_attn), txt_mod1.gate, None, dims_txt)
    del txt_attn
    txt += apply_mod(block.txt_mlp(apply_mod(block.txt_norm2(txt), 1 + txt_mod2.scale, txt_mod2.shift, dims_txt)),
                     txt_mod2.gate, None, dims_txt)
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return img, txt


def single_mlp(block, mlp: Tensor) -> Tensor:
    """SingleStreamBlock's activation of its MLP stream."""
    if getattr(block, "yak_mlp", False):
        half = block.mlp_hidden_dim_first // 2
        return block.mlp_act(mlp[..., half:]) * mlp[..., :half]
    return block.mlp_act(mlp)


def sliced_single_block(block, x: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | None, dims,
                        transformer_options: dict, token_chunk: int) -> Tensor:
    """SingleStreamBlock.forward(x, vec, pe, mask, dims, transformer_options) in slices of `token_chunk` tokens
    of the joint stream; x is updated in place and returned."""
    apply_mod, heads = flux_layers.apply_mod, block.num_heads
    mod, _ = block.modulation(vec)
    tokens, width = x.shape[1], block.hidden_size
    mlp_width = getattr(block, "mlp_hidden_dim_first", block.mlp_hidden_dim)
    keys, values = key_value_buffers(x, heads, tokens, width // heads)

    def hidden(start: int, end: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        modulated = apply_mod(block.pre_norm(x[:, start:end]), 1 + mod.scale, mod.shift, dims_for(dims, start, end))
        qkv, mlp = torch.split(block.linear1(modulated), [3 * width, mlp_width], dim=-1)
        return (*heads_of(qkv, heads), mlp)

    for start, end in chunk_ranges(tokens, token_chunk):  # group 1: keys and values
        _, k, v, mlp = hidden(start, end)
        k = block.norm.key_norm(k).to(v)  # QKNorm.forward's k
        keys[:, :, start:end] = rope(k, tokens_of(pe, start, end), v)
        values[:, :, start:end] = v
        del _, k, v, mlp

    for start, end in chunk_ranges(tokens, token_chunk):  # group 2: attention, MLP and residual, per slice
        q, k, v, mlp = hidden(start, end)
        q = rope(block.norm.query_norm(q).to(v), tokens_of(pe, start, end), v)
        del k, v
        attn = sliced_attention(q, keys, values, heads, transformer_options, mask)
        del q
        output = block.linear2(torch.cat((attn, single_mlp(block, mlp)), 2))
        del attn, mlp
        x[:, start:end] += apply_mod(output, mod.gate, None, dims_for(dims, start, end))
        del output
    del keys, values
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x
