"""Memory of a HunyuanVideo forward (comfy/ldm/hunyuan_video/model.py), run as ComfyUI runs it or with token slices.

Read off the operator sequences (families/dit/laws.py Live) of ComfyUI's DoubleStreamBlock / SingleStreamBlock
(comfy/ldm/flux/layers.py, attention in comfy/ldm/flux/math.py) and of the sliced blocks (block.py), in bytes:
activations in the model's dtype, the RoPE table pe (B, 1, L, d/2, 2, 2) in float32. Around the blocks
forward_orig keeps the image stream, the text stream, pe and the time vector; the single blocks run on the joined
stream (B, Lt + Li, C), and with block replacements forward_orig's `out` keeps the last double block's image
stream alive during the first single block. Before the blocks it builds pe (float64 per axis on the CPU); after
them the final layer. tests/test_hunyuan_video.py checks whole forwards against the live-tensor counter
(core/memtrace.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ...core.budget import Plan
from ...core.plan_search import Fit, PlanSearch, automatic_slice, cheapest_fit
from ...core.slicing import SliceConfig, frame_slices, is_automatic, token_chunk_size
from ..dit.laws import SUB_QUADRATIC, AttentionKernel, Live, attention, attention_kernel, layer_norm, rms_norm

TEXT_TOKENS = 256  # text tokens a HunyuanVideo prompt keeps after its encoder's template is cropped (a typical prompt)
PE_BYTES = 4  # pe is float32 whatever the model's dtype
VISION_TOKENS = 729  # HunyuanVideo 1.5's SigLIP (so400m, 384 px) image tokens, joined to the text by forward_orig


@dataclass(frozen=True)
class HunyuanShape:
    """A HunyuanVideo as its blocks see it."""

    dim: int  # C
    heads: int
    mlp: int  # M = C x mlp_ratio
    doubles: int = 1
    singles: int = 1
    in_channels: int = 16
    out_channels: int = 16
    patch_values: int = 4  # 1 x 2 x 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class HunyuanWork:
    """One diffusion-model call."""

    batch: int  # B (cond/uncond batched: 2 per prompt)
    tokens: int  # Li: latent frames x (H / 2) x (W / 2)
    text_tokens: int = TEXT_TOKENS  # Lt: text (and 1.5's vision) tokens after the refiner
    dtype_bytes: int = 4
    mask: bool = False  # a text mask: forward_orig's (1, 1, L) additive mask, expanded per head by the kernel

    @property
    def joint(self) -> int:
        return self.tokens + self.text_tokens


def _modulation(live: Live, batch: int, dim: int, terms: int, b: int) -> None:
    """Modulation(vec): silu(vec) for the Linear, its `terms` x C output kept."""
    live.transient(batch * dim * b)
    live.alloc(terms * batch * dim * b)


def _modulated(live: Live, rows: float, dim: int, batch: int, b: int) -> None:
    """apply_mod(norm(x), 1 + scale, shift): leaves the modulated input (rows x C) alive."""
    layer_norm(live, rows * b, dim)
    live.alloc(batch * dim * b)  # 1 + scale
    live.alloc(rows * dim * b)  # addcmul
    live.free(rows * dim * b + batch * dim * b)


def _rope(live: Live, rows: float, dim: int, b: int) -> None:
    """RoPE of q or k as the host's math computes it: leaves the roped (rows x C) alive."""
    live.alloc(rows * dim * b)


def _attention(live: Live, s: HunyuanShape, w: HunyuanWork, queries: int, kernel: AttentionKernel,
               contiguous: bool) -> None:
    """The flux attention's optimized_attention over all w.joint keys, head-major: leaves (B, queries, C) alive.
    contiguous: the queries are contiguous (B, H, n, d) (ComfyUI's joined q), which the kernel reads as they are."""
    b = w.dtype_bytes
    mask = w.batch * s.heads * w.joint * b if w.mask and kernel.query_chunk else 0  # expanded per head
    inner = Live()
    attention(inner, w.batch, queries, w.joint, s.dim, s.heads, kernel, head_major=True,
              contiguous_queries=contiguous)
    live.transient(mask + inner.peak * b)
    live.alloc(inner.now * b)


