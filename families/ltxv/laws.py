"""Memory of an LTX forward (comfy/ldm/lightricks/model.py LTXVModel, av_model.py LTXAVModel), run as ComfyUI runs
it or with the video tokens sliced (block.py).

The peak is read off the operator sequence (`_Live`: each step allocates its output and frees what it no longer
needs). Values are counted in elements, bytes at the end:
- around the blocks the forward keeps x, the RoPE rotation matrices ((B, T, H, d/2, 2, 2): twice x), the
  patchifier's int64 token coordinates, the projected text and the timestep embeddings; before the blocks it builds
  the rotation matrix (its float32 angles, cos, sin, -sin and the stacked matrix alive at once); after them the
  output head (RMS/LayerNorm, modulation, projection, unpatchify);
- a block's peak is at its self-attention: ComfyUI's block holds the modulated input, q, k and v and, under
  ComfyUI's sub-quadratic attention (its CPU default), their head-major copies and the scores of up to 4096 queries
  against all keys twice (scores and softmax); PyTorch SDPA (ComfyUI's CUDA default) holds no scores. The sliced
  block holds the key and value buffers (head-major: not copied again) and one slice's queries and scores.
LTX-2 adds the audio stream (whole, as the host runs it) and, under slicing, the video-to-audio keys and values.
tests/test_ltxv.py checks whole forwards against the live-tensor counter (core/memtrace.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


from ...core.budget import Plan
from ...core.plan_search import Fit, PlanSearch, automatic_slice, cheapest_fit
from ...core.slicing import SliceConfig, frame_slices, is_automatic, token_chunk_size
from ...host.attention import runs_pytorch_attention
from ..dit.laws import Live as _Live

SUB_QUADRATIC_QUERIES = 4096  # queries per score block of ComfyUI's sub-quadratic attention (with memory to spare)
COORD_BYTES = 3 * 2 * 8  # the patchifier's (B, 3, T, 2) int64 token coordinates, per token


@dataclass(frozen=True)
class AudioShape:
    dim: int  # Ca (audio heads x head dim; the audio<->video attentions are this wide too)
    heads: int


@dataclass(frozen=True)
class LtxShape:
    """An LTX diffusion model as its blocks see it."""

    dim: int  # C
    heads: int
    layers: int = 1
    in_channels: int = 128
    ada_params: int = 6  # 9 with cross_attention_adaln
    gated: bool = False  # LTX-2.3's per-head gates
    audio: AudioShape | None = None

    @property
    def ffn(self) -> int:
        return 4 * self.dim


@dataclass(frozen=True)
class LtxWork:
    """One diffusion-model call."""

    batch: int
    tokens: int  # video tokens: latent frames x height x width (patch size 1)
    text_tokens: int = 128
    dtype_bytes: int = 4
    audio_tokens: int = 0
    # a timestep per token (a denoise mask's): the blocks' modulation rows are the tokens (LTXV) or the latent
    # frames (LTX-2's CompressedTimestep); the planner plans a timestep per sample (modulation_rows 1)
    modulation_rows: int = 1
    timestep_per_token: bool = False

    @property
    def rows(self) -> int:
        return self.batch * self.tokens


@dataclass(frozen=True)
class Kernel:
    name: str
    query_chunk: int  # 0: never materialises scores


SUB_QUADRATIC = Kernel("sub-quadratic (ComfyUI's CPU default)", SUB_QUADRATIC_QUERIES)
SDPA = Kernel("PyTorch SDPA (ComfyUI's CUDA default)", 0)


def _attention(live: _Live, batch: int, heads: int, queries: int, keys: int, dim: int, kernel: Kernel,
               head_major: bool) -> None:
    """optimized_attention of batch x queries over `keys` tokens, dim wide: leaves its (B, queries, dim) output.
    head_major: keys and values handed (B, H, T, d) (skip_reshape), q a transposed view of (B, n, dim)."""
    out = batch * queries * dim
    if kernel.query_chunk == 0:  # SDPA: its output, then a copy back to (B, n, dim)
        live.alloc(out)
        live.transient(out)
        return
    # q (and k, v) into (B x H, n, d): views with one head or one sample, else copies
    copies = 0 if heads == 1 or batch == 1 else out + (0 if head_major else 2 * batch * keys * dim)
    live.alloc(copies)
    chunk = min(queries, kernel.query_chunk)
    scores = batch * heads * chunk * keys
    # scores, then their softmax; the scores freed, the chunk's output
    step = max(2 * scores, scores + out * chunk / queries)
    if queries <= chunk:
        live.transient(step)
    else:
        chunks = math.ceil(queries / chunk)
        live.transient(out * (chunks - 1) / chunks + step)
        live.transient(2 * out)  # torch.cat of the chunks
    live.alloc(out)  # back to (B, n, dim)
    live.free(copies)


def held_values(shape: LtxShape, work: LtxWork) -> float:
    """What the forward keeps alive around every block (elements of dtype_bytes; the coordinates converted)."""
    c, b = shape.dim, work.batch
    coords = work.tokens * b * COORD_BYTES / work.dtype_bytes
    text = b * work.text_tokens * c
    timestep = b * work.modulation_rows * (shape.ada_params + 1) * c + (2 * b * c if shape.ada_params == 9 else 0)
    held = 3 * work.rows * c + coords + text + timestep
    if shape.audio is not None:
        a, rows = shape.audio.dim, b * work.audio_tokens
        held += 3 * rows * a + b * work.text_tokens * a + b * (shape.ada_params + 1) * a
        held += 2 * work.rows * a  # the video's rotation matrix of the audio<->video attentions
        held += 3 * rows * a  # the audio's, and its timings
    return held


def rope_values(shape: LtxShape, work: LtxWork) -> float:
    """Peak while the forward builds the video rotation matrix, before the blocks: x, the coordinates, the
    float32 angles, cos, sin and -sin (half of x each) and the stacked matrix (twice x)."""
    c = shape.dim
    coords = work.tokens * work.batch * COORD_BYTES / work.dtype_bytes
    return work.rows * c + coords + 4 * work.rows * c / 2 + 2 * work.rows * c


SINUSOID = 256  # channels of the timestep's sinusoidal embedding (Timesteps(num_channels=256))


def _timestep_embedding(n: float, dim: int, coefficient: int) -> float:
    """Peak of AdaLayerNormSingle on n timesteps, past what it leaves (coefficient x dim and the embedding, dim,
    per timestep): the sinusoid's angles, sin, cos and their concatenation; the MLP; silu + linear."""
    return max(2.5 * SINUSOID * n, SINUSOID * n + 2 * dim * n, (coefficient + 2) * dim * n)


