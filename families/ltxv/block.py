"""LTX's transformer blocks (comfy/ldm/lightricks/model.py BasicTransformerBlock, av_model.py
BasicAVTransformerBlock) run slice by slice over the video tokens.

Everything in a block but its attentions acts on each token alone (RMSNorm + adaLN modulation, the Q/K/V
projections and their RMSNorms, RoPE, per-head gates, output projections, the feed-forward), and attention's
softmax is per query row. So a block runs as two groups over video-token slices:

1. keys and values of the self-attention: per slice, RMSNorm + modulation -> k (RMSNorm, RoPE) and v, written
   into two whole head-major buffers;
2. the rest, per slice, in place into x: the slice's queries against all keys (ComfyUI's optimized_attention,
   as the host calls it), gate, residual; the text cross-attention (its keys and values computed once per
   block); LTX-2: the audio-to-video cross-attention (audio keys and values once per block) and the keys and
   values the video-to-audio cross-attention reads, from x after the audio-to-video update; the feed-forward.

A slice's queries read x before the slice is updated and the keys were all computed from the block's input in
group 1, so writing x in place is what the host computes (its block updates x in place too).

LTX-2's audio stream runs whole, through the host's own modules: a few audio tokens per latent frame (25 audio
latents a second against a latent frame of hundreds to thousands of video tokens per 8 frames), so its tensors
are small next to one video slice's; the video-to-audio attention (all audio queries against the video keys of
group 2) runs once per block, as the host runs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.ldm.common_dit
import comfy.ldm.modules.attention as host_attention
import torch
from comfy.ldm.lightricks import model as ltx_model
from torch import Tensor

from ...core.slicing import chunk_ranges
from ..dit.attention import head_major, key_value_buffers


def rms_adaln(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """The host's fused rmsnorm(x) * (1 + scale) + shift (comfy-kitchen; ComfyUI 0.3.64 has no comfy.quant_ops, and
    its LTX block is left to ComfyUI: patch.py host_reason)."""
    import comfy.quant_ops

    return comfy.quant_ops.ck.rms_adaln(x, scale, shift)


def rms_modulated(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """The host's unfused form (LTX-2's audio stream): rms_norm(x) * (1 + scale) + shift."""
    return comfy.ldm.common_dit.rms_norm(x) * (1 + scale) + shift


# -- modulation ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdaRows:
    """Modulation terms, each (B, R, C), and which row token j reads: R = 1 broadcasts, else tokens run in
    groups of `tokens_per_row` (1: a row per token; a latent frame's patches: CompressedTimestep's frames)."""

    terms: tuple[Tensor, ...]
    tokens_per_row: int

    def take(self, index: int, start: int, end: int) -> Tensor:
        """The rows tokens start..end-1 read of term `index`: (B, 1, C) when they share one."""
        term = self.terms[index]
        if term.shape[1] == 1:
            return term
        step = self.tokens_per_row
        if step == 1:
            return term[:, start:end]
        first, last = start // step, (end - 1) // step
        if first == last:
            return term[:, first:first + 1]
        return term.index_select(1, torch.arange(start, end, device=term.device) // step)


def ada_rows(table: Tensor, batch: int, timestep, indices: slice, tokens: int,
             dtype: torch.dtype | None = None) -> AdaRows:
    """BasicTransformerBlock's / BasicAVTransformerBlock.get_ada_values' terms (table[indices] + the timestep's
    rows, computed on its rows: a CompressedTimestep is not expanded), with the tokens each row stands for.
    dtype: BasicTransformerBlock casts the table to x's, get_ada_values to the timestep's (None)."""
    data = getattr(timestep, "data", timestep)  # CompressedTimestep keeps one row per latent frame
    per_row = getattr(timestep, "patches_per_frame", 1)
    rows = data.shape[1]
    table_values = table[indices].unsqueeze(0).unsqueeze(0).to(device=data.device, dtype=dtype or data.dtype)
    terms = (table_values + data.reshape(batch, rows, table.shape[0], -1)[:, :, indices, :]).unbind(dim=2)
    if rows == 1:
        return AdaRows(terms, 1)
    if rows * per_row != tokens:
        raise ValueError(f"{rows} modulation rows of {per_row} tokens do not cover {tokens} tokens")
    return AdaRows(terms, per_row)


def timestep_rows(timestep) -> int:
    data = getattr(timestep, "data", timestep)
    return data.shape[1] * getattr(timestep, "patches_per_frame", 1)


# -- attention -----------------------------------------------------------------------------------------------

def rope(t: Tensor, pe, start: int | None = None, end: int | None = None) -> Tensor:
    """The host's apply_rotary_emb on tokens start..end-1 of `pe` (rotation matrix (B, T, H, d/2, 2, 2), split)."""
    if pe is None:
        return t
    matrix, split = pe
    if start is not None and matrix.shape[1] != 1:
        matrix = matrix[:, start:end]
    return ltx_model.apply_rotary_emb(t, (matrix, split))


