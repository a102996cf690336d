"""A MiniMax H3 DiT block (comfy/ldm/minimax/model.py DiTBlock) run slice by slice over its packed tokens.

H3 packs text, reference/condition, audio and video tokens into one sequence h (S, C) (batch 1) and runs
single-stream blocks over it: per-segment AdaLN modulation (a segment's rows of the six modulation terms, or
one row per token where a denoise mask blends timesteps), RMSNorm, fused QKV projection, per-head RMSNorm and
partial RoPE of q and k in place (comfy-kitchen's rms_rope_split_half_), attention of every token over every
token, gated residuals in place, SwiGLU MLP. All of it acts on each token alone but the attention, whose
softmax is per query row. So the block runs as two groups over token slices:

1. queries, keys and values: per slice, norm1 + modulation -> QKV -> RMSNorm + RoPE (the host's kernel on
   the slice's rows, with the slice's rows of the rotation table), written into three (S, heads, d) buffers;
2. the rest, per slice: attention of the slice's queries over all keys (comfy's optimized_attention, called
   as the host calls it) -> out-projection -> gated residual into h in place -> norm2 + modulation + MLP ->
   gated residual in place.

A slice's residuals land after every key and value was made from the block's input, as in the host (which
also adds in place). Alive: h, the q/k/v buffers (as the host's fused QKV output) and one slice's
intermediates; never the whole modulated input, attention output or MLP hidden (SwiGLU's 2 x ffn per token,
the host block's largest tensor).
"""
from __future__ import annotations

import comfy.model_management
import comfy.quant_ops
import torch
from comfy.ldm.minimax import model as h3
from torch import Tensor

from ...core.slicing import chunk_ranges

SHIFT_MSA, SCALE_MSA, GATE_MSA, SHIFT_MLP, SCALE_MLP, GATE_MLP = range(6)  # as the host unpacks adaln_proj


def segments_in(segments: list, start: int, end: int) -> list:
    """The host's mod_segments [(a, b, row)] for tokens start..end-1, in the slice's own indices; a per-token
    row tensor is cut to the slice's tokens."""
    out = []
    for a, b, row in segments:
        lo, hi = max(a, start), min(b, end)
        if lo < hi:
            out.append((lo - start, hi - start, row[lo - a:hi - a] if isinstance(row, Tensor) else row))
    return out


def qkv_rows(attn, h: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Attention.forward's first lines for n tokens: q, k (RMSNorm'd, RoPE'd) and v, each (n, heads, d)."""
    n = h.shape[0]
    q, k, v = attn.qkv_proj(h).split(attn.heads * attn.head_dim, dim=-1)
    v = v.view(n, attn.heads, attn.head_dim)
    if rope is None:
        return (attn.q_norm(q.view(n, attn.heads, attn.head_dim)), attn.k_norm(k.view(n, attn.heads, attn.head_dim)),
                v)
    q = q.view(1, n, attn.heads, attn.head_dim)
    k = k.view(1, n, attn.heads, attn.head_dim)
    qw = comfy.model_management.cast_to(attn.q_norm.weight, device=h.device)
    kw = comfy.model_management.cast_to(attn.k_norm.weight, device=h.device)
    comfy.quant_ops.ck.rms_rope_split_half_(q, k, rope, qw, kw, epsilon=attn.q_norm.eps, rot_dim=rope.shape[-3] * 2)
    return q[0], k[0], v


def attend(attn, q: Tensor, keys: Tensor, values: Tensor, transformer_options: dict) -> Tensor:
    """The host's attention call for the slice's queries (n, heads, d) over all keys and values (S, heads, d):
    head-major views, skip_reshape, in the host's tensor containers; out-projected, (n, C)."""
    def head_major(t: Tensor):
        return h3.AttentionTensorContainer(t.transpose(0, 1).unsqueeze(0))

    out = h3.optimized_attention(head_major(q), head_major(keys), head_major(values), attn.heads, mask=None,
                              skip_reshape=True, transformer_options=transformer_options)
    return attn.out_proj(out.squeeze(0))


def sliced_block_forward(block, x: Tensor, t_emb: Tensor, mod_segments: list, rope_freqs: Tensor | None,
                         transformer_options: dict, token_chunk: int) -> Tensor:
    """DiTBlock.forward(x, t_emb, mod_segments, rope_freqs, transformer_options) in slices of `token_chunk`
    tokens; x (S, C) is updated in place and returned, as the host's block does."""
    terms = block.adaln_proj(t_emb)
    attn, tokens = block.attn, x.shape[0]
    shape = (tokens, attn.heads, attn.head_dim)
    queries, keys, values = (torch.empty(shape, dtype=x.dtype, device=x.device) for _ in range(3))

    for start, end in chunk_ranges(tokens, token_chunk):  # group 1: q, k, v of every token
        segs = segments_in(mod_segments, start, end)
        h = h3._mod_scale_shift(block.norm1(x[start:end]), terms[SHIFT_MSA], terms[SCALE_MSA], segs)
        rope = None if rope_freqs is None else rope_freqs[:, start:end]
        q, k, v = qkv_rows(attn, h, rope)
        queries[start:end], keys[start:end], values[start:end] = q, k, v
        del h, q, k, v

    for start, end in chunk_ranges(tokens, token_chunk):  # group 2: the rest, per slice, in place
        segs = segments_in(mod_segments, start, end)
        xs = x[start:end]  # a view: the residuals land in x
        h3._mod_gate(xs, terms[GATE_MSA], attend(attn, queries[start:end], keys, values, transformer_options), segs)
        h = h3._mod_scale_shift(block.norm2(xs), terms[SHIFT_MLP], terms[SCALE_MLP], segs)
        h3._mod_gate(xs, terms[GATE_MLP], block.mlp(h), segs)
        del h
    return x
