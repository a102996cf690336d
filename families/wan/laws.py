"""Memory of a Wan DiT forward (comfy/ldm/wan/model.py), run as ComfyUI runs it or with token slices.

A Wan attention block's working set is read off its operator sequence: each step allocates its output
and frees what it no longer needs, and the peak is the largest sum alive (`_Live`). The steps are the
host's (WanAttentionBlock.forward) or the sliced forward's (families/wan/block.py); per-token tensors are
counted in values per token row (batch x tokens), the attention kernel's own buffers by its law:
- ComfyUI's sub-quadratic attention (its CPU default) materialises the scores of up to 4096 queries
  at a time against all keys, twice (scores and softmax), and with several heads and samples copies
  queries, keys and values into head-major order (keys and values not when handed that layout:
  skip_reshape);
- PyTorch SDPA (ComfyUI's CUDA default) holds no scores: its output, and a copy back to (B, L, C) with
  several heads.
RMSNorm runs as PyTorch's composite on the CPU (x^2, then x * rsqrt, then * weight: one extra tensor).

Around the blocks the forward keeps x, the RoPE frequencies, the embedded context and the time
modulation; before them it builds the frequencies (the largest transient at small widths). Nothing here
is fitted to whole forwards: tests/test_wan_exact.py checks whole forwards against the live-tensor
counter (core/memtrace.py).

Then Wan's side of it: its shape and a call's work as these laws read them, and the plan / peaks of one call.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...core.budget import Plan
from ...core.plan_search import Fit, PlanSearch, automatic_slice, cheapest_fit
from ...core.slicing import SliceConfig, frame_slices, is_automatic, token_chunk_size
from ..dit.laws import SDPA, SUB_QUADRATIC, AttentionKernel, Live as _Live, attention, attention_kernel  # noqa: F401 (SDPA: the tests' name)
from ..dit.laws import layer_norm as _layer_norm, rms_norm as _rms_norm


@dataclass(frozen=True)
class WanShape:
    """A Wan diffusion model as its blocks see it."""

    dim: int  # C
    ffn_dim: int  # F
    heads: int
    layers: int = 1
    in_dim: int = 16  # latent channels in (i2v: 36 with the mask and image latent; Wan 2.2 5B: 48)
    out_dim: int = 16  # latent channels out (head: out_dim x patch values per token)
    patch_values: int = 4  # 1 x 2 x 2 patch
    i2v: bool = False  # WanI2VCrossAttention: CLIP-image tokens attended apart

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class WanWork:
    """One diffusion-model call."""

    batch: int  # B (cond/uncond batched: 2 per prompt)
    tokens: int  # L: latent frames x (H / 2) x (W / 2)
    text_tokens: int = 512  # context tokens after the text embedding
    image_tokens: int = 0  # CLIP-image tokens at the front of the context (i2v: 257)
    modulation_rows: int = 1  # E: 1, or one row per latent frame (Wan 2.2 5B with a denoise mask)
    dtype_bytes: int = 4
    # the host's block makes its (transposed, non-contiguous) first input contiguous while forward_orig still
    # holds it (ComfyUI 0.33): one more (rows, dim) in ComfyUI's forward during the first block. The sliced
    # block copies at its end, when its keys and values (two (rows, dim)) are freed: below its peak
    input_copy: bool = False

    @property
    def rows(self) -> int:
        return self.batch * self.tokens

    @property
    def context_tokens(self) -> int:
        return self.text_tokens + self.image_tokens


def _modulated(live: _Live, rows: float, dim: int, per_token: bool) -> None:
    """addcmul(shift, norm(x), 1 + scale): leaves the modulated input (rows x dim) alive."""
    terms = 3 * rows * dim if per_token else 0.0  # shift, scale, 1 + scale, one value per token
    live.alloc(terms)
    _layer_norm(live, rows, dim)
    live.alloc(rows * dim)
    live.free(terms + rows * dim)


def _projected(live: _Live, rows: float, dim: int, kernel: AttentionKernel, rope: bool) -> None:
    """Linear, RMSNorm and (self-attention) RoPE: leaves one rows x dim tensor alive."""
    live.alloc(rows * dim)
    _rms_norm(live, rows, dim, kernel)
    live.free(rows * dim)
    if rope:
        live.alloc(rows * dim)
        live.free(rows * dim)


def _attention(live: _Live, batch: int, queries: int, keys: int, shape: WanShape, kernel: AttentionKernel,
               head_major: bool) -> None:
    """families/dit/laws.py attention at the Wan shape's width and heads."""
    attention(live, batch, queries, keys, shape.dim, shape.heads, kernel, head_major)