def gated_output(attn, out: Tensor, x: Tensor) -> Tensor:
    """CrossAttention.forward's per-head gate (LTX-2.3) and output projection."""
    if attn.to_gate_logits is not None:
        b, t, _ = out.shape
        gates = 2.0 * torch.sigmoid(attn.to_gate_logits(x))
        out = (out.view(b, t, attn.heads, attn.dim_head) * gates.unsqueeze(-1)).view(b, t, attn.heads * attn.dim_head)
    return attn.to_out(out)


@dataclass
class KeysValues:
    """Keys and values of one attention, head-major (B, H, T, d) when `head_major`, else as the host lays them."""

    keys: Tensor
    values: Tensor
    head_major: bool


def context_keys_values(attn, context: Tensor, k_pe=None) -> KeysValues:
    """What CrossAttention.forward computes from its context alone (once per block call)."""
    return KeysValues(rope(attn.k_norm(attn.to_k(context)), k_pe), attn.to_v(context), False)


def empty_keys_values(attn, tokens: int, like: Tensor) -> KeysValues:
    return KeysValues(*key_value_buffers(like, attn.heads, tokens, attn.dim_head), True)


def store_keys_values(attn, kv: KeysValues, source: Tensor, pe, start: int, end: int) -> None:
    """Keys (RMSNorm, RoPE) and values of tokens start..end-1 from their attention input `source` (B, n, C)."""
    kv.keys[:, :, start:end] = head_major(rope(attn.k_norm(attn.to_k(source)), pe, start, end), attn.heads)
    kv.values[:, :, start:end] = head_major(attn.to_v(source), attn.heads)


def attention(q: Tensor, kv: KeysValues, heads: int, attn_precision, transformer_options: dict, mask=None,
              **kwargs) -> Tensor:
    """optimized_attention as CrossAttention.forward calls it (looked up at call time, as the host does, with its
    attn_precision and, for the guide mask, low_precision_attention: what families/dit/attention.py's
    sliced_attention does not pass); q (B, n, H * d) -> (B, n, H * d)."""
    if kv.head_major:
        return host_attention.optimized_attention(head_major(q, heads), kv.keys, kv.values, heads, mask=mask,
                                                  attn_precision=attn_precision, skip_reshape=True,
                                                  transformer_options=transformer_options, **kwargs)
    return host_attention.optimized_attention(q, kv.keys, kv.values, heads, mask=mask, attn_precision=attn_precision,
                                              transformer_options=transformer_options, **kwargs)