def timestep_values(shape: LtxShape, work: LtxWork) -> float:
    """Peak while _prepare_timestep embeds a timestep per token (a denoise mask's), before the blocks: x, the
    coordinates and, LTXV, the embedding of every token's timestep; LTX-2 embeds the video's per frame, but its
    audio<->video scale/shift and gate timesteps per token (kept whole until the call's timesteps are made, and
    the last embedding, discarded into `_`, with them)."""
    if not work.timestep_per_token:
        return 0.0
    c, n = shape.dim, work.rows
    base = work.rows * c + work.tokens * work.batch * COORD_BYTES / work.dtype_bytes
    if shape.audio is None:
        return base + _timestep_embedding(n, c, shape.ada_params)
    base += work.batch * work.audio_tokens * shape.audio.dim
    scale_shift = base + _timestep_embedding(n, c, 4)
    gate = base + 5 * c * n + _timestep_embedding(n, c, 1)
    return max(scale_shift, gate)


def head_values(shape: LtxShape, work: LtxWork) -> float:
    """Peak of _process_output besides what stays held: the timestep's scale and shift on its rows (LTX-2 expands
    its per-frame rows to the tokens first), LayerNorm, modulation, projection, unpatchify."""
    r, c = work.rows, shape.dim
    rows = work.batch * (work.tokens if work.timestep_per_token else 1) * c  # of scale, of shift
    out = r * shape.in_channels
    live = _Live()
    live.alloc(r * c if shape.audio is not None and work.timestep_per_token else 0)  # CompressedTimestep.expand()
    live.alloc(2 * rows)  # scale_shift_values
    live.alloc(r * c)  # norm_out
    live.alloc(rows)  # 1 + scale
    live.alloc(r * c)  # x * (1 + scale)
    live.free(rows)
    live.alloc(r * c)  # + shift
    live.free(2 * r * c)
    live.alloc(out)  # proj_out
    live.free(r * c)
    live.alloc(out)  # unpatchify
    return live.peak