def _cross_context(live: _Live, shape: WanShape, work: WanWork, kernel: AttentionKernel) -> float:
    """Keys and values of the context (text, and image apart for i2v); returns what stays alive."""
    held = 0.0
    for tokens in ((work.text_tokens, work.image_tokens) if shape.i2v else (work.context_tokens,)):
        _projected(live, work.batch * tokens, shape.dim, kernel, rope=False)
        live.alloc(work.batch * tokens * shape.dim)
        held += 2 * work.batch * tokens * shape.dim
    return held


def _cross_attention(live: _Live, batch: int, queries: int, shape: WanShape, work: WanWork,
                     kernel: AttentionKernel) -> None:
    """Cross-attention of batch x queries tokens (context keys and values alive): leaves its output."""
    rows, c = batch * queries, shape.dim
    _projected(live, rows, c, kernel, rope=False)  # q
    if shape.i2v:
        _attention(live, batch, queries, work.image_tokens, shape, kernel, head_major=False)
        _attention(live, batch, queries, work.text_tokens, shape, kernel, head_major=False)
        live.alloc(rows * c)  # x + img_x
        live.free(2 * rows * c)
    else:
        _attention(live, batch, queries, work.context_tokens, shape, kernel, head_major=False)
    live.alloc(rows * c)  # o
    live.free(2 * rows * c)  # q, attention output


def _feed_forward(live: _Live, rows: float, shape: WanShape, per_token: bool) -> None:
    """norm2 + modulation + FFN: leaves its output (rows x C) alive."""
    c, f = shape.dim, shape.ffn_dim
    _modulated(live, rows, c, per_token)
    live.alloc(rows * f)  # Linear
    live.alloc(rows * f)  # GELU
    live.free(rows * f)
    live.alloc(rows * c)  # Linear
    live.free(rows * f + rows * c)  # GELU output, modulated input


def block_peak_values(shape: WanShape, work: WanWork, token_chunk: int | None, kernel: AttentionKernel) -> float:
    """Peak values one block holds besides its input x: ComfyUI's block (token_chunk None) or the sliced one."""
    b, c, rows = work.batch, shape.dim, work.rows
    per_token = work.modulation_rows > 1
    live = _Live()
    live.alloc(6 * b * work.modulation_rows * c)  # the six modulation terms
    if token_chunk is None or token_chunk >= work.tokens:
        _modulated(live, rows, c, per_token)
        for _ in range(2):  # q, k
            _projected(live, rows, c, kernel, rope=True)
        live.alloc(rows * c)  # v
        _attention(live, b, work.tokens, work.tokens, shape, kernel, head_major=False)
        live.free(rows * c)  # v
        live.alloc(rows * c)  # o
        live.free(4 * rows * c)  # attention output, q, k, modulated input
        live.transient(rows * c if per_token else 0)  # repeat_e's gate
        live.alloc(rows * c)  # x + gate * y (the block input stays the caller's)
        live.free(rows * c)  # y
        _layer_norm(live, rows, c)  # norm3
        context = _cross_context(live, shape, work, kernel)
        _cross_attention(live, b, work.tokens, shape, work, kernel)
        live.free(context + rows * c)  # context keys / values, norm3 output
        live.alloc(rows * c)  # x + cross
        live.free(2 * rows * c)  # cross output, the previous x
        _feed_forward(live, rows, shape, per_token)
        live.transient(rows * c if per_token else 0)
        live.alloc(rows * c)  # x + gate * y
        return live.peak
    n = min(token_chunk, work.tokens)
    slice_rows = b * n
    live.alloc(2 * rows * c)  # key and value buffers
    _modulated(live, slice_rows, c, per_token)  # group 1
    _projected(live, slice_rows, c, kernel, rope=True)
    live.free(slice_rows * c)
    live.alloc(slice_rows * c)  # v
    live.free(2 * slice_rows * c)
    _cross_context(live, shape, work, kernel)
    _modulated(live, slice_rows, c, per_token)  # group 2
    live.alloc(slice_rows * c)  # q projection
    live.free(slice_rows * c)  # modulated input
    _rms_norm(live, slice_rows, c, kernel)
    live.free(slice_rows * c)
    live.alloc(slice_rows * c)  # RoPE
    live.free(slice_rows * c)
    _attention(live, b, n, work.tokens, shape, kernel, head_major=True)
    live.alloc(slice_rows * c)  # o
    live.free(2 * slice_rows * c)
    live.transient(slice_rows * c if per_token else 0)  # the gate's rows
    live.free(slice_rows * c)  # y, added into x in place
    _layer_norm(live, slice_rows, c)  # norm3
    _cross_attention(live, b, n, shape, work, kernel)
    live.free(2 * slice_rows * c)
    _feed_forward(live, slice_rows, shape, per_token)
    live.transient(slice_rows * c if per_token else 0)
    return live.peak


