"""Memory of a MiniMax H3 call (comfy/ldm/minimax/model.py MiniMaxH3Model._forward), run as ComfyUI runs it
or with its blocks sliced over the packed tokens (block.py), for Memory Budget.

Read off the operator sequences (values, batch 1, S packed rows of C channels, inner width I = heads x d,
MLP width F, M distinct timesteps):
- before the blocks, _forward keeps the padded video latent and its patch rows (V x 96 values each, V video
  tokens), the embeddings of every row but the text's (keyframe and reference rows too), h (S x C), the time embedding, the layout's position
  tensors when it builds the layout itself (8.25 S) and the RoPE rotation table (12 r S, r inverse
  frequencies per axis); building that table is the largest transient there (cos, sin, -sin, the angle
  table: 15 r S more);
- ComfyUI's block: the six modulation terms (18 M C), norm1 (S C), the fused QKV (3 S I), a copy of v (S I),
  the attention (below), out-projection; then norm2, SwiGLU's fc1 (2 S F) and activation (S F), fc2 (S C);
- the sliced block: q, k, v buffers (3 S I) and one slice's intermediates (n rows), the attention of n
  queries over S keys;
- after the blocks, the final layer's modulated rows per stream and the unpatched, negated outputs;
- attention: ComfyUI's sub-quadratic kernel (its CPU default) holds scores and their softmax (2 H q S for q
  queries, in chunks of 4096 queries), then its output and the copy back to (q, I); PyTorch SDPA (its CUDA
  default) holds no scores, only its output (whose reshape back is a view).
Not counted: the latent copies of keyframe and reference rows (about 3 x 96 values per such row, against the C
values of its embedding: under 6% of those rows' share at H3's C = 5376). Nothing is fitted: tests/test_minimax.py
checks whole text-to-audio-video forwards against the live-tensor meter (core/memtrace.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...core.budget import Plan
from ...core.plan_search import BudgetError, Fit, PlanSearch, automatic_slice, cheapest_fit, format_bytes
from ...core.slicing import SliceConfig, frame_slices, is_automatic, token_chunk_size

QUERY_CHUNK = 4096  # the sub-quadratic kernel's queries per score block (with the memory a CPU has)
TEXT_TOKENS = 512  # text rows assumed where a call's are not known (ComfyUI's memory estimate)
LATENT_VALUES = 96  # one video token's latent values (24 channels x the 1x2x2 patch)


@dataclass(frozen=True)
class H3Shape:
    """A MiniMaxH3Model as its blocks see it."""

    hidden: int  # C
    heads: int
    head_dim: int
    ffn: int  # F (SwiGLU: fc1 is 2F wide)
    rope_len: int  # r: inverse frequencies per axis
    time_dim: int
    blocks: int

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class H3Work:
    """One call: S packed rows, of which V video tokens and A audio rows."""

    tokens: int  # S
    video_tokens: int  # V
    audio_rows: int  # A
    dtype_bytes: int = 4
    timesteps: int = 2  # M: distinct timesteps (video and text; audio)
    builds_layout: bool = True  # _forward builds the packed layout (no matching one in the call's payload)
    text_tokens: int | None = None  # L (None: S - V - A, no keyframe or reference rows)

    @property
    def embedded_rows(self) -> int:
        """The rows _forward embeds from latents (target video and audio, keyframe and reference rows)."""
        text = self.tokens - self.video_tokens - self.audio_rows if self.text_tokens is None else self.text_tokens
        return self.tokens - text


def h3_shape(model) -> H3Shape:
    block = model.blocks[0]
    return H3Shape(model.hidden_size, block.attn.heads, block.attn.head_dim, block.mlp.fc2.in_features,
                   model.rope.inv_freq.shape[0], block.adaln_proj.linear.in_features, len(model.blocks))


def _attention(queries: int, keys: int, shape: H3Shape, scores: bool) -> float:
    """What optimized_attention of `queries` over `keys` holds at its peak besides q, k, v, counting its (q, I)
    output (which stays alive until the out-projection)."""
    out = queries * shape.inner
    if not scores:  # SDPA: its output, laid out (q, heads, d) already (the reshape back is a view)
        return out
    back = out if shape.heads > 1 else 0  # the copy back to (q, I)
    chunk = min(queries, QUERY_CHUNK)
    block = shape.heads * chunk * keys
    if queries <= chunk:
        return max(2 * block, block + out, out + back)
    chunks = math.ceil(queries / chunk)
    earlier = out * (chunks - 1) / chunks
    return max(earlier + 2 * block, 2 * out + back)  # this chunk's scores; torch.cat of the chunks


def block_values(shape: H3Shape, work: H3Work, token_chunk: int | None, scores: bool) -> float:
    """Peak values one block holds besides its input h: ComfyUI's block (token_chunk None) or the sliced one."""
    c, i, f, s = shape.hidden, shape.inner, shape.ffn, work.tokens
    terms = 18 * work.timesteps * c
    if token_chunk is None or token_chunk >= s:
        attention = terms + s * c + 4 * s * i + _attention(s, s, shape, scores)  # norm1, qkv, v copy
        out_proj = terms + s * c + s * i + s * c
        mlp = terms + s * c + 3 * s * f + s * c
        return max(attention, out_proj, mlp)
    n = token_chunk
    buffers = terms + 3 * s * i
    qkv = buffers + n * c + 3 * n * i
    attention = buffers + max(_attention(n, s, shape, scores), n * i + n * c)  # then the out-projection
    mlp = buffers + n * c + 3 * n * f + n * c
    return max(qkv, attention, mlp)


