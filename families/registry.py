"""The model families the pack runs: one adapter per family (families/family.py says what a technique may ask).

- UNet: ComfyUI's UNetModel as SD1.5 / SD2 / SDXL build it, with AnimateDiff-Evolved's motion modules or
  without (families/unet/; laws in core/budget.py);
- SVD: ComfyUI's UNetModel with VideoResBlock / SpatialVideoTransformer layers (families/svd/; laws in
  families/svd/laws.py);
- Wan: WanModel's plain WanAttentionBlocks, sliced over tokens through ComfyUI's block-replace hook
  (families/wan/; laws in families/wan/laws.py); of its subclasses, VaceWanModel, CameraWanModel and
  AnimateWanModel too; WanModel_S2V and HumoWanModel run unchanged (families/wan/adapter.py wan_reason);
- HunyuanVideo: 1.0, its I2V variants and 1.5, double and single blocks sliced over tokens through the same hook
  (families/hunyuan_video/; laws in families/hunyuan_video/laws.py);
- LTX: LTXVModel and LTX-2's LTXAVModel (video and audio streams), their transformer blocks sliced over video
  tokens through the same hook (families/ltxv/; laws in families/ltxv/laws.py);
- MiniMax: ComfyUI 0.33's MiniMaxH3Model, its DiTBlocks sliced over the packed text/audio/video tokens through
  the same hook (families/minimax/; laws in families/minimax/laws.py).

Slicing, memory planning and Step Rehash's shallow/deep split for all of them (the DiTs': first and last blocks
shallow, the residual of the blocks between deep; families/wan/rehash.py), except Step Rehash on the Wan
subclasses that add to x between blocks (VACE, Animate), which it runs in full.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..core.budget import Plan
from ..core.slicing import SliceConfig
from .family import Family, plan_text  # noqa: F401 (the techniques' names)
from .svd.adapter import SVD
from .unet.adapter import UNET
from .hunyuan_video.adapter import HUNYUAN_VIDEO
from .ltxv.adapter import LTXV
from .minimax.adapter import MINIMAX
from .wan.adapter import WAN

FAMILIES: tuple[Family, ...] = (SVD, UNET, WAN, HUNYUAN_VIDEO, LTXV, MINIMAX)  # SVD's video UNet is a UNetModel too: asked first


def family_of(diffusion_model: nn.Module) -> Family | None:
    """The adapter of the model's family, or None (a family the pack leaves to ComfyUI)."""
    for family in FAMILIES:
        if family.claims(diffusion_model):
            return family
    return None


def unsupported_reason(diffusion_model: nn.Module, purpose: str = "slice") -> str | None:
    """Why the pack leaves this diffusion model to ComfyUI for `purpose` (None: it handles it).
    purpose: "slice" (Streamline Model Patch), "plan" (Memory Budget, the memory estimate) or "rehash"
    (Step Rehash's shallow/deep split)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from .unet_common.layer_roles import Role, role_of

    family = family_of(diffusion_model)
    for candidate in FAMILIES:  # a model of a family left to ComfyUI for this purpose (a Wan subclass)
        reason = candidate.reason(diffusion_model, purpose)
        if reason is not None:
            return reason
    foreign = foreign_reason(diffusion_model)
    if foreign is not None:
        return foreign
    if family is None:
        if isinstance(diffusion_model, UNetModel):
            blocks = [*diffusion_model.input_blocks, diffusion_model.middle_block, *diffusion_model.output_blocks]
            video = sorted({type(layer).__name__ for block in blocks if block is not None for layer in block
                            if role_of(layer, ()) is Role.UNSUPPORTED})
            return f"this UNet has {', '.join(video)} (video UNet layers) the pack does not know"
    return None


def foreign_reason(diffusion_model: nn.Module) -> str | None:
    """Why the pack leaves a model of no family it handles to ComfyUI, for every purpose (None: a UNetModel, or
    a model of a family it handles). Known before a run starts (what a run injects, motion modules, changes a
    UNet, never this): Step Rehash says it where a run starts, as some such forwards run no DIFFUSION_MODEL
    wrapper (Mochi, SeedVR2)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if isinstance(diffusion_model, UNetModel) or family_of(diffusion_model) is not None or \
            any(family.reason(diffusion_model, "slice") is not None for family in FAMILIES):  # a Wan subclass
        return None
    handled = ", ".join(family.name for family in FAMILIES)
    return f"{type(diffusion_model).__name__} is not of a model family the pack handles ({handled})"


def identity_weights(diffusion_model: nn.Module) -> list[Tensor]:
    """The weights that tell one model from another (Step Rehash's key-step store): a UNetModel's first and last
    convolution (not its parameter list: AnimateDiff-Evolved injects and removes motion modules around each run),
    any family's or one the pack leaves to ComfyUI; another model's first parameter."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    if isinstance(diffusion_model, UNetModel):
        return [diffusion_model.input_blocks[0][0].weight, diffusion_model.out[-1].weight]
    return [next(iter(diffusion_model.parameters()))]


def remove_slicing(patcher) -> None:
    """Undo every family's install_slicing on a clone."""
    for family in FAMILIES:
        family.remove_slicing(patcher)


def plan_for(family: Family, diffusion_model, latent_shape, dtype_bytes: int, budget: int, laws=None,
             context_tokens: int | None = None, video_length: int | None = None) -> Plan:
    """The coarsest slicing predicted to fit `budget` for one call of a latent shaped `latent_shape`. Raises
    core.plan_search.BudgetError. (laws: the host's, read by the family itself.)"""
    from .family import Shaped

    x = Shaped(latent_shape, dtype_bytes)
    context = Shaped((latent_shape[0], context_tokens, 1), dtype_bytes) if context_tokens else None
    return family.plan(diffusion_model, x, context, budget, 0, budget, False, video_length, lambda: False)


def peaks_for(family: Family, diffusion_model, x: Tensor, context: Tensor | None, config: SliceConfig, laws=None,
              video_length: int | None = None) -> tuple[int, int]:
    """(sliced with `config`, ComfyUI's forward) predicted peak bytes of one call."""
    return family.peaks(diffusion_model, x, context, config, False, video_length)