def held_values(shape: WanShape, work: WanWork) -> float:
    """What the forward keeps alive around every block: x, the RoPE frequencies (1, L, 1, d/2, 2, 2),
    the embedded context (i2v: the CLIP-image part apart too), the time modulation, and the latent
    input as pad_to_patch_size copied it (F.pad copies even when nothing is padded)."""
    context = work.batch * work.context_tokens * shape.dim + (work.batch * work.image_tokens * shape.dim)
    modulation = 7 * work.batch * work.modulation_rows * shape.dim
    latent = work.batch * shape.in_dim * work.tokens * shape.patch_values
    return work.rows * shape.dim + 2 * work.tokens * shape.head_dim + context + modulation + latent


def rope_values(shape: WanShape, work: WanWork) -> float:
    """Peak while _forward's rope_encode builds the frequencies, before the blocks: the finished axes
    and their concatenation (4 L d), with the padded latent alive."""
    latent = work.batch * shape.in_dim * work.tokens * shape.patch_values
    return 4 * work.tokens * shape.head_dim + 3 * work.tokens + latent


def forward_peak_bytes(shape: WanShape, work: WanWork, token_chunk: int | None,
                       kernel: AttentionKernel = SUB_QUADRATIC) -> float:
    """Peak activation bytes of one diffusion-model call (its inputs not counted); a slice of all tokens (or
    None) is ComfyUI's block, as the block hook runs it."""
    held = held_values(shape, work)
    blocks = held + block_peak_values(shape, work, token_chunk, kernel)
    if (token_chunk is None or token_chunk >= work.tokens) and work.input_copy:  # the host's block runs
        blocks += work.rows * shape.dim
    return max(blocks, held + head_values(shape, work), rope_values(shape, work)) * work.dtype_bytes


def head_values(shape: WanShape, work: WanWork) -> float:
    """Peak of the Head (norm, modulation, Linear to out_dim x patch values) and unpatchify, besides
    what the blocks' phase holds. Per-token modulation materialises repeat_e's shift and 1 + scale."""
    live, rc = _Live(), work.rows * shape.dim
    out = work.rows * shape.out_dim * shape.patch_values
    per_token = work.modulation_rows > 1
    live.alloc(2 * rc if per_token else 0)  # repeat_e(shift), 1 + repeat_e(scale)
    live.transient(rc if per_token else 0)  # repeat_e(scale) before the + 1
    _layer_norm(live, work.rows, shape.dim)
    live.alloc(rc)  # addcmul
    live.free(rc + (2 * rc if per_token else 0))
    live.alloc(out)  # Linear
    live.free(2 * rc)  # its input; the blocks' x
    live.alloc(out)  # unpatchify's einsum
    return live.peak


def token_slices(work: WanWork) -> range:
    """Tokens per slice from coarse (all of them: ComfyUI's block) to fine (one): the laws' peak shrinks along it."""
    return range(work.tokens, 0, -1)


def plan_tokens(shape: WanShape, work: WanWork, search: PlanSearch, kernel: AttentionKernel = SUB_QUADRATIC) -> Fit[int]:
    """The largest token slice whose predicted forward peak fits `search` (core/plan_search.py, by bisection;
    BudgetError when not even one token per slice does)."""
    return cheapest_fit(token_slices(work), lambda n: forward_peak_bytes(shape, work, n, kernel), search)


def automatic_token_chunk(shape: WanShape, work: WanWork, tokens_per_frame: int,
                          kernel: AttentionKernel = SUB_QUADRATIC) -> int:
    """The slice of a config left automatic: the most latent frames per slice whose predicted peak is close to
    that of one frame per slice (core/plan_search.py automatic_slice)."""
    slices = frame_slices(work.tokens, tokens_per_frame)
    return automatic_slice(slices, lambda n: forward_peak_bytes(shape, work, n, kernel)).candidate


WAN_TEXT_TOKENS = 512  # umT5 tokens after Wan's text embedding (ComfyUI pads prompts to this)
WAN_IMAGE_TOKENS = 257  # CLIP-image tokens of Wan 2.1 i2v


