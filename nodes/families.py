"""The model families the pack runs, and the memory side of each: one adapter per family.

- UNet: ComfyUI's UNetModel as SD1.5 / SD2 / SDXL build it, with AnimateDiff-Evolved's motion modules or
  without (nodes/streamlined_unet.py; laws in core/budget.py, structure in nodes/structure.py);
- SVD: ComfyUI's UNetModel with VideoResBlock / SpatialVideoTransformer layers (nodes/svd_unet.py; laws in
  core/svd_budget.py, structure in nodes/svd_structure.py);
- Wan: WanModel's plain WanAttentionBlocks, sliced over tokens through ComfyUI's block-replace hook
  (nodes/wan/; laws in core/dit_budget.py); of its subclasses, VaceWanModel, CameraWanModel and
  AnimateWanModel too; WanModel_S2V and HumoWanModel run unchanged (`wan_reason`).

What each family supports (`unsupported_reason` in nodes/layer_roles.py asks this module):
slicing, memory planning and Step Rehash's shallow/deep split for all three (Wan's: first and last blocks
shallow, the residual of the blocks between deep; nodes/wan/rehash.py), except Step Rehash on the Wan
subclasses that add to x between blocks (VACE, Animate), which it runs in full.

The Memory Budget and the run report call `plan_for` / `peaks_for`, which pick the family's laws; the
UNet's own planning stays in nodes/memory_budget.py, where it was first.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..core.budget import Plan
from ..core.slicing import SliceConfig

UNET, SVD, WAN = "UNet", "SVD", "Wan"
SVD_DEFAULT_FRAMES = 14  # what the estimate assumes when a call's frame count is unknown (SVD's own default)
WAN_TEXT_TOKENS = 512  # umT5 tokens after Wan's text embedding (ComfyUI pads prompts to this)
WAN_IMAGE_TOKENS = 257  # CLIP-image tokens of Wan 2.1 i2v


def family_of(diffusion_model: nn.Module) -> str | None:
    """UNET, SVD, WAN, or None (a family the pack leaves to ComfyUI)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from .svd_unet import is_svd_unet
    from .wan import unsupported_wan_reason

    if isinstance(diffusion_model, UNetModel):
        return SVD if is_svd_unet(diffusion_model) else UNET
    if unsupported_wan_reason(diffusion_model) is None:
        return WAN
    return None


def splits_for_rehash(family: str | None) -> bool:
    return family in (UNET, SVD, WAN)


def wan_reason(diffusion_model: nn.Module, purpose: str) -> str | None:
    """Why the pack leaves a Wan model (WanModel or a subclass of it) to ComfyUI for `purpose` ("slice",
    "plan" or "rehash"; nodes/wan/patch.py unsupported_wan_reason); None for a Wan model it handles, or a
    model that is not Wan. VACE, S2V and Animate add to x between blocks: Step Rehash runs them in full;
    S2V's block hook passes no transformer_options and HuMo's blocks are not plain: both run unchanged."""
    from comfy.ldm.wan.model import WanModel

    from .wan import unsupported_wan_reason

    if not isinstance(diffusion_model, WanModel):
        return None
    reason = unsupported_wan_reason(diffusion_model, "rehash" if purpose == "rehash" else "slice")
    if reason is None and purpose == "plan":
        return WAN_UNPLANNED.get(type(diffusion_model).__name__)
    return reason


# Wan subclasses the pack slices but does not plan: work outside the sliced blocks that core/dit_budget.py's
# laws do not count, so a budget could not be kept. Memory Budget leaves them to ComfyUI (Streamline Model
# Patch still slices them).
WAN_UNPLANNED = {
    "VaceWanModel": "VaceWanModel runs its VACE blocks unsliced beside the sliced ones, and the Wan laws do not "
                    "count them, so Memory Budget cannot plan it (Streamline Model Patch slices it)",
    "AnimateWanModel": "AnimateWanModel runs its face encoder and adapter outside the blocks, and the Wan laws do "
                       "not count them, so Memory Budget cannot plan it (Streamline Model Patch slices it)",
}


# -- SVD ---------------------------------------------------------------------------------------------


def svd_frames(kwargs: dict, x: Tensor, unet) -> int:
    """Frames per video of one SVD call (the model passes num_video_frames; the batch is videos x frames)."""
    frames = kwargs.get("num_video_frames") or getattr(unet, "default_num_video_frames", None) or x.shape[0]
    return int(frames) if x.shape[0] % int(frames) == 0 else x.shape[0]


def _svd(unet, x: Tensor, context: Tensor | None, frames: int):
    from .svd_structure import read_svd_structure, svd_work

    return read_svd_structure(unet), svd_work(x, context, frames)


# -- Wan ---------------------------------------------------------------------------------------------


def wan_shape(diffusion_model):
    from comfy.ldm.wan.model import WanI2VCrossAttention

    from ..core.dit_budget import WanShape

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
    from ..core.dit_budget import WanWork

    from .wan.block import host_copies_block_input

    shape = wan_shape(diffusion_model)
    tokens, _ = wan_tokens(diffusion_model, latent_shape)
    return WanWork(latent_shape[0], tokens, text_tokens, WAN_IMAGE_TOKENS if shape.i2v else 0,
                   dtype_bytes=dtype_bytes, input_copy=host_copies_block_input())