def self_attention(q: Tensor, kv: KeysValues, attn, mask, start: int, end: int, transformer_options: dict) -> Tensor:
    """Queries of tokens start..end-1 over all keys, with the block's self-attention mask: none, one that
    broadcasts over queries or has a row per query, or the guide mask (model.py _attention_with_guide_mask:
    noisy queries, tracked guide queries and the rest apart, each with its own mask)."""
    run = lambda qs, m, **kw: attention(qs, kv, attn.heads, attn.attn_precision, transformer_options, m, **kw)  # noqa: E731
    if mask is None:
        return run(q, None)
    if isinstance(mask, torch.Tensor):
        return run(q, mask if mask.shape[-2] == 1 else mask[..., start:end, :])
    guide_start, tracked_end = mask.guide_start, mask.guide_start + mask.tracked_count
    out = torch.empty_like(q)
    for lo, hi, rows in ((0, guide_start, lambda a, b: mask.noisy_mask),
                         (guide_start, tracked_end,
                          lambda a, b: mask.tracked_mask[:, :, a - guide_start:b - guide_start]),
                         (tracked_end, None, None)):
        a, b = max(lo, start), min(end if hi is None else hi, end)
        if a >= b:
            continue
        if rows is None:
            out[:, a - start:b - start] = run(q[:, a - start:b - start], None)
        else:
            out[:, a - start:b - start] = run(q[:, a - start:b - start], rows(a, b), low_precision_attention=False)
    return out


def attend(attn, x: Tensor, kv: KeysValues, transformer_options: dict, pe=None, start=None, end=None,
           mask=None) -> Tensor:
    """CrossAttention.forward for the queries of x (B, n, C) (tokens start..end-1 of their stream), against
    keys and values computed beforehand."""
    q = rope(attn.q_norm(attn.to_q(x)), pe, start, end)
    if kv.head_major:
        out = self_attention(q, kv, attn, mask, start, end, transformer_options)
    else:
        out = attention(q, kv, attn.heads, attn.attn_precision, transformer_options,
                        mask if mask is None or mask.shape[-2] == 1 else mask[..., start:end, :])
    del q
    return gated_output(attn, out, x)


def value_passthrough(attn, x: Tensor) -> Tensor:
    """CrossAttention.forward's self-attention under STG (stg_skip_self_attn): out = v."""
    return gated_output(attn, attn.to_v(x), x)


def skips_self_attention(transformer_options: dict) -> bool:
    return bool(transformer_options.get("stg_skip_self_attn", False))


# -- the blocks --------------------------------------------------------------------------------------------------

SHIFT_MSA, SCALE_MSA, GATE_MSA, SHIFT_MLP, SCALE_MLP, GATE_MLP = range(6)


@dataclass
class VideoStream:
    """What a block's video part reads besides x: the modulation rows, RoPE, masks and text context."""

    ada: AdaRows  # the six terms in the host's order
    cross_ada: AdaRows | None  # cross_attention_adaln: shift, scale, gate of the text queries
    pe: tuple
    self_mask: object  # None, a tensor, or model.py's GuideAttentionMask
    text: KeysValues  # the text cross-attention's keys and values
    text_mask: Tensor | None


def text_keys_values(block, attn, context: Tensor, prompt_table, prompt_timestep, batch: int,
                     like: Tensor) -> KeysValues:
    """The text cross-attention's keys and values; with cross_attention_adaln, of the context modulated by the
    prompt timestep (apply_cross_attention_adaln's encoder_hidden_states)."""
    if block.cross_attention_adaln:
        shift_kv, scale_kv = (prompt_table[None, None].to(device=like.device, dtype=like.dtype)
                              + prompt_timestep.reshape(batch, prompt_timestep.shape[1], 2, -1)).unbind(dim=2)
        context = context * (1 + scale_kv) + shift_kv
    return context_keys_values(attn, context)