def _rms_adaln(live: _Live, rows: float, c: int) -> None:
    """ck.rms_adaln (eager): rms_norm, * (1 + scale), + shift; leaves one rows x c."""
    live.alloc(rows * c)
    live.transient(2 * rows * c)
    live.alloc(rows * c)
    live.free(rows * c)


def _projected(live: _Live, rows: float, c: int) -> None:
    """Linear + RMSNorm (weighted: one more while it runs): leaves one rows x c."""
    live.alloc(rows * c)
    live.transient(2 * rows * c)
    live.alloc(rows * c)
    live.free(rows * c)


def block_peak_values(shape: LtxShape, work: LtxWork, chunk: int | None, kernel: Kernel) -> float:
    """Peak values a video block holds besides what the forward holds (its self-attention; the rest of the
    block holds less): ComfyUI's block (chunk None) or the sliced one."""
    b, t, c = work.batch, work.tokens, shape.dim
    live = _Live()
    sliced = chunk is not None and chunk < t
    n = min(chunk, t) if sliced else t
    rows = b * n
    live.alloc(6 * b * work.modulation_rows * c)  # the six modulation terms, on the timestep's rows
    if sliced:
        live.alloc(2 * work.rows * c)  # key and value buffers
        live.alloc(2 * b * work.text_tokens * c)  # text keys and values
        if shape.audio is not None:
            live.alloc(2 * b * work.audio_tokens * shape.audio.dim + 2 * work.rows * shape.audio.dim)
    _rms_adaln(live, rows, c)
    _projected(live, rows, c)  # q
    live.alloc(rows * c)  # RoPE
    live.free(rows * c)
    if not sliced:
        _projected(live, rows, c)  # k
        live.alloc(rows * c)  # RoPE
        live.free(rows * c)
        live.alloc(rows * c)  # v
    _attention(live, b, shape.heads, n, t, c, kernel, head_major=sliced)
    return live.peak


def forward_peak_bytes(shape: LtxShape, work: LtxWork, chunk: int | None, kernel: Kernel = SUB_QUADRATIC) -> float:
    """Peak activation bytes of one diffusion-model call (its inputs not counted)."""
    held = held_values(shape, work)
    return max(held + block_peak_values(shape, work, chunk, kernel), rope_values(shape, work),
               timestep_values(shape, work), held + head_values(shape, work)) * work.dtype_bytes


def token_slices(work: LtxWork) -> range:
    """Tokens per slice from coarse (all of them: ComfyUI's block) to fine (one): the laws' peak shrinks along it."""
    return range(work.tokens, 0, -1)


def plan_tokens(shape: LtxShape, work: LtxWork, search: PlanSearch, kernel: Kernel = SUB_QUADRATIC) -> Fit[int]:
    """The largest token slice whose predicted forward peak fits `search` (core/plan_search.py, by bisection;
    BudgetError when not even one token per slice does)."""
    return cheapest_fit(token_slices(work), lambda n: forward_peak_bytes(shape, work, n, kernel), search)


def automatic_token_chunk(shape: LtxShape, work: LtxWork, tokens_per_frame: int, kernel: Kernel = SUB_QUADRATIC) -> int:
    """The slice of a config left automatic: the most latent frames per slice whose predicted peak is close to
    that of one frame per slice (core/plan_search.py automatic_slice)."""
    slices = frame_slices(work.tokens, tokens_per_frame)
    return automatic_slice(slices, lambda n: forward_peak_bytes(shape, work, n, kernel)).candidate


def ltx_token_chunk(config: SliceConfig, shape: LtxShape, work: LtxWork, tokens_per_frame: int, kernel: Kernel) -> int:
    """Tokens per slice of one call: the config's (core/slicing.py token_chunk_size), or, left automatic,
    the laws' choice (automatic_token_chunk)."""
    if is_automatic(config):
        return automatic_token_chunk(shape, work, tokens_per_frame, kernel)
    return token_chunk_size(config, work.batch, work.tokens, tokens_per_frame, shape.dim)


# -- LTX's side: its shape and a call's work as these laws read them -------------------------------------------

LTX_TEXT_TOKENS = 128  # Gemma / T5 tokens of a prompt after the text connectors (ComfyUI's LTX default)
AUDIO_LATENTS_PER_VIDEO_LATENT = 8  # 25 audio latents a second; a latent frame is 8 video frames at 25 fps


