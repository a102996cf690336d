"""LTX's adapter: LTXVModel and LTX-2's LTXAVModel, their transformer blocks sliced over video tokens through
ComfyUI's block-replace hook; Step Rehash's split runs the first and last blocks on every step."""
from __future__ import annotations

from ...core.budget import Plan
from ...core.slicing import SliceConfig
from ..dit.family import LatentLawsFamily, text_tokens
from .laws import (
    LTX_TEXT_TOKENS, ltx_kernel, ltx_peaks, ltx_rehash_split_bytes, ltx_shape, ltx_token_chunk, ltx_tokens, ltx_work,
    plan_ltx, preview_latent, video_latent_shape,
)


class LtxvFamily(LatentLawsFamily):
    name = "LTX"
    tokens_text = "video tokens"

    def claims(self, diffusion_model) -> bool:
        from .patch import is_ltx, unsupported_ltxv_reason

        return is_ltx(diffusion_model) and unsupported_ltxv_reason(diffusion_model) is None

    def reason(self, diffusion_model, purpose: str) -> str | None:
        from .patch import is_ltx, unsupported_ltxv_reason

        return unsupported_ltxv_reason(diffusion_model) if is_ltx(diffusion_model) else None

    def call_input(self, diffusion_model, args: tuple, kwargs: dict):
        """LTX-2's x is [video, audio]: its video latent stands for the call."""
        return _video(args[0] if args else kwargs["x"])

    def block_stack_length(self, diffusion_model) -> int:
        return len(diffusion_model.transformer_blocks)

    # -- the laws (families/ltxv/laws.py), of the video latent ------------------------------------------------

    def plan(self, model, x, context, budget, held, set_budget, video_norm, video_length, offload) -> Plan:
        return super().plan(model, _video(x), context, budget, held, set_budget, video_norm, video_length, offload)

    def peaks(self, model, x, context, config, video_norm=False, video_length=None) -> tuple[int, int]:
        return super().peaks(model, _video(x), context, config, video_norm, video_length)

    def plan_latent(self, model, latent_shape, dtype_bytes, budget, text) -> Plan:
        return plan_ltx(model, latent_shape, dtype_bytes, budget, text)

    def latent_peaks(self, model, latent_shape, dtype_bytes, config, text) -> tuple[int, int]:
        return ltx_peaks(model, latent_shape, dtype_bytes, config, text)

    def preview_latent(self, model, width, height, clip_frames) -> tuple[int, ...]:
        return preview_latent(model, width, height, clip_frames)

    def estimate_shape(self, base_model, input_shape) -> tuple[int, ...]:
        return video_latent_shape(base_model, input_shape)

    def sliced_tokens(self, model, x) -> int:
        return ltx_tokens(tuple(_video(x).shape))[0]

    def token_chunk(self, model, x, context, config: SliceConfig) -> int:
        """Tokens per slice of a call of video latent `x` with `config` (laws.ltx_token_chunk)."""
        x = _video(x)
        work = ltx_work(model, tuple(x.shape), x.element_size(), text_tokens(context) or LTX_TEXT_TOKENS)
        _, per_frame = ltx_tokens(tuple(x.shape))
        return ltx_token_chunk(config, ltx_shape(model), work, per_frame, ltx_kernel())

    def rehash_split_bytes(self, model, latent_shape, dtype_bytes: int) -> int:
        return ltx_rehash_split_bytes(model, latent_shape, dtype_bytes)

    # -- Streamline Model Patch -------------------------------------------------------------------------------

    def install_slicing(self, patcher, token_chunk_for) -> None:
        from .patch import install_ltxv_slicing

        install_ltxv_slicing(patcher, token_chunk_for)

    def remove_slicing(self, patcher) -> None:
        from .patch import remove_ltxv_slicing

        remove_ltxv_slicing(patcher)

    # -- Step Rehash ------------------------------------------------------------------------------------------

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


def _video(x):
    """The video latent of a call's x (LTX-2's is [video, audio])."""
    from .patch import video_latent

    return video_latent(x)


LTXV = LtxvFamily()