def held_values(shape: H3Shape, work: H3Work) -> float:
    """Values _forward keeps alive while the blocks run (besides the caller's inputs)."""
    v, s, c, r = work.video_tokens, work.tokens, shape.hidden, shape.rope_len
    layout = 8.25 * s if work.builds_layout else 0.0
    return 2 * v * LATENT_VALUES + (work.embedded_rows + s) * c + work.timesteps * shape.time_dim + layout + 12 * r * s


def head_values(shape: H3Shape, work: H3Work) -> float:
    """What the final layer and the unpacking add after the blocks: a stream's modulated rows (norm, then the
    product and the sum: two of them at once), its output rows, and at the end the video rows, their unpatched
    copy and its negation (and the audio's rows and negation)."""
    v, a, c = work.video_tokens, work.audio_rows, shape.hidden
    out_v, out_a = v * LATENT_VALUES, a * 32
    return max(2 * v * c, v * c + out_v, out_v + 2 * a * c, 3 * out_v + 2 * out_a)


def forward_peak_bytes(shape: H3Shape, work: H3Work, token_chunk: int | None, scores: bool) -> int:
    """Peak activation bytes of one call (ComfyUI's blocks with token_chunk None, else sliced)."""
    held = held_values(shape, work)
    rope_build = 15 * shape.rope_len * work.tokens
    phases = (rope_build, block_values(shape, work, token_chunk, scores), head_values(shape, work))
    return int((held + max(phases)) * work.dtype_bytes)


def kernel_has_scores() -> bool:
    """Whether ComfyUI's attention in this process materialises scores (its sub-quadratic kernel)."""
    from ...host.attention import attention_laws

    return attention_laws().scores > 0




def minimax_peaks(model, packed, config: SliceConfig) -> tuple[int, int]:
    """(sliced with `config`, ComfyUI's forward) predicted peak bytes of one call (packed: adapter.packed_input)."""
    shape, work = h3_shape(model), packed_work(packed)
    chunk = token_chunk_for(model, config, packed)
    scores = kernel_has_scores()
    return forward_peak_bytes(shape, work, chunk, scores), forward_peak_bytes(shape, work, None, scores)


def packed_work(packed) -> H3Work:
    """The H3Work of a packed call input (adapter.packed_input carries its video tokens, audio rows, text tokens
    and whether _forward builds the layout; without them: every row a video token)."""
    tokens = packed.shape[1]
    return H3Work(tokens, getattr(packed, "video_tokens", tokens), getattr(packed, "audio_rows", 0),
                  packed.element_size(), builds_layout=getattr(packed, "builds_layout", True),
                  text_tokens=getattr(packed, "text_tokens", None))


def token_chunk_for(model, config: SliceConfig, packed) -> int:
    """Tokens per slice of a packed (1, S, C) call (adapter.packed_input) with `config`: frame_chunk counts latent
    frames of video tokens, as the block replacements count them; left automatic, the laws' choice
    (automatic_token_chunk)."""
    per_frame = getattr(packed, "tokens_per_frame", packed.shape[1])
    if is_automatic(config):
        return automatic_token_chunk(h3_shape(model), packed_work(packed), per_frame, kernel_has_scores())
    return token_chunk_size(config, batch=1, tokens=packed.shape[1], tokens_per_frame=per_frame,
                            dim=packed.shape[2])


def token_slices(work: H3Work) -> range:
    """Tokens per slice from coarse (all of them: ComfyUI's block) to fine (one): the laws' peak shrinks along it."""
    return range(work.tokens, 0, -1)


def plan_tokens(shape: H3Shape, work: H3Work, search: PlanSearch, scores: bool) -> Fit[int]:
    """The largest token slice whose predicted forward peak fits `search` (core/plan_search.py, by bisection;
    BudgetError when not even one token per slice does)."""
    return cheapest_fit(token_slices(work), lambda n: forward_peak_bytes(shape, work, n, scores), search)


