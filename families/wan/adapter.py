"""Wan's adapter: WanModel's plain WanAttentionBlocks (and the subclasses the pack checked), sliced over tokens
through ComfyUI's block-replace hook; Step Rehash's split runs the first and last blocks on every step."""
from __future__ import annotations

from ...core.budget import Plan
from ...core.slicing import SliceConfig
from ..dit.family import LatentLawsFamily, text_tokens
from .laws import (
    WAN_TEXT_TOKENS, plan_wan, preview_latent, wan_peaks, wan_rehash_split_bytes, wan_kernel, wan_shape,
    wan_token_chunk, wan_tokens, wan_work,
)

# Wan subclasses the pack slices but does not plan: work outside the sliced blocks that families/wan/laws.py's
# laws do not count, so a budget could not be kept. Memory Budget leaves them to ComfyUI (Streamline Model
# Patch still slices them).
WAN_UNPLANNED = {
    "VaceWanModel": "VaceWanModel runs its VACE blocks unsliced beside the sliced ones, and the Wan laws do not "
                    "count them, so Memory Budget cannot plan it (Streamline Model Patch slices it)",
    "AnimateWanModel": "AnimateWanModel runs its face encoder and adapter outside the blocks, and the Wan laws do "
                       "not count them, so Memory Budget cannot plan it (Streamline Model Patch slices it)",
}


def wan_reason(diffusion_model, purpose: str) -> str | None:
    """Why the pack leaves a Wan model (WanModel or a subclass of it) to ComfyUI for `purpose` ("slice",
    "plan" or "rehash"; patch.py unsupported_wan_reason); None for a Wan model it handles, or a model that is
    not Wan. VACE, S2V and Animate add to x between blocks: Step Rehash runs them in full; S2V's block hook
    passes no transformer_options and HuMo's blocks are not plain: both run unchanged."""
    from comfy.ldm.wan.model import WanModel

    from .patch import unsupported_wan_reason

    if not isinstance(diffusion_model, WanModel):
        return None
    reason = unsupported_wan_reason(diffusion_model, "rehash" if purpose == "rehash" else "slice")
    if reason is None and purpose == "plan":
        return WAN_UNPLANNED.get(type(diffusion_model).__name__)
    return reason


class WanFamily(LatentLawsFamily):
    name = "Wan"

    def claims(self, diffusion_model) -> bool:
        from .patch import unsupported_wan_reason

        return unsupported_wan_reason(diffusion_model) is None

    def reason(self, diffusion_model, purpose: str) -> str | None:
        return wan_reason(diffusion_model, purpose)

    # -- the laws (families/wan/laws.py) ----------------------------------------------------------------------

    def plan_latent(self, model, latent_shape, dtype_bytes, budget, text) -> Plan:
        return plan_wan(model, latent_shape, dtype_bytes, budget, text)

    def latent_peaks(self, model, latent_shape, dtype_bytes, config, text) -> tuple[int, int]:
        return wan_peaks(model, latent_shape, dtype_bytes, config, text)

    def preview_latent(self, model, width, height, clip_frames) -> tuple[int, ...]:
        return preview_latent(model, width, height, clip_frames)

    def sliced_tokens(self, model, x) -> int:
        return wan_tokens(model, x.shape)[0]

    def token_chunk(self, model, x, context, config: SliceConfig) -> int:
        """Tokens per slice of a call of `x` with `config` (laws.wan_token_chunk)."""
        work = wan_work(model, tuple(x.shape), x.element_size(), text_tokens(context) or WAN_TEXT_TOKENS)
        _, per_frame = wan_tokens(model, tuple(x.shape))
        return wan_token_chunk(config, wan_shape(model), work, per_frame, wan_kernel())

    def rehash_split_bytes(self, model, latent_shape, dtype_bytes: int) -> int:
        return wan_rehash_split_bytes(model, latent_shape, dtype_bytes)

    # -- Streamline Model Patch -------------------------------------------------------------------------------

    def install_slicing(self, patcher, token_chunk_for) -> None:
        from .patch import install_wan_slicing

        install_wan_slicing(patcher, token_chunk_for)

    def remove_slicing(self, patcher) -> None:
        from .patch import remove_wan_slicing

        remove_wan_slicing(patcher)

    # -- Step Rehash ------------------------------------------------------------------------------------------

    def install_rehash(self, patcher) -> None:
        from .rehash import install_for_rehash

        install_for_rehash(patcher)  # the block replacements that split a Wan call (unsliced without Streamline)

    def rehash_conflict(self, transformer_options: dict, first_deep: int, last_deep: int) -> str | None:
        from .rehash import foreign_deep_blocks

        foreign = foreign_deep_blocks(transformer_options, first_deep, last_deep)
        # ComfyUI 0.33's forward_orig calls double_block patches after every block, outside the block
        # replacements: on a rehash step they would act on the deep blocks' skipped output, their effect already
        # in the residual
        between = bool(transformer_options.get("patches", {}).get("double_block"))
        if foreign:
            return f"Wan blocks {foreign} run through another node's block replacement"
        if between:
            return "double_block patches act on x after every block, outside the blocks a rehash step skips"
        return None


WAN = WanFamily()