def host_double_peak(s: HunyuanShape, w: HunyuanWork, kernel: AttentionKernel) -> float:
    """Peak bytes ComfyUI's DoubleStreamBlock holds besides img and txt."""
    b, c, bt = w.dtype_bytes, s.dim, w.batch
    ri, rt, r = bt * w.tokens, bt * w.text_tokens, bt * w.joint
    live = Live()
    _modulation(live, bt, c, 6, b)
    _modulation(live, bt, c, 6, b)
    for rows in (ri, rt):  # the image stream's q, k, v, then the text's
        _modulated(live, rows, c, bt, b)
        live.alloc(3 * rows * c * b)  # qkv
        live.free(rows * c * b)  # the modulated input
        rms_norm(live, rows * b, c, kernel)  # q
        rms_norm(live, rows * b, c, kernel)  # k
    for _ in range(2):  # q, k joined; the normed parts freed
        live.alloc(r * c * b)
        live.free(r * c * b)
    live.alloc(r * c * b)  # v joined
    live.free(3 * r * c * b)  # the qkv outputs (v's views)
    _rope(live, r, c, b)
    _rope(live, r, c, b)
    _attention(live, s, w, w.joint, kernel, contiguous=True)
    live.free(4 * r * c * b)  # roped q and k, q, k, v (v: freed with q and k)
    live.alloc(0)
    for rows in (ri, rt):  # the residuals, in place
        live.transient(2 * rows * c * b)  # proj, gated
        _modulated(live, rows, c, bt, b)
        live.alloc(rows * s.mlp * b)  # Linear
        live.alloc(rows * s.mlp * b)  # GELU
        live.free(rows * s.mlp * b)
        live.alloc(rows * c * b)  # Linear
        live.free(rows * s.mlp * b)
        live.transient(rows * c * b)  # gated
        live.free(2 * rows * c * b)
    return live.peak


def host_double_peak_kept(s: HunyuanShape, w: HunyuanWork, kernel: AttentionKernel) -> float:
    """Peak bytes ComfyUI 0.3.64's DoubleStreamBlock holds besides img and txt: it deletes nothing before its
    attention (each stream's modulated input, qkv output and normed q, k stay alive), ropes q and k inside its
    attention in three steps, and builds a new image stream (img = img + ...) while the caller keeps the old."""
    b, c, bt = w.dtype_bytes, s.dim, w.batch
    ri, r = bt * w.tokens, bt * w.joint
    live = Live()
    _modulation(live, bt, c, 6, b)
    _modulation(live, bt, c, 6, b)
    for rows in (ri, bt * w.text_tokens):
        _modulated(live, rows, c, bt, b)  # kept
        live.alloc(3 * rows * c * b)  # qkv, kept
        rms_norm(live, rows * b, c, kernel)  # q
        rms_norm(live, rows * b, c, kernel)  # k
    live.alloc(3 * r * c * b)  # q, k, v joined (the attention's arguments)
    live.transient(3 * r * c * b)  # RoPE of q (then of k): two products and their sum, the joined q freed
    _attention(live, s, w, w.joint, kernel, contiguous=True)
    live.free(3 * r * c * b)  # roped q, k and v, on return
    for stream_rows, new_stream in ((ri, True), (bt * w.text_tokens, False)):
        rows_c = stream_rows * c * b
        live.alloc(2 * rows_c)  # proj, gated
        live.free(rows_c)
        live.alloc(rows_c if new_stream else 0)  # img + gated
        live.free(rows_c)  # gated
        _modulated(live, stream_rows, c, bt, b)
        live.alloc(2 * stream_rows * s.mlp * b)  # Linear, GELU
        live.free(stream_rows * s.mlp * b)
        live.alloc(rows_c)  # Linear
        live.free(stream_rows * s.mlp * b + rows_c)  # GELU, the modulated input
        live.alloc(rows_c)  # gated
        live.alloc(rows_c if new_stream else 0)  # img + gated
        live.free(2 * rows_c)  # the MLP output, gated
        live.free(rows_c if new_stream else 0)  # the first new img
    return live.peak