def text_cross_attention(block, attn, xs: Tensor, stream: VideoStream, start: int, end: int, to: dict,
                         norm_without_adaln) -> Tensor:
    """The text cross-attention of one slice: with cross_attention_adaln as apply_cross_attention_adaln (its
    rms_adaln queries, gated), else attn on norm_without_adaln(xs)."""
    if block.cross_attention_adaln:
        shift_q, scale_q, gate = (stream.cross_ada.take(i, start, end) for i in range(3))
        return attend(attn, rms_adaln(xs, scale_q, shift_q), stream.text, to, mask=stream.text_mask,
                      start=start, end=end) * gate
    return attend(attn, norm_without_adaln(xs), stream.text, to, mask=stream.text_mask, start=start, end=end)


def video_self_keys(attn, x: Tensor, stream: VideoStream, chunk: int, to: dict) -> KeysValues | None:
    """Group 1: the self-attention's keys and values of every token (None under STG: values pass through)."""
    if skips_self_attention(to):
        return None
    kv = empty_keys_values(attn, x.shape[1], x)
    for start, end in chunk_ranges(x.shape[1], chunk):
        xm = rms_adaln(x[:, start:end], stream.ada.take(SCALE_MSA, start, end), stream.ada.take(SHIFT_MSA, start, end))
        store_keys_values(attn, kv, xm, stream.pe, start, end)
        del xm
    return kv


def video_self_attention(attn, xs: Tensor, kv: KeysValues | None, stream: VideoStream, start: int, end: int,
                         to: dict) -> None:
    """One slice's self-attention, gated, added into xs in place."""
    xm = rms_adaln(xs, stream.ada.take(SCALE_MSA, start, end), stream.ada.take(SHIFT_MSA, start, end))
    y = value_passthrough(attn, xm) if kv is None else attend(attn, xm, kv, to, stream.pe, start, end,
                                                              stream.self_mask)
    del xm
    xs.addcmul_(y, stream.ada.take(GATE_MSA, start, end))


def video_stream(block, table, x: Tensor, timestep, dtype, pe, self_mask, text_attn, context, prompt_table,
                 prompt_timestep, text_mask) -> VideoStream:
    b, tokens = x.shape[0], x.shape[1]
    ada = ada_rows(table, b, timestep, slice(0, 6), tokens, dtype)
    cross = ada_rows(table, b, timestep, slice(6, 9), tokens, dtype) if block.cross_attention_adaln else None
    text = text_keys_values(block, text_attn, context, prompt_table, prompt_timestep, b, x)
    return VideoStream(ada, cross, pe, self_mask, text, text_mask)


def sliced_ltxv_block(block, x: Tensor, context: Tensor, attention_mask, timestep: Tensor, pe, to: dict,
                      self_attention_mask, prompt_timestep, chunk: int) -> Tensor:
    """BasicTransformerBlock.forward(x, context, attention_mask, timestep, pe, to, self_attention_mask,
    prompt_timestep) in slices of `chunk` tokens; x (B, T, C) is updated in place and returned."""
    stream = video_stream(block, block.scale_shift_table, x, timestep, x.dtype, pe, self_attention_mask, block.attn2,
                          context, getattr(block, "prompt_scale_shift_table", None), prompt_timestep, attention_mask)
    kv = video_self_keys(block.attn1, x, stream, chunk, to)
    for start, end in chunk_ranges(x.shape[1], chunk):
        xs = x[:, start:end]  # a view: the updates land in x
        video_self_attention(block.attn1, xs, kv, stream, start, end, to)
        xs.add_(text_cross_attention(block, block.attn2, xs, stream, start, end, to, lambda t: t))
        y = comfy.ldm.common_dit.rms_norm(xs)
        y = torch.addcmul(y, y, stream.ada.take(SCALE_MLP, start, end)).add_(stream.ada.take(SHIFT_MLP, start, end))
        xs.addcmul_(block.ff(y), stream.ada.take(GATE_MLP, start, end))
        del y
    return x