def wan_rehash_split_bytes(diffusion_model, latent_shape, dtype_bytes: int) -> int:
    """What Step Rehash's split adds to a Wan call besides its caches: the deep blocks' input, one (batch,
    tokens, dim) tensor kept from the first deep block to the last (nodes/wan/rehash.py), on full calls."""
    tokens, _ = wan_tokens(diffusion_model, latent_shape)
    return latent_shape[0] * tokens * wan_shape(diffusion_model).dim * dtype_bytes


def wan_kernel():
    """core/dit_budget's law for the attention ComfyUI runs in this process."""
    import comfy.ldm.modules.attention as attention

    from ..core.dit_budget import SDPA, SUB_QUADRATIC

    return SDPA if attention.optimized_attention.__name__ == "attention_pytorch" else SUB_QUADRATIC


def wan_token_chunk(config: SliceConfig, work, tokens_per_frame: int, dim: int) -> int:
    from ..core.dit_budget import token_chunk_size

    return token_chunk_size(config, work.batch, work.tokens, tokens_per_frame, dim)


# -- planning, per family --------------------------------------------------------------------------------


def plan_for(family: str, diffusion_model, latent_shape, dtype_bytes: int, budget: int, laws,
             context_tokens: int | None = None, frames: int | None = None) -> Plan:
    """The coarsest slicing predicted to fit `budget` for one call of an SVD or Wan model (the UNet's is
    core/budget.plan, through nodes/memory_budget.make_plan). Raises core.budget.BudgetError."""
    from ..core.budget import BudgetError, format_bytes

    if family == SVD:
        from ..core.svd_budget import plan_svd

        x = _shaped(latent_shape, dtype_bytes)
        context = _shaped((latent_shape[0], context_tokens or 1, 1), dtype_bytes)
        structure, work = _svd(diffusion_model, x, context, frames or SVD_DEFAULT_FRAMES)
        return plan_svd(structure, work, budget, laws)
    if family == WAN:
        from ..core.dit_budget import forward_peak_bytes, largest_token_chunk
        from ..core.budget import ALLOCATOR_HEADROOM

        shape, kernel = wan_shape(diffusion_model), wan_kernel()
        work = wan_work(diffusion_model, latent_shape, dtype_bytes, context_tokens or WAN_TEXT_TOKENS)
        whole = int(forward_peak_bytes(shape, work, None, kernel))
        chunk = largest_token_chunk(shape, work, budget * ALLOCATOR_HEADROOM, kernel)
        if chunk is None:
            smallest = forward_peak_bytes(shape, work, 1, kernel) / ALLOCATOR_HEADROOM
            raise BudgetError(f"no token slicing fits {format_bytes(budget)}: the finest needs about "
                              f"{format_bytes(smallest)}")
        return Plan(SliceConfig(token_chunk=chunk), int(forward_peak_bytes(shape, work, chunk, kernel)), whole)
    raise ValueError(f"no planner for the family {family!r}")


def peaks_for(family: str, diffusion_model, x: Tensor, context: Tensor | None, config: SliceConfig, laws,
              frames: int | None = None) -> tuple[int, int]:
    """(sliced with `config`, ComfyUI's forward) predicted peak bytes of one SVD or Wan call."""
    if family == SVD:
        from ..core.svd_budget import predict_svd_peak_bytes

        structure, work = _svd(diffusion_model, x, context, frames or SVD_DEFAULT_FRAMES)
        return (predict_svd_peak_bytes(structure, work, config, laws),
                predict_svd_peak_bytes(structure, work, None, laws))
    if family == WAN:
        from ..core.dit_budget import forward_peak_bytes

        shape, kernel = wan_shape(diffusion_model), wan_kernel()
        work = wan_work(diffusion_model, x.shape, x.element_size(),
                        context.shape[1] if context is not None and context.ndim == 3 else WAN_TEXT_TOKENS)
        _, per_frame = wan_tokens(diffusion_model, x.shape)
        chunk = wan_token_chunk(config, work, per_frame, shape.dim)
        return int(forward_peak_bytes(shape, work, chunk, kernel)), int(forward_peak_bytes(shape, work, None, kernel))
    raise ValueError(f"no laws for the family {family!r}")


def plan_text(plan: Plan) -> str:
    """A plan as the pack prints it; a DiT's slicing is in tokens."""
    from ..core.budget import format_bytes

    if plan.config.token_chunk:
        return (f"token_chunk {plan.config.token_chunk}: predicted peak activation "
                f"{format_bytes(plan.predicted_peak_bytes)} (unpatched {format_bytes(plan.baseline_peak_bytes)})")
    return plan.text()


def preview_latent(family: str, diffusion_model, width: int, height: int, frames: int) -> tuple[int, ...]:
    """The latent of one sampling call with cond and uncond batched, for a width x height x frames clip."""
    if family == SVD:
        return (2 * frames, 4, height // 8, width // 8)
    shape = wan_shape(diffusion_model)
    scale = 16 if shape.out_dim == 48 else 8  # Wan 2.2's 5B VAE compresses 16x, Wan 2.1's 8x
    return (2, shape.out_dim, 1 + (frames - 1) // 4, height // scale, width // scale)


class _Shaped:
    """Stands for a tensor where the laws read only its shape and element size."""

    def __init__(self, shape, element_size: int):
        self.shape, self._element_size, self.ndim = tuple(shape), element_size, len(shape)

    def element_size(self) -> int:
        return self._element_size


def _shaped(shape, element_size: int) -> _Shaped:
    return _Shaped(shape, element_size)