def ltx_shape(diffusion_model) -> LtxShape:
    audio = None
    if hasattr(diffusion_model, "audio_inner_dim"):
        audio = AudioShape(diffusion_model.audio_inner_dim, diffusion_model.audio_num_attention_heads)
    return LtxShape(diffusion_model.inner_dim, diffusion_model.num_attention_heads,
                    len(diffusion_model.transformer_blocks), diffusion_model.in_channels,
                    9 if diffusion_model.cross_attention_adaln else 6,
                    bool(getattr(diffusion_model, "apply_gated_attention", False)), audio)


def ltx_tokens(latent_shape) -> tuple[int, int]:
    """(tokens, tokens per latent frame) of a (batch, channels, frames, height, width) video latent."""
    per_frame = latent_shape[-2] * latent_shape[-1]
    return latent_shape[-3] * per_frame, per_frame


def ltx_work(diffusion_model, latent_shape, dtype_bytes: int, text_tokens: int = LTX_TEXT_TOKENS,
             audio_tokens: int | None = None) -> LtxWork:
    """audio_tokens: LTX-2's audio latents (None: AUDIO_LATENTS_PER_VIDEO_LATENT per latent frame)."""
    tokens, _ = ltx_tokens(latent_shape)
    audio = 0
    if hasattr(diffusion_model, "audio_inner_dim"):
        audio = audio_tokens if audio_tokens is not None else AUDIO_LATENTS_PER_VIDEO_LATENT * latent_shape[-3]
    return LtxWork(latent_shape[0], tokens, text_tokens, dtype_bytes, audio)


def video_latent_shape(base_model, input_shape) -> tuple[int, ...]:
    """The video latent's shape of a call of `input_shape`: LTX-2's sampler packs video and audio into one
    (B, 1, n) latent, its shapes in base_model.latent_shapes."""
    shapes = getattr(base_model, "latent_shapes", None)
    if len(input_shape) == 3 and shapes:
        return (input_shape[0], *tuple(shapes[0])[1:])
    return tuple(input_shape)


def ltx_rehash_split_bytes(diffusion_model, latent_shape, dtype_bytes: int) -> int:
    """What Step Rehash's split adds to a call besides its caches: the deep blocks' input kept from the first deep
    block to the last (rehash.py; LTX-2: both streams)."""
    shape, work = ltx_shape(diffusion_model), ltx_work(diffusion_model, latent_shape, dtype_bytes)
    audio = work.batch * work.audio_tokens * shape.audio.dim if shape.audio is not None else 0
    return int((work.rows * shape.dim + audio) * dtype_bytes)


def ltx_kernel() -> Kernel:
    return SDPA if runs_pytorch_attention() else SUB_QUADRATIC


def plan_ltx(diffusion_model, latent_shape, dtype_bytes: int, budget: int, context_tokens: int | None = None) -> Plan:
    """The coarsest token slicing predicted to fit `budget` for one call. Raises BudgetError."""
    shape, kernel = ltx_shape(diffusion_model), ltx_kernel()
    work = ltx_work(diffusion_model, latent_shape, dtype_bytes, context_tokens or LTX_TEXT_TOKENS)
    fit = plan_tokens(shape, work, PlanSearch(budget, f"an LTX call of {work.batch} x {work.tokens} tokens"), kernel)
    return Plan(SliceConfig(token_chunk=fit.candidate), int(fit.peak_bytes),
                int(forward_peak_bytes(shape, work, None, kernel)))


def ltx_peaks(diffusion_model, latent_shape, dtype_bytes: int, config: SliceConfig,
              context_tokens: int | None = None) -> tuple[int, int]:
    """(sliced with `config`, ComfyUI's forward) predicted peak bytes of one call of a video latent."""
    shape, kernel = ltx_shape(diffusion_model), ltx_kernel()
    work = ltx_work(diffusion_model, tuple(latent_shape), dtype_bytes, context_tokens or LTX_TEXT_TOKENS)
    _, per_frame = ltx_tokens(tuple(latent_shape))
    chunk = ltx_token_chunk(config, shape, work, per_frame, kernel)
    return int(forward_peak_bytes(shape, work, chunk, kernel)), int(forward_peak_bytes(shape, work, None, kernel))


def preview_latent(diffusion_model, width: int, height: int, frames: int) -> tuple[int, ...]:
    """The video latent of one sampling call with cond and uncond batched (LTX's VAE: 32x spatial, 8x temporal)."""
    return (2, diffusion_model.in_channels, 1 + (frames - 1) // 8, height // 32, width // 32)