def host_single_peak(s: HunyuanShape, w: HunyuanWork, kernel: AttentionKernel) -> float:
    """Peak bytes ComfyUI's SingleStreamBlock holds besides its input x (B, L, C)."""
    b, c, bt = w.dtype_bytes, s.dim, w.batch
    r = bt * w.joint
    live = Live()
    _modulation(live, bt, c, 3, b)
    _modulated(live, r, c, bt, b)
    live.alloc(r * (3 * c + s.mlp) * b)  # linear1
    live.free(r * c * b)
    rms_norm(live, r * b, c, kernel)  # q
    rms_norm(live, r * b, c, kernel)  # k
    _rope(live, r, c, b)
    _rope(live, r, c, b)
    _attention(live, s, w, w.joint, kernel, contiguous=False)  # apply_rope(q, k): q as the norm left it
    live.free(4 * r * c * b)  # roped and normed q, k
    live.alloc(r * s.mlp * b)  # activation
    live.alloc(r * (c + s.mlp) * b)  # cat
    live.free(r * s.mlp * b)  # the activation (a temporary of the cat)
    live.alloc(r * c * b)  # linear2
    live.free(r * (c + s.mlp) * b + r * c * b + r * (3 * c + s.mlp) * b)
    live.transient(r * c * b)  # gated
    return live.peak


def sliced_double_peak(s: HunyuanShape, w: HunyuanWork, n: int, kernel: AttentionKernel) -> float:
    """Peak bytes the sliced double block (block.py) holds besides img and txt, in slices of n image tokens."""
    b, c, bt = w.dtype_bytes, s.dim, w.batch
    rt, r, rs = bt * w.text_tokens, bt * w.joint, bt * min(n, w.tokens)
    live = Live()
    _modulation(live, bt, c, 6, b)
    _modulation(live, bt, c, 6, b)
    live.alloc(2 * r * c * b)  # key and value buffers
    _modulated(live, rt, c, bt, b)  # the text stream, whole
    live.alloc(3 * rt * c * b)
    live.free(rt * c * b)
    rms_norm(live, rt * b, c, kernel)
    rms_norm(live, rt * b, c, kernel)
    _rope(live, rt, c, b)
    live.free(rt * c * b)  # the normed k (roped into the buffer)
    _rope(live, rt, c, b)
    live.free(rt * c * b)  # the normed q
    live.free(2 * rt * c * b)  # k, v views of the qkv output (its q part kept through txt_q)
    for group in (1, 2):  # one slice of each group
        _modulated(live, rs, c, bt, b)
        live.alloc(3 * rs * c * b)  # qkv
        live.free(rs * c * b)
        rms_norm(live, rs * b, c, kernel)  # group 1: k; group 2: q
        _rope(live, rs, c, b)
        live.free(rs * c * b)  # the normed k / q
        if group == 1:
            live.free(rs * c * b + 3 * rs * c * b)  # roped k (copied into the buffer), qkv
            _attention(live, s, w, w.text_tokens, kernel, contiguous=True)  # the text's queries
            live.free(rt * c * b)  # roped txt_q
            continue
        live.free(3 * rs * c * b)  # qkv (q roped)
        _attention(live, s, w, min(n, w.tokens), kernel, contiguous=True)
        live.free(rs * c * b)  # roped q
        live.alloc(rs * c * b)  # proj
        live.transient(rs * c * b)  # gated
        live.free(2 * rs * c * b)
        _modulated(live, rs, c, bt, b)
        live.alloc(2 * rs * s.mlp * b)  # Linear, GELU
        live.free(rs * s.mlp * b)
        live.alloc(rs * c * b)  # Linear
        live.free(rs * s.mlp * b)
        live.transient(rs * c * b)  # gated
        live.free(2 * rs * c * b)
    live.free(2 * r * c * b)  # the buffers
    live.transient(2 * rt * c * b)  # the text's residuals (its attention output alive)
    _modulated(live, rt, c, bt, b)
    live.alloc(2 * rt * s.mlp * b)
    return live.peak