def wan_shape(diffusion_model):
    from comfy.ldm.wan.model import WanI2VCrossAttention

    block = diffusion_model.blocks[0]
    patch = getattr(diffusion_model, "patch_size", (1, 2, 2))
    return WanShape(block.dim, block.ffn_dim, block.num_heads, len(diffusion_model.blocks),
                    in_dim=diffusion_model.patch_embedding.weight.shape[1], out_dim=diffusion_model.out_dim,
                    patch_values=patch[0] * patch[1] * patch[2],
                    i2v=isinstance(block.cross_attn, WanI2VCrossAttention))


def wan_tokens(diffusion_model, latent_shape) -> tuple[int, int]:
    """(tokens, tokens per latent frame) of a (batch, channels, frames, height, width) latent."""
    patch = getattr(diffusion_model, "patch_size", (1, 2, 2))
    per_frame = -(-latent_shape[-2] // patch[1]) * -(-latent_shape[-1] // patch[2])
    return -(-latent_shape[-3] // patch[0]) * per_frame, per_frame


def wan_work(diffusion_model, latent_shape, dtype_bytes: int, text_tokens: int = WAN_TEXT_TOKENS):
    from .block import host_copies_block_input

    shape = wan_shape(diffusion_model)
    tokens, _ = wan_tokens(diffusion_model, latent_shape)
    return WanWork(latent_shape[0], tokens, text_tokens, WAN_IMAGE_TOKENS if shape.i2v else 0,
                   dtype_bytes=dtype_bytes, input_copy=host_copies_block_input())


def wan_rehash_split_bytes(diffusion_model, latent_shape, dtype_bytes: int) -> int:
    """What Step Rehash's split adds to a Wan call besides its caches: the deep blocks' input, one (batch,
    tokens, dim) tensor kept from the first deep block to the last (families/wan/rehash.py), on full calls."""
    tokens, _ = wan_tokens(diffusion_model, latent_shape)
    return latent_shape[0] * tokens * wan_shape(diffusion_model).dim * dtype_bytes


def wan_kernel():
    """The law of the attention ComfyUI runs in this process."""
    return attention_kernel()


def wan_token_chunk(config: SliceConfig, shape: WanShape, work: WanWork, tokens_per_frame: int,
                    kernel: AttentionKernel) -> int:
    """Tokens per slice of one call: the config's (core/slicing.py token_chunk_size), or, left automatic,
    the laws' choice (automatic_token_chunk)."""
    if is_automatic(config):
        return automatic_token_chunk(shape, work, tokens_per_frame, kernel)
    return token_chunk_size(config, work.batch, work.tokens, tokens_per_frame, shape.dim)


def plan_wan(diffusion_model, latent_shape, dtype_bytes: int, budget: int, context_tokens: int | None = None) -> Plan:
    """The coarsest token slicing predicted to fit `budget` for one Wan call. Raises BudgetError."""
    shape, kernel = wan_shape(diffusion_model), wan_kernel()
    work = wan_work(diffusion_model, latent_shape, dtype_bytes, context_tokens or WAN_TEXT_TOKENS)
    fit = plan_tokens(shape, work, PlanSearch(budget, f"a Wan call of {work.batch} x {work.tokens} tokens"), kernel)
    return Plan(SliceConfig(token_chunk=fit.candidate), int(fit.peak_bytes),
                int(forward_peak_bytes(shape, work, None, kernel)))


def wan_peaks(diffusion_model, latent_shape, dtype_bytes: int, config: SliceConfig,
              context_tokens: int | None = None) -> tuple[int, int]:
    """(sliced with `config`, ComfyUI's forward) predicted peak bytes of one Wan call."""
    shape, kernel = wan_shape(diffusion_model), wan_kernel()
    work = wan_work(diffusion_model, latent_shape, dtype_bytes, context_tokens or WAN_TEXT_TOKENS)
    _, per_frame = wan_tokens(diffusion_model, latent_shape)
    chunk = wan_token_chunk(config, shape, work, per_frame, kernel)
    return int(forward_peak_bytes(shape, work, chunk, kernel)), int(forward_peak_bytes(shape, work, None, kernel))


def preview_latent(diffusion_model, width: int, height: int, clip_frames: int) -> tuple[int, ...]:
    """The latent of one sampling call with cond and uncond batched, for a width x height x frames clip."""
    shape = wan_shape(diffusion_model)
    scale = 16 if shape.out_dim == 48 else 8  # Wan 2.2's 5B VAE compresses 16x, Wan 2.1's 8x
    return (2, shape.out_dim, 1 + (clip_frames - 1) // 4, height // scale, width // scale)
