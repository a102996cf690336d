"""Wan's adapter: WanModel's plain WanAttentionBlocks (and the subclasses the pack checked), sliced over tokens
through ComfyUI's block-replace hook; Step Rehash's split runs the first and last blocks on every step."""
from __future__ import annotations

import dataclasses

from ...core.budget import Plan
from ...core.slicing import SliceConfig, is_automatic
from ..family import Family, Shaped, latent_plan_preview
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


class WanFamily(Family):
    name = "Wan"
    swaps_forward = False  # the model's forward_orig runs; the block replacements slice each block
    splits_block_stack = True

    def claims(self, diffusion_model) -> bool:
        from .patch import unsupported_wan_reason

        return unsupported_wan_reason(diffusion_model) is None

    def reason(self, diffusion_model, purpose: str) -> str | None:
        return wan_reason(diffusion_model, purpose)

    # -- Memory Budget ----------------------------------------------------------------------------------------

    def plan(self, model, x, context, budget, held, set_budget, video_norm, video_length, offload) -> Plan:
        tokens = context.shape[1] if context is not None and context.ndim == 3 else None
        return plan_wan(model, tuple(x.shape), x.element_size(), budget, tokens)

    def peaks(self, model, x, context, config, video_norm=False, video_length=None) -> tuple[int, int]:
        return wan_peaks(model, x, context, config)

    def estimate(self, base_model, input_shape, dtype_bytes, config, planned_budget, motion_models, offload) -> int:
        model = base_model.diffusion_model
        if planned_budget is not None:
            try:
                return plan_wan(model, tuple(input_shape), dtype_bytes, planned_budget(), None).predicted_peak_bytes
            except ValueError:
                config = SliceConfig(1, 1, token_chunk=1)
        shaped = Shaped(input_shape, dtype_bytes)
        context = Shaped((input_shape[0], WAN_TEXT_TOKENS, 1), dtype_bytes)
        return wan_peaks(model, shaped, context, config)[0]

    def preview(self, model, planned, budget, budget_text, width, height, clip_frames, dtype_bytes, offload,
                cond_batching) -> str:
        dm = model.model.diffusion_model
        latent = preview_latent(dm, width, height, clip_frames)
        return latent_plan_preview(self, budget_text, f"{width}x{height}x{clip_frames}", latent,
                                   lambda: plan_wan(dm, latent, dtype_bytes, planned, None))

    # -- Streamline Model Patch -------------------------------------------------------------------------------

    def install_slicing(self, patcher, token_chunk_for) -> None:
        from .patch import install_wan_slicing

        install_wan_slicing(patcher, token_chunk_for)

    def remove_slicing(self, patcher) -> None:
        from .patch import remove_wan_slicing

        remove_wan_slicing(patcher)

    def slice_text(self, model, x, context, config: SliceConfig) -> str:
        chunk, tokens = self.token_chunk(model, x, context, config), wan_tokens(model, x.shape)[0]
        auto = " (automatic)" if is_automatic(config) else ""
        return f"slices of {chunk} of {tokens} tokens in each Wan block{auto}"

    def call_slicing(self, model, x, context, config: SliceConfig) -> SliceConfig:
        """A config left automatic gets the slice Wan's laws choose for this call (laws.automatic_token_chunk)."""
        if not is_automatic(config):
            return config
        return dataclasses.replace(config, token_chunk=self.token_chunk(model, x, context, config))

    def finer_after_oom(self, model, config: SliceConfig, x, context) -> SliceConfig | None:
        """Half the tokens per slice (None: one token per slice already)."""
        chunk = self.token_chunk(model, x, context, config)
        if chunk <= 1:
            return None
        return dataclasses.replace(config, token_chunk=chunk // 2)

    @staticmethod
    def token_chunk(model, x, context, config: SliceConfig) -> int:
        """Tokens per slice of a call of `x` with `config` (laws.wan_token_chunk)."""
        text_tokens = context.shape[1] if context is not None and context.ndim == 3 else WAN_TEXT_TOKENS
        work = wan_work(model, tuple(x.shape), x.element_size(), text_tokens)
        _, per_frame = wan_tokens(model, tuple(x.shape))
        return wan_token_chunk(config, wan_shape(model), work, per_frame, wan_kernel())

    def rehash_split_bytes(self, model, latent_shape, dtype_bytes: int) -> int:
        return wan_rehash_split_bytes(model, latent_shape, dtype_bytes)

    # -- Step Rehash ------------------------------------------------------------------------------------------

    def rehash_split(self, model, split_point: int) -> int:
        from .rehash import shallow_blocks

        return shallow_blocks(split_point, len(model.blocks))

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

    def rehash_call(self, call_state, first_deep: int, last_deep: int):
        from ..dit.rehash import DeepSpanCall

        return DeepSpanCall(call_state, first_deep, last_deep)


WAN = WanFamily()