def automatic_token_chunk(shape: H3Shape, work: H3Work, tokens_per_frame: int, scores: bool) -> int:
    """The slice of a config left automatic: the most latent frames per slice whose predicted peak is close to
    that of one frame per slice (core/plan_search.py automatic_slice)."""
    slices = frame_slices(work.tokens, tokens_per_frame)
    return automatic_slice(slices, lambda n: forward_peak_bytes(shape, work, n, scores)).candidate


def _search(budget: int, work: H3Work) -> PlanSearch:
    return PlanSearch(budget, f"a MiniMax H3 call of {work.tokens} packed tokens")


def plan_minimax(model, packed, budget: int) -> Plan:
    """The coarsest token slicing predicted to fit `budget` for one call. Raises BudgetError."""
    shape, work, scores = h3_shape(model), packed_work(packed), kernel_has_scores()
    fit = plan_tokens(shape, work, _search(budget, work), scores)
    return Plan(SliceConfig(token_chunk=fit.candidate), int(fit.peak_bytes), forward_peak_bytes(shape, work, None, scores))


def latent_work(model, video_shape, audio_t: int, dtype_bytes: int, text_tokens: int = TEXT_TOKENS) -> H3Work:
    """The work of a t2va call on a video latent (1, 24, T, H, W) and audio_t audio frames."""
    _, _, t, h, w = video_shape
    per_frame = -(-h // model.patch_size[1]) * -(-w // model.patch_size[2])
    video, audio = t * per_frame, 2 * audio_t
    return H3Work(text_tokens + audio + video, video, audio, dtype_bytes, builds_layout=False,
                  text_tokens=text_tokens)


def estimate_minimax(base_model, input_shape, dtype_bytes: int, config: SliceConfig, planned_budget) -> int:
    """ComfyUI's memory estimate under the patch: from the sampling run's latent shapes (video, audio) when the
    model has them, else from the packed latent's size (every 32 values a row: an upper bound); per sequence of
    the batch ComfyUI asks about (H3 runs one at a time: an upper bound for a batch)."""
    model = base_model.diffusion_model
    shapes = getattr(base_model, "latent_shapes", None)
    if shapes is not None and len(shapes) >= 2:
        work = latent_work(model, shapes[0], shapes[1][-1], dtype_bytes)
        per_frame = work.video_tokens // max(1, shapes[0][2])
    else:
        rows = math.prod(input_shape[1:]) // 32
        work = H3Work(TEXT_TOKENS + rows, rows, 0, dtype_bytes, builds_layout=False, text_tokens=TEXT_TOKENS)
        per_frame = rows
    shape, scores = h3_shape(model), kernel_has_scores()
    if planned_budget is not None:
        try:
            chunk = plan_tokens(shape, work, _search(planned_budget(), work), scores).candidate
        except BudgetError:
            chunk = 1
    else:
        chunk = (automatic_token_chunk(shape, work, per_frame, scores) if is_automatic(config) else
                 token_chunk_size(config, batch=1, tokens=work.tokens, tokens_per_frame=per_frame, dim=shape.hidden))
    return forward_peak_bytes(shape, work, chunk, scores) * max(1, input_shape[0])


def temporal_shape(frames: int) -> tuple[int, int]:
    """(video latent frames, audio latent frames) of a clip of `frames` frames as EmptyMiniMaxH3LatentAV makes it
    (comfy_extras/nodes_minimax_h3.py): frames snapped up to the 17k + 5 grid, 24 fps, 40 audio frames a second."""
    frames = max(5, frames)
    frames += (5 - frames) % 17
    video_t = 2 if frames <= 5 else (frames - 5) // 17 * 5 + 2
    return video_t, round(frames / 24 * 40)


def preview_minimax(model, planned: int, budget_text: str, width: int, height: int, frames: int,
                    dtype_bytes: int) -> str:
    """The Memory Budget node's text for a width x height x frames clip (t2va, TEXT_TOKENS text rows)."""
    t, audio_t = temporal_shape(frames)
    video = (1, 24, t, max(height // 16, 1), max(width // 16, 1))
    shape, work, scores = h3_shape(model), latent_work(model, video, audio_t, dtype_bytes), kernel_has_scores()
    whole = forward_peak_bytes(shape, work, None, scores)
    head = f"budget {budget_text}, {width}x{height}x{frames} (MiniMax, {work.tokens} packed tokens)"
    try:
        fit = plan_tokens(shape, work, _search(planned, work), scores)
    except BudgetError:
        return f"{head}: even one token per slice does not fit (predicted {format_bytes(whole)} unsliced)"
    return (f"{head}: token_chunk {fit.candidate}: predicted peak activation "
            f"{format_bytes(fit.peak_bytes)} (unpatched {format_bytes(whole)})")
