"""MiniMax H3's adapter: MiniMaxH3Model's DiTBlocks sliced over the packed text/audio/video tokens through
ComfyUI's block-replace hook (patch.py); Step Rehash's split runs the first and last blocks on every step
(families/dit/rehash.py), the residual of the blocks between is the deep feature."""
from __future__ import annotations

import torch

from ...core.budget import Plan
from ...core.slicing import SliceConfig
from ..dit.family import BlockSlicedFamily


def packed_tokens(model, video, audio_t: int, text_len: int, payload: dict | None) -> tuple[int, bool]:
    """(the packed sequence's length S of one call, whether _forward builds its layout), as
    MiniMaxH3Model._forward lays it out: the layout extra_conds built for the run when it matches the call, else
    the one _forward builds (text, keyframe and reference rows, audio, video)."""
    from comfy.ldm.minimax.model import PackedLayout

    _, _, t, h, w = video.shape
    h, w = -(-h // model.patch_size[1]) * model.patch_size[1], -(-w // model.patch_size[2]) * model.patch_size[2]
    payload = payload or {}
    layout = payload.get("layout")
    if layout is not None and layout.signature == (text_len, t, h, w, audio_t):
        return layout.seq_len, False
    return PackedLayout(text_len, t, h, w, audio_t, keyframes=payload.get("keyframes"),
                        refs=payload.get("refs")).seq_len, True


def packed_input(model, x, context, payload: dict | None) -> torch.Tensor:
    """A (1, S, hidden) tensor of no storage (expanded from one element) standing for the call's packed sequence:
    its shape, the compute dtype (the context's) and device are what the laws and the report read."""
    streams = x.tensors if hasattr(x, "tensors") else x
    video, audio = streams[0], streams[1]
    from .patch import video_tokens_per_frame

    tokens, builds_layout = packed_tokens(model, video, audio.shape[-1], context.shape[1], payload)
    packed = torch.empty((1, 1, 1), dtype=context.dtype, device=video.device).expand(1, tokens, model.hidden_size)
    # what the laws (laws.packed_work) and frame_chunk (patch.py's too) read besides the shape
    packed.tokens_per_frame = video_tokens_per_frame(model, video)
    packed.video_tokens = video.shape[2] * packed.tokens_per_frame
    packed.audio_rows = 2 * audio.shape[-1]
    packed.text_tokens = context.shape[1]
    packed.builds_layout = builds_layout
    return packed


def host_has_minimax() -> bool:
    """Whether the host builds MiniMax H3 (ComfyUI 0.33 does, 0.3.64 has no comfy.ldm.minimax)."""
    try:
        import comfy.ldm.minimax.model  # noqa: F401
    except ImportError:
        return False
    return True


def is_minimax(diffusion_model) -> bool:
    """A MiniMaxH3Model (ComfyUI 0.33's; a host without comfy.ldm.minimax has none)."""
    try:
        from comfy.ldm.minimax.model import MiniMaxH3Model
    except ImportError:
        return False
    return isinstance(diffusion_model, MiniMaxH3Model)


class MiniMaxFamily(BlockSlicedFamily):
    name = "MiniMax"
    tokens_text = "packed tokens"

    def claims(self, diffusion_model) -> bool:
        if not is_minimax(diffusion_model):
            return False
        from .patch import unsupported_minimax_reason

        return unsupported_minimax_reason(diffusion_model) is None

    def reason(self, diffusion_model, purpose: str) -> str | None:
        """Why a MiniMaxH3Model is left to ComfyUI (None for one the pack handles, or another model)."""
        if not is_minimax(diffusion_model):
            return None
        from .patch import unsupported_minimax_reason

        return unsupported_minimax_reason(diffusion_model)

    def call_input(self, diffusion_model, args: tuple, kwargs: dict) -> torch.Tensor:
        x = args[0] if args else kwargs["x"]
        context = args[2] if len(args) > 2 else kwargs["context"]
        return packed_input(diffusion_model, x, context, kwargs.get("minimax_payload"))

    # -- Memory Budget ----------------------------------------------------------------------------------------

    def plan(self, model, x, context, budget, held, set_budget, video_norm, frames, offload) -> Plan:
        from .laws import plan_minimax

        return plan_minimax(model, x, budget)

    def peaks(self, model, x, context, config, video_norm=False, frames=None) -> tuple[int, int]:
        from .laws import minimax_peaks

        return minimax_peaks(model, x, config)

    def estimate(self, base_model, input_shape, dtype_bytes, config, planned_budget, motion_models, offload) -> int:
        from .laws import estimate_minimax

        return estimate_minimax(base_model, input_shape, dtype_bytes, config, planned_budget)

    def preview(self, model, planned, budget, budget_text, width, height, frames, dtype_bytes, offload,
                cond_batching) -> str:
        from .laws import preview_minimax

        return preview_minimax(model.model.diffusion_model, planned, budget_text, width, height, frames, dtype_bytes)

    # -- Streamline Model Patch -------------------------------------------------------------------------------

    def install_slicing(self, patcher, token_chunk_for) -> None:
        from .patch import install_minimax_slicing

        install_minimax_slicing(patcher, token_chunk_for)

    def remove_slicing(self, patcher) -> None:
        if not host_has_minimax():  # asked of every family on every clone: a host without H3 has none to remove
            return
        from .patch import remove_minimax_slicing

        remove_minimax_slicing(patcher)

    def sliced_tokens(self, model, x) -> int:
        return x.shape[1]  # packed_input's (1, S, C)

    def token_chunk(self, model, x, context, config: SliceConfig) -> int:
        """Tokens per slice of a packed (1, S, C) call (packed_input) with `config` (laws.token_chunk_for)."""
        from .laws import token_chunk_for

        return token_chunk_for(model, config, x)

    def rehash_split_bytes(self, model, latent_shape, dtype_bytes: int) -> int:
        """The split keeps x entering the first deep block (a copy) during a full call: one (S, C)."""
        return latent_shape[1] * latent_shape[2] * dtype_bytes

    # -- Step Rehash ------------------------------------------------------------------------------------------

    def install_rehash(self, patcher) -> None:
        from ..dit.hooks import block_hooks
        from .patch import SlicedMiniMaxBlock, install_minimax_slicing

        hooks = block_hooks(patcher.model_options.get("transformer_options", {}))
        if not any(isinstance(v, SlicedMiniMaxBlock) for v in hooks.values()):
            install_minimax_slicing(patcher)  # without Streamline's run state they slice nothing

    def rehash_conflict(self, transformer_options: dict, first_deep: int, last_deep: int) -> str | None:
        from ..dit.hooks import foreign_blocks
        from .patch import SlicedMiniMaxBlock

        foreign = foreign_blocks(transformer_options, first_deep, last_deep, SlicedMiniMaxBlock)
        return f"MiniMax blocks {foreign} run through another node's block replacement" if foreign else None


MINIMAX = MiniMaxFamily()
