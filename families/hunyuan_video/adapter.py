"""HunyuanVideo's adapter: HunyuanVideo 1.0 (T2V, I2V, SkyReels I2V) and 1.5, their double and single blocks sliced
over tokens through ComfyUI's block-replace hook; Step Rehash's split runs the first and last blocks of the double +
single stack on every step."""
from __future__ import annotations

from ...core.slicing import SliceConfig
from ..dit.family import LatentLawsFamily, text_tokens
from .laws import tokens_of


class HunyuanVideoFamily(LatentLawsFamily):
    name = "HunyuanVideo"
    tokens_text = "image tokens"

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

    # -- the laws (families/hunyuan_video/laws.py) ------------------------------------------------------------

    def plan_latent(self, model, latent_shape, dtype_bytes, budget, text):
        from .laws import plan_hunyuan

        return plan_hunyuan(model, latent_shape, dtype_bytes, budget, text)

    def latent_peaks(self, model, latent_shape, dtype_bytes, config, text) -> tuple[int, int]:
        from .laws import hunyuan_peaks

        return hunyuan_peaks(model, latent_shape, dtype_bytes, config, text)

    def preview_latent(self, model, width, height, clip_frames) -> tuple[int, ...]:
        from .laws import preview_latent

        return preview_latent(model, width, height, clip_frames)

    def sliced_tokens(self, model, x) -> int:
        return tokens_of(model, tuple(x.shape))[0]

    def token_chunk(self, model, x, context, config: SliceConfig) -> int:
        """Tokens per slice of a call of `x` with `config` (laws.hunyuan_token_chunk)."""
        from ..dit.laws import attention_kernel
        from .laws import hunyuan_shape, hunyuan_token_chunk, hunyuan_work

        work = hunyuan_work(model, tuple(x.shape), x.element_size(), text_tokens(context))
        _, per_frame = tokens_of(model, tuple(x.shape))
        return hunyuan_token_chunk(config, hunyuan_shape(model), work, per_frame, attention_kernel())

    # -- Streamline Model Patch -------------------------------------------------------------------------------

    def install_slicing(self, patcher, token_chunk_for) -> None:
        from .patch import install_hunyuan_slicing

        install_hunyuan_slicing(patcher, token_chunk_for)

    def remove_slicing(self, patcher) -> None:
        from .patch import remove_hunyuan_slicing

        remove_hunyuan_slicing(patcher)

    def rehash_split_bytes(self, model, latent_shape, dtype_bytes: int) -> int:
        from .laws import TEXT_TOKENS, hunyuan_work

        work = hunyuan_work(model, latent_shape, dtype_bytes, TEXT_TOKENS)
        return work.batch * work.joint * model.hidden_size * dtype_bytes  # the deep span's entry, joined

    # -- Step Rehash ------------------------------------------------------------------------------------------

    def block_stack_length(self, diffusion_model) -> int:
        return len(diffusion_model.double_blocks) + len(diffusion_model.single_blocks)

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


HUNYUAN_VIDEO = HunyuanVideoFamily()