def audio_self_and_text(block, ax: Tensor, a_context, a_timestep, a_pe, a_prompt_timestep, attention_mask,
                        to: dict) -> None:
    """BasicAVTransformerBlock.forward's audio self- and text cross-attention, whole, through the host's modules."""
    b = ax.shape[0]
    shift, scale = block.get_ada_values(block.audio_scale_shift_table, b, a_timestep, slice(0, 2))
    y = block.audio_attn1(rms_modulated(ax, scale, shift), pe=a_pe, transformer_options=to)
    ax.addcmul_(y, block.get_ada_values(block.audio_scale_shift_table, b, a_timestep, slice(2, 3))[0])
    del y
    ax.add_(block._apply_text_cross_attention(ax, a_context, block.audio_attn2, block.audio_scale_shift_table,
                                              getattr(block, "audio_prompt_scale_shift_table", None), a_timestep,
                                              a_prompt_timestep, attention_mask, to))


def audio_feed_forward(block, ax: Tensor, a_timestep) -> None:
    b = ax.shape[0]
    shift, scale = block.get_ada_values(block.audio_scale_shift_table, b, a_timestep, slice(3, 5))
    y = block.audio_ff(rms_modulated(ax, scale, shift))
    ax.addcmul_(y, block.get_ada_values(block.audio_scale_shift_table, b, a_timestep, slice(5, 6))[0])


@dataclass(frozen=True)
class AvFlags:
    """Which parts of BasicAVTransformerBlock.forward run (its transformer_options switches)."""

    video: bool
    audio: bool
    a2v: bool
    v2a: bool

    @staticmethod
    def of(to: dict, ax: Tensor) -> "AvFlags":
        run_vx, run_ax = to.get("run_vx", True), to.get("run_ax", True) and ax.numel() > 0
        return AvFlags(run_vx, run_ax, run_vx and to.get("a2v_cross_attn", True) and ax.numel() > 0,
                       run_ax and to.get("v2a_cross_attn", True))


@dataclass
class AvCross:
    """The audio<->video cross-attentions of one block call: the audio side whole (its modulation, the
    audio-to-video keys and values), the video side per slice (its modulation rows, the video-to-audio keys and
    values written per slice)."""

    block: object
    flags: AvFlags
    ax_norm3: Tensor
    audio_terms: tuple[Tensor, ...]  # scale, shift (audio-to-video), scale, shift (video-to-audio)
    video_terms: AdaRows  # the same four, on the video's rows
    audio_kv: KeysValues | None  # of the audio-to-video attention
    a2v_gate: AdaRows | None
    v2a_kv: KeysValues | None  # of the video-to-audio attention, filled per video slice

    @staticmethod
    def of(block, args: dict, vx: Tensor, ax: Tensor, flags: AvFlags) -> "AvCross | None":
        if not (flags.a2v or flags.v2a):
            return None
        b, tokens = vx.shape[0], vx.shape[1]
        ax_norm3 = comfy.ldm.common_dit.rms_norm(ax)
        audio = block.get_ada_values(block.scale_shift_table_a2v_ca_audio[:4, :], b,
                                     args["a_cross_scale_shift_timestep"])
        video = ada_rows(block.scale_shift_table_a2v_ca_video[:4, :], b, args["v_cross_scale_shift_timestep"],
                         slice(None), tokens)
        audio_kv = a2v_gate = v2a_kv = None
        if flags.a2v:
            audio_kv = context_keys_values(block.audio_to_video_attn, ax_norm3 * (1 + audio[0]) + audio[1],
                                           k_pe=args["a_cross_pe"])
            a2v_gate = ada_rows(block.scale_shift_table_a2v_ca_video[4:, :], b, args["v_cross_gate_timestep"],
                                slice(None), tokens)
        if flags.v2a:
            v2a_kv = empty_keys_values(block.video_to_audio_attn, tokens, vx)
        return AvCross(block, flags, ax_norm3, audio, video, audio_kv, a2v_gate, v2a_kv)

    def video_slice(self, xs: Tensor, start: int, end: int, pe, to: dict) -> None:
        """The audio-to-video attention of one video slice (in place), then its video-to-audio keys and values."""
        if self.flags.a2v:
            scaled = rms_adaln(xs, self.video_terms.take(0, start, end), self.video_terms.take(1, start, end))
            y = attend(self.block.audio_to_video_attn, scaled, self.audio_kv, to, pe, start, end)
            del scaled
            xs.addcmul_(y, self.a2v_gate.take(0, start, end))
        if self.flags.v2a:
            scaled = rms_adaln(xs, self.video_terms.take(2, start, end), self.video_terms.take(3, start, end))
            store_keys_values(self.block.video_to_audio_attn, self.v2a_kv, scaled, pe, start, end)

    def audio(self, ax: Tensor, args: dict, to: dict) -> None:
        """The video-to-audio attention (all audio queries over the video keys), in place into ax."""
        self.audio_kv = None
        if not self.flags.v2a:
            return
        scaled = self.ax_norm3 * (1 + self.audio_terms[2]) + self.audio_terms[3]
        y = attend(self.block.video_to_audio_attn, scaled, self.v2a_kv, to, args["a_cross_pe"])
        del scaled
        self.v2a_kv = None
        gate = self.block.get_ada_values(self.block.scale_shift_table_a2v_ca_audio[4:, :], ax.shape[0],
                                         args["a_cross_gate_timestep"])[0]
        ax.addcmul_(y, gate)


