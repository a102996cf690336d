"""HunyuanVideo's adapter: HunyuanVideo 1.0 (T2V, I2V, SkyReels I2V) and 1.5, their double and single blocks sliced
over tokens through ComfyUI's block-replace hook; Step Rehash's split runs the first and last blocks of the double +
single stack on every step."""
from __future__ import annotations

import dataclasses

from ...core.slicing import SliceConfig, is_automatic
from ..family import Family
from .laws import tokens_of


class HunyuanVideoFamily(Family):
    name = "HunyuanVideo"
    swaps_forward = False  # the model's forward_orig runs; the block replacements slice each block
    splits_block_stack = True

    def claims(self, diffusion_model) -> bool:
        from comfy.ldm.hunyuan_video.model import HunyuanVideo

        from .patch import unsupported_hunyuan_reason

        return isinstance(diffusion_model, HunyuanVideo) and unsupported_hunyuan_reason(diffusion_model) is None

    def reason(self, diffusion_model, purpose: str) -> str | None:
        from comfy.ldm.hunyuan_video.model import HunyuanVideo

        from .patch import unsupported_hunyuan_reason

        if not isinstance(diffusion_model, HunyuanVideo):
            return None
        return unsupported_hunyuan_reason(diffusion_model)  # sliced, planned and split alike

    # -- Memory Budget ----------------------------------------------------------------------------------------

    def plan(self, model, x, context, budget, held, set_budget, video_norm, frames, offload):
        from .laws import plan_hunyuan

        return plan_hunyuan(model, tuple(x.shape), x.element_size(), budget, _text_tokens(context))

    def peaks(self, model, x, context, config, video_norm=False, frames=None) -> tuple[int, int]:
        from .laws import hunyuan_peaks

        return hunyuan_peaks(model, tuple(x.shape), x.element_size(), config, _text_tokens(context))

    def estimate(self, base_model, input_shape, dtype_bytes, config, planned_budget, motion_models, offload) -> int:
        from .laws import TEXT_TOKENS, hunyuan_peaks, plan_hunyuan

        model = base_model.diffusion_model
        if planned_budget is not None:
            try:
                return plan_hunyuan(model, tuple(input_shape), dtype_bytes, planned_budget(), None).predicted_peak_bytes
            except ValueError:
                config = SliceConfig(1, 1, token_chunk=1)
        return hunyuan_peaks(model, tuple(input_shape), dtype_bytes, config, TEXT_TOKENS)[0]

    def preview(self, model, planned, budget, budget_text, width, height, frames, dtype_bytes, offload,
                cond_batching) -> str:
        from ..family import latent_plan_preview
        from .laws import plan_hunyuan, preview_latent

        dm = model.model.diffusion_model
        latent = preview_latent(dm, width, height, frames)
        return latent_plan_preview(self, budget_text, f"{width}x{height}x{frames}", latent,
                                   lambda: plan_hunyuan(dm, latent, dtype_bytes, planned, None))

    # -- Streamline Model Patch -------------------------------------------------------------------------------

    def install_slicing(self, patcher, token_chunk_for) -> None:
        from .patch import install_hunyuan_slicing

        install_hunyuan_slicing(patcher, token_chunk_for)

    def remove_slicing(self, patcher) -> None:
        from .patch import remove_hunyuan_slicing

        remove_hunyuan_slicing(patcher)

    def slice_text(self, model, x, context, config: SliceConfig) -> str:
        chunk, tokens = self.token_chunk(model, x, context, config), tokens_of(model, tuple(x.shape))[0]
        auto = " (automatic)" if is_automatic(config) else ""
        return f"slices of {chunk} of {tokens} image tokens in each HunyuanVideo block{auto}"

    def call_slicing(self, model, x, context, config: SliceConfig) -> SliceConfig:
        """A config left automatic gets the slice the laws choose for this call (laws.automatic_token_chunk)."""
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
        """Tokens per slice of a call of `x` with `config` (laws.hunyuan_token_chunk)."""
        from ..dit.laws import attention_kernel
        from .laws import hunyuan_shape, hunyuan_token_chunk, hunyuan_work

        work = hunyuan_work(model, tuple(x.shape), x.element_size(), _text_tokens(context))
        _, per_frame = tokens_of(model, tuple(x.shape))
        return hunyuan_token_chunk(config, hunyuan_shape(model), work, per_frame, attention_kernel())

    def rehash_split_bytes(self, model, latent_shape, dtype_bytes: int) -> int:
        from .laws import TEXT_TOKENS

        from .laws import hunyuan_work

        work = hunyuan_work(model, latent_shape, dtype_bytes, TEXT_TOKENS)
        return work.batch * work.joint * model.hidden_size * dtype_bytes  # the deep span's entry, joined

    # -- Step Rehash ------------------------------------------------------------------------------------------

    def block_stack_length(self, diffusion_model) -> int:
        return len(diffusion_model.double_blocks) + len(diffusion_model.single_blocks)

    def rehash_split(self, model, split_point: int) -> int:
        from .rehash import shallow_blocks

        return shallow_blocks(split_point, self.block_stack_length(model))

    def install_rehash(self, patcher) -> None:
        from .rehash import install_for_rehash

        install_for_rehash(patcher)

    def rehash_conflict(self, transformer_options: dict, first_deep: int, last_deep: int) -> str | None:
        from ..dit.hooks import DOUBLE, block_hooks
        from .rehash import foreign_deep_blocks

        # the double blocks, as install_block_hooks keyed them (the pack's replacements, or another node's kept)
        doubles = 1 + max((i for kind, i in block_hooks(transformer_options) if kind == DOUBLE), default=-1)
        foreign = foreign_deep_blocks(transformer_options, first_deep, last_deep, doubles)
        if foreign:
            return f"HunyuanVideo blocks {foreign} run through another node's block replacement"
        return None

    def rehash_call(self, call_state, first_deep: int, last_deep: int):
        from .rehash import HunyuanRehashCall

        return HunyuanRehashCall(call_state, first_deep, last_deep)


def _text_tokens(context) -> int | None:
    return context.shape[1] if context is not None and context.ndim == 3 else None


HUNYUAN_VIDEO = HunyuanVideoFamily()