def sliced_single_peak(s: HunyuanShape, w: HunyuanWork, n: int, kernel: AttentionKernel) -> float:
    """Peak bytes the sliced single block holds besides x, in slices of n joint tokens."""
    b, c, bt = w.dtype_bytes, s.dim, w.batch
    r, rs = bt * w.joint, bt * min(n, w.joint)
    live = Live()
    _modulation(live, bt, c, 3, b)
    live.alloc(2 * r * c * b)
    for group in (1, 2):
        _modulated(live, rs, c, bt, b)
        live.alloc(rs * (3 * c + s.mlp) * b)  # linear1
        live.free(rs * c * b)
        rms_norm(live, rs * b, c, kernel)  # group 1: k; group 2: q
        _rope(live, rs, c, b)
        live.free(rs * c * b)  # the normed k / q
        if group == 1:
            live.free(rs * c * b + rs * (3 * c + s.mlp) * b)  # roped k (copied into the buffer), linear1
            continue
        _attention(live, s, w, min(n, w.joint), kernel, contiguous=True)
        live.free(rs * c * b)  # roped q
        live.alloc(rs * s.mlp * b)  # activation
        live.alloc(rs * (c + s.mlp) * b)  # cat
        live.free(rs * s.mlp * b)  # the activation (a temporary of the cat)
        live.alloc(rs * c * b)  # linear2
        live.free(rs * (c + s.mlp) * b + rs * c * b + rs * (3 * c + s.mlp) * b)
        live.transient(rs * c * b)  # gated
    return live.peak


@functools.lru_cache(maxsize=None)
def host_deletes_in_double_block() -> bool:
    """Whether the host's DoubleStreamBlock frees its intermediates before its attention (ComfyUI 0.33: `del
    img_qkv` ...) or keeps them (0.3.64)."""
    from comfy.ldm.flux.layers import DoubleStreamBlock

    from ...host.fingerprints import source_mentions

    return source_mentions(DoubleStreamBlock.forward, "del img_qkv", True)


def pe_bytes(s: HunyuanShape, w: HunyuanWork) -> float:
    return w.batch * w.joint * 2 * s.head_dim * PE_BYTES


def held_bytes(s: HunyuanShape, w: HunyuanWork, single: bool, hooked: bool) -> float:
    """What forward_orig keeps alive around a block: the streams (joined in the single phase; with block
    replacements its `out` keeps the last double block's image stream during the first single block), pe, vec."""
    b = w.dtype_bytes
    streams = w.batch * (w.tokens + w.text_tokens) * s.dim * b
    if single:
        streams += w.batch * w.joint * s.dim * b
        streams -= 0 if hooked else w.batch * w.tokens * s.dim * b
    ids = 2 * w.batch * w.joint * 3 * PE_BYTES  # img_ids, txt_ids, and ids (their join), float32
    return streams + pe_bytes(s, w) + ids + 2 * w.batch * s.dim * b


def forward_peak_bytes(s: HunyuanShape, w: HunyuanWork, token_chunk: int | None,
                       kernel: AttentionKernel = SUB_QUADRATIC) -> float:
    """Peak activation bytes of one diffusion-model call (its inputs not counted). token_chunk None: ComfyUI's
    own blocks, no block replacements."""
    if token_chunk is None or token_chunk >= w.joint:
        host_double = host_double_peak if host_deletes_in_double_block() else host_double_peak_kept
        double = host_double(s, w, kernel) if s.doubles else 0
        single = host_single_peak(s, w, kernel) if s.singles else 0
        hooked = token_chunk is not None
    else:
        double = sliced_double_peak(s, w, token_chunk, kernel) if s.doubles else 0
        single = sliced_single_peak(s, w, token_chunk, kernel) if s.singles else 0
        hooked = True
    return max(held_bytes(s, w, False, hooked) + double, held_bytes(s, w, True, hooked) + single)


def token_slices(w: HunyuanWork) -> range:
    """Tokens per slice from coarse (the joint tokens: ComfyUI's blocks under the hooks) to fine (one): the laws'
    peak shrinks along it."""
    return range(w.joint, 0, -1)


def plan_tokens(s: HunyuanShape, w: HunyuanWork, search: PlanSearch,
                kernel: AttentionKernel = SUB_QUADRATIC) -> Fit[int]:
    """The largest token slice whose predicted forward peak fits `search` (core/plan_search.py, by bisection;
    BudgetError when not even one token per slice does)."""
    return cheapest_fit(token_slices(w), lambda n: forward_peak_bytes(s, w, n, kernel), search)


def automatic_token_chunk(s: HunyuanShape, w: HunyuanWork, tokens_per_frame: int,
                          kernel: AttentionKernel = SUB_QUADRATIC) -> int:
    """The slice of a config left automatic: the most latent frames per slice whose predicted peak is close to
    that of one frame per slice (core/plan_search.py automatic_slice)."""
    slices = frame_slices(w.tokens, tokens_per_frame)
    return automatic_slice(slices, lambda n: forward_peak_bytes(s, w, n, kernel)).candidate