def video_feed_forward(block, xs: Tensor, stream: VideoStream, start: int, end: int) -> None:
    """BasicAVTransformerBlock's video feed-forward of one slice (rms_adaln, gated), in place."""
    scaled = rms_adaln(xs, stream.ada.take(SCALE_MLP, start, end), stream.ada.take(SHIFT_MLP, start, end))
    y = block.ff(scaled)
    del scaled
    xs.addcmul_(y, stream.ada.take(GATE_MLP, start, end))


def sliced_av_block(block, vx: Tensor, ax: Tensor, args: dict, to: dict, chunk: int) -> tuple[Tensor, Tensor]:
    """BasicAVTransformerBlock.forward((vx, ax), **args) with the video in slices of `chunk` tokens (args: the
    block hook's arguments); vx and ax are updated in place and returned. The audio stream runs whole, first (its
    self- and text attention read no video), then per video slice: self- and text attention, the
    audio-to-video attention, the slice's keys and values of the video-to-audio attention, the feed-forward;
    then the video-to-audio attention and the audio feed-forward."""
    flags = AvFlags.of(to, ax)
    if flags.audio:
        audio_self_and_text(block, ax, args["a_context"], args["a_timestep"], args["a_pe"],
                            args.get("a_prompt_timestep"), args["attention_mask"], to)
    stream = kv = None
    if flags.video:
        stream = video_stream(block, block.scale_shift_table, vx, args["v_timestep"], None, args["v_pe"],
                              args.get("self_attention_mask"), block.attn2, args["v_context"],
                              getattr(block, "prompt_scale_shift_table", None), args.get("v_prompt_timestep"),
                              args["attention_mask"])
        kv = video_self_keys(block.attn1, vx, stream, chunk, to)
    cross = AvCross.of(block, args, vx, ax, flags)
    for start, end in chunk_ranges(vx.shape[1], chunk):
        xs = vx[:, start:end]  # a view: the updates land in vx
        if flags.video:
            video_self_attention(block.attn1, xs, kv, stream, start, end, to)
            xs.add_(text_cross_attention(block, block.attn2, xs, stream, start, end, to,
                                         comfy.ldm.common_dit.rms_norm))
        if cross is not None:
            cross.video_slice(xs, start, end, args["v_cross_pe"], to)
        if flags.video:
            video_feed_forward(block, xs, stream, start, end)
    del kv
    if cross is not None:
        cross.audio(ax, args, to)
    if flags.audio:
        audio_feed_forward(block, ax, args["a_timestep"])
    return vx, ax
