"""Step Rehash's shallow/deep split of a Wan DiT (families/dit/rehash.py: the first and last blocks shallow, the
residual of the blocks between deep), run by the pack's block replacements (patch.py).

The split is exact only where forward_orig adds nothing to x between the blocks outside them: WanModel
and CameraWanModel. VaceWanModel (VACE hints), WanModel_S2V (audio) and AnimateWanModel (face adapter)
add to x after some blocks, so Step Rehash runs them in full (patch.py unsupported_wan_reason, "rehash").
"""
from __future__ import annotations

def install_for_rehash(model) -> None:
    """The block replacements Step Rehash runs through, on `model` (a clone the caller owns), unless the
    pack's own are there already (Streamline Model Patch, Memory Budget). Without their run state they
    slice nothing: each block is ComfyUI's own."""
    from ..dit.hooks import block_hooks
    from .patch import SlicedWanBlock, install_wan_slicing, unsupported_wan_reason

    if unsupported_wan_reason(model.model.diffusion_model, "rehash") is not None:
        return  # Step Rehash runs this model in full (techniques/rehash.py says why): nothing to split
    hooks = block_hooks(model.model_options.get("transformer_options", {}))
    if not any(isinstance(v, SlicedWanBlock) for v in hooks.values()):
        install_wan_slicing(model)


def foreign_deep_blocks(transformer_options: dict, first_deep: int, last_deep: int) -> list[int]:
    """Deep blocks whose replacement is not the pack's (another node's, or none): they cannot be skipped."""
    from ..dit.hooks import foreign_blocks
    from .patch import SlicedWanBlock

    return foreign_blocks(transformer_options, first_deep, last_deep, SlicedWanBlock)
