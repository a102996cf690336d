"""LTX's adapter: LTXVModel and LTX-2's LTXAVModel, their transformer blocks sliced over video tokens through
ComfyUI's block-replace hook; Step Rehash's split runs the first and last blocks on every step."""
from __future__ import annotations

import dataclasses

from ...core.budget import Plan
from ...core.slicing import SliceConfig, is_automatic
from ..family import Family, Shaped, latent_plan_preview
from .laws import (
    LTX_TEXT_TOKENS, ltx_kernel, ltx_peaks, ltx_rehash_split_bytes, ltx_shape, ltx_token_chunk, ltx_tokens, ltx_work,
    plan_ltx, preview_latent, video_latent_shape,
)


class LtxvFamily(Family):
    name = "LTX"
    swaps_forward = False  # the model's own forward runs; the block replacements slice each block
    splits_block_stack = True

    def claims(self, diffusion_model) -> bool:
        from .patch import is_ltx, unsupported_ltxv_reason

        return is_ltx(diffusion_model) and unsupported_ltxv_reason(diffusion_model) is None

    def reason(self, diffusion_model, purpose: str) -> str | None:
        from .patch import is_ltx, unsupported_ltxv_reason

        return unsupported_ltxv_reason(diffusion_model) if is_ltx(diffusion_model) else None

    def call_input(self, diffusion_model, args: tuple, kwargs: dict):
        """LTX-2's x is [video, audio]: its video latent stands for the call."""
        return self._video(args[0] if args else kwargs["x"])

    @staticmethod
    def _video(x):
        from .patch import video_latent

        return video_latent(x)

    def block_stack_length(self, diffusion_model) -> int:
        return len(diffusion_model.transformer_blocks)

    # -- Memory Budget ----------------------------------------------------------------------------------------

    def plan(self, model, x, context, budget, held, set_budget, video_norm, frames, offload) -> Plan:
        tokens = context.shape[1] if context is not None and context.ndim == 3 else None
        x = self._video(x)
        return plan_ltx(model, tuple(x.shape), x.element_size(), budget, tokens)

    def peaks(self, model, x, context, config, video_norm=False, frames=None) -> tuple[int, int]:
        return ltx_peaks(model, self._video(x), context, config)

    def estimate(self, base_model, input_shape, dtype_bytes, config, planned_budget, motion_models, offload) -> int:
        model = base_model.diffusion_model
        shape = video_latent_shape(base_model, input_shape)
        if planned_budget is not None:
            try:
                return plan_ltx(model, shape, dtype_bytes, planned_budget(), None).predicted_peak_bytes
            except ValueError:
                config = SliceConfig(1, 1, token_chunk=1)
        context = Shaped((shape[0], LTX_TEXT_TOKENS, 1), dtype_bytes)
        return ltx_peaks(model, Shaped(shape, dtype_bytes), context, config)[0]

    def preview(self, model, planned, budget, budget_text, width, height, frames, dtype_bytes, offload,
                cond_batching) -> str:
        dm = model.model.diffusion_model
        latent = preview_latent(dm, width, height, frames)
        return latent_plan_preview(self, budget_text, f"{width}x{height}x{frames}", latent,
                                   lambda: plan_ltx(dm, latent, dtype_bytes, planned, None))

    # -- Streamline Model Patch -------------------------------------------------------------------------------

    def install_slicing(self, patcher, token_chunk_for) -> None:
        from .patch import install_ltxv_slicing

        install_ltxv_slicing(patcher, token_chunk_for)

    def remove_slicing(self, patcher) -> None:
        from .patch import remove_ltxv_slicing

        remove_ltxv_slicing(patcher)

    def slice_text(self, model, x, context, config: SliceConfig) -> str:
        x = self._video(x)
        chunk, tokens = self.token_chunk(model, x, context, config), ltx_tokens(tuple(x.shape))[0]
        auto = " (automatic)" if is_automatic(config) else ""
        return f"slices of {chunk} of {tokens} video tokens in each LTX block{auto}"

    def call_slicing(self, model, x, context, config: SliceConfig) -> SliceConfig:
        """A config left automatic gets the slice the laws choose for this call (laws.automatic_token_chunk)."""
        if not is_automatic(config):
            return config
        return dataclasses.replace(config, token_chunk=self.token_chunk(model, self._video(x), context, config))

    def finer_after_oom(self, model, config: SliceConfig, x, context) -> SliceConfig | None:
        """Half the tokens per slice (None: one token per slice already)."""
        chunk = self.token_chunk(model, self._video(x), context, config)
        if chunk <= 1:
            return None
        return dataclasses.replace(config, token_chunk=chunk // 2)

    @staticmethod
    def token_chunk(model, x, context, config: SliceConfig) -> int:
        """Tokens per slice of a call of video latent `x` with `config` (laws.ltx_token_chunk)."""
        text = context.shape[1] if context is not None and context.ndim == 3 else LTX_TEXT_TOKENS
        work = ltx_work(model, tuple(x.shape), x.element_size(), text)
        _, per_frame = ltx_tokens(tuple(x.shape))
        return ltx_token_chunk(config, ltx_shape(model), work, per_frame, ltx_kernel())

    def rehash_split_bytes(self, model, latent_shape, dtype_bytes: int) -> int:
        return ltx_rehash_split_bytes(model, latent_shape, dtype_bytes)

    # -- Step Rehash ------------------------------------------------------------------------------------------

    def rehash_split(self, model, split_point: int) -> int:
        from .rehash import shallow_blocks

        return shallow_blocks(split_point, len(model.transformer_blocks))

    def install_rehash(self, patcher) -> None:
        from .rehash import install_for_rehash

        install_for_rehash(patcher)

    def rehash_conflict(self, transformer_options: dict, first_deep: int, last_deep: int) -> str | None:
        from .rehash import foreign_deep_blocks

        foreign = foreign_deep_blocks(transformer_options, first_deep, last_deep)
        if foreign:
            return f"LTX blocks {foreign} run through another node's block replacement"
        stg = sorted(i for i in transformer_options.get("stg_self_attn_blocks", ()) if first_deep <= i <= last_deep)
        if stg:  # the perturbed pass of STG guidance differs from the plain one in the deep blocks
            return f"STG perturbs the self-attention of deep blocks {stg}"
        return None

    def rehash_call(self, call_state, first_deep: int, last_deep: int):
        from .rehash import LtxRehashCall

        return LtxRehashCall(call_state, first_deep, last_deep)


LTXV = LtxvFamily()
