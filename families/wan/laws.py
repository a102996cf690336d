"""Wan's memory side: its shape and a call's work as core/dit_budget.py's laws read them, and the plan / peaks
of one call."""
from __future__ import annotations

from torch import Tensor

from ...core.budget import Plan
from ...core.slicing import SliceConfig
from ...host.attention import dit_attention_law

WAN_TEXT_TOKENS = 512  # umT5 tokens after Wan's text embedding (ComfyUI pads prompts to this)
WAN_IMAGE_TOKENS = 257  # CLIP-image tokens of Wan 2.1 i2v


def wan_shape(diffusion_model):
    from comfy.ldm.wan.model import WanI2VCrossAttention

    from ...core.dit_budget import WanShape

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
    from ...core.dit_budget import WanWork

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
    """core/dit_budget's law for the attention ComfyUI runs in this process."""
    return dit_attention_law()


def wan_token_chunk(config: SliceConfig, work, tokens_per_frame: int, dim: int) -> int:
    from ...core.dit_budget import token_chunk_size

    return token_chunk_size(config, work.batch, work.tokens, tokens_per_frame, dim)


def plan_wan(diffusion_model, latent_shape, dtype_bytes: int, budget: int, context_tokens: int | None = None) -> Plan:
    """The coarsest token slicing predicted to fit `budget` for one Wan call. Raises core.budget.BudgetError."""
    from ...core.budget import ALLOCATOR_HEADROOM, BudgetError, format_bytes
    from ...core.dit_budget import forward_peak_bytes, largest_token_chunk

    shape, kernel = wan_shape(diffusion_model), wan_kernel()
    work = wan_work(diffusion_model, latent_shape, dtype_bytes, context_tokens or WAN_TEXT_TOKENS)
    whole = int(forward_peak_bytes(shape, work, None, kernel))
    chunk = largest_token_chunk(shape, work, budget * ALLOCATOR_HEADROOM, kernel)
    if chunk is None:
        smallest = forward_peak_bytes(shape, work, 1, kernel) / ALLOCATOR_HEADROOM
        raise BudgetError(f"no token slicing fits {format_bytes(budget)}: the finest needs about "
                          f"{format_bytes(smallest)}")
    return Plan(SliceConfig(token_chunk=chunk), int(forward_peak_bytes(shape, work, chunk, kernel)), whole)


def wan_peaks(diffusion_model, x: Tensor, context: Tensor | None, config: SliceConfig) -> tuple[int, int]:
    """(sliced with `config`, ComfyUI's forward) predicted peak bytes of one Wan call."""
    from ...core.dit_budget import forward_peak_bytes

    shape, kernel = wan_shape(diffusion_model), wan_kernel()
    work = wan_work(diffusion_model, x.shape, x.element_size(),
                    context.shape[1] if context is not None and context.ndim == 3 else WAN_TEXT_TOKENS)
    _, per_frame = wan_tokens(diffusion_model, x.shape)
    chunk = wan_token_chunk(config, work, per_frame, shape.dim)
    return int(forward_peak_bytes(shape, work, chunk, kernel)), int(forward_peak_bytes(shape, work, None, kernel))


def preview_latent(diffusion_model, width: int, height: int, frames: int) -> tuple[int, ...]:
    """The latent of one sampling call with cond and uncond batched, for a width x height x frames clip."""
    shape = wan_shape(diffusion_model)
    scale = 16 if shape.out_dim == 48 else 8  # Wan 2.2's 5B VAE compresses 16x, Wan 2.1's 8x
    return (2, shape.out_dim, 1 + (frames - 1) // 4, height // scale, width // scale)