def hunyuan_token_chunk(config: SliceConfig, s: HunyuanShape, w: HunyuanWork, tokens_per_frame: int,
                        kernel: AttentionKernel) -> int:
    """Tokens per slice of one call: the config's (core/slicing.py token_chunk_size), or, left automatic,
    the laws' choice (automatic_token_chunk)."""
    if is_automatic(config):
        return automatic_token_chunk(s, w, tokens_per_frame, kernel)
    return token_chunk_size(config, w.batch, w.tokens, tokens_per_frame, s.dim)


def tokens_of(diffusion_model, latent_shape) -> tuple[int, int]:
    """(image tokens, tokens per latent frame) of a (batch, channels, frames, height, width) latent."""
    patch = diffusion_model.patch_size
    per_frame = -(-latent_shape[-2] // patch[-2]) * -(-latent_shape[-1] // patch[-1])
    frames = -(-latent_shape[-3] // patch[0]) if len(patch) == 3 else 1
    return frames * per_frame, per_frame


def hunyuan_shape(diffusion_model) -> HunyuanShape:
    block = (list(diffusion_model.double_blocks) + list(diffusion_model.single_blocks))[0]
    mlp = getattr(block, "mlp_hidden_dim", None) or block.img_mlp[0].weight.shape[0]
    patch = diffusion_model.patch_size
    values = 1
    for p in patch:
        values *= p
    return HunyuanShape(diffusion_model.hidden_size, diffusion_model.num_heads, mlp, len(diffusion_model.double_blocks),
                        len(diffusion_model.single_blocks), diffusion_model.in_channels, diffusion_model.out_channels,
                        values)


def hunyuan_work(diffusion_model, latent_shape, dtype_bytes: int, text_tokens: int | None) -> HunyuanWork:
    """One call of a latent; 1.5 (a vision projection) counts SigLIP's image tokens joined to the text as well
    (its image-to-video calls have them; a text-to-video call is planned with them, a little above its need)."""
    tokens, _ = tokens_of(diffusion_model, latent_shape)
    vision = VISION_TOKENS if getattr(diffusion_model, "vision_in", None) is not None else 0
    return HunyuanWork(latent_shape[0], tokens, (text_tokens or TEXT_TOKENS) + vision, dtype_bytes)


def plan_hunyuan(diffusion_model, latent_shape, dtype_bytes: int, budget: int, text_tokens: int | None) -> Plan:
    """The coarsest token slicing predicted to fit `budget` for one call. Raises BudgetError."""
    shape, kernel = hunyuan_shape(diffusion_model), attention_kernel()
    work = hunyuan_work(diffusion_model, latent_shape, dtype_bytes, text_tokens)
    fit = plan_tokens(shape, work, PlanSearch(budget, f"a HunyuanVideo call of {work.batch} x {work.tokens} tokens"),
                      kernel)
    return Plan(SliceConfig(token_chunk=fit.candidate), int(fit.peak_bytes),
                int(forward_peak_bytes(shape, work, None, kernel)))


def hunyuan_peaks(diffusion_model, latent_shape, dtype_bytes: int, config: SliceConfig,
                  text_tokens: int | None) -> tuple[int, int]:
    """(sliced with `config`, ComfyUI's forward) predicted peak bytes of one call."""
    shape, kernel = hunyuan_shape(diffusion_model), attention_kernel()
    work = hunyuan_work(diffusion_model, latent_shape, dtype_bytes, text_tokens)
    _, per_frame = tokens_of(diffusion_model, latent_shape)
    chunk = hunyuan_token_chunk(config, shape, work, per_frame, kernel)
    return int(forward_peak_bytes(shape, work, chunk, kernel)), int(forward_peak_bytes(shape, work, None, kernel))


def preview_latent(diffusion_model, width: int, height: int, frames: int) -> tuple[int, ...]:
    """The latent of one sampling call with cond and uncond batched, for a width x height x frames clip (1.0:
    16 channels, 8x spatial; 1.5: 32 channels, 16x spatial; both 4x temporal)."""
    channels = diffusion_model.out_channels
    scale = 16 if channels == 32 else 8
    return (2, channels, 1 + (frames - 1) // 4, height // scale, width // scale)
