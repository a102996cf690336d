"""SVD / SVD-XT's adapter: ComfyUI's UNetModel with VideoResBlock / SpatialVideoTransformer layers."""
from __future__ import annotations

import functools

from torch import Tensor

from ...core.budget import Plan
from ...core.slicing import SliceConfig
from ...host.attention import attention_laws
from ..family import Shaped, plan_text
from ..unet_common.adapter import UNetLike
from ..unet_common.layer_roles import is_svd_unet
from . import forward as svd_forward_module
from .forward import svd_forward
from .laws import SVD_DEFAULT_FRAMES, plan_svd, predict_svd_peak_bytes, preview_latent, svd_video_length
from .structure import read_svd_structure, svd_work


def _svd(unet, x: Tensor, context: Tensor | None, video_length: int):
    return read_svd_structure(unet), svd_work(x, context, video_length)


def plan_svd_call(unet, latent_shape, dtype_bytes: int, budget: int, laws, context_tokens: int | None = None,
                  video_length: int | None = None) -> Plan:
    """The coarsest slicing predicted to fit `budget` for one SVD call. Raises core.plan_search.BudgetError."""
    x = Shaped(latent_shape, dtype_bytes)
    context = Shaped((latent_shape[0], context_tokens or 1, 1), dtype_bytes)
    structure, work = _svd(unet, x, context, video_length or SVD_DEFAULT_FRAMES)
    return plan_svd(structure, work, budget, laws)


def svd_peaks(unet, x: Tensor, context: Tensor | None, config: SliceConfig, laws,
              video_length: int | None = None) -> tuple[int, int]:
    """(sliced with `config`, ComfyUI's forward) predicted peak bytes of one SVD call."""
    structure, work = _svd(unet, x, context, video_length or SVD_DEFAULT_FRAMES)
    return (predict_svd_peak_bytes(structure, work, config, laws),
            predict_svd_peak_bytes(structure, work, None, laws))


class SVDFamily(UNetLike):
    name = "SVD"

    def claims(self, diffusion_model) -> bool:
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        return isinstance(diffusion_model, UNetModel) and is_svd_unet(diffusion_model)

    # -- Memory Budget: SVD's frames are its batch ------------------------------------------------------------

    def plan(self, unet, x, context, budget, held, set_budget, video_norm, video_length, offload) -> Plan:
        tokens = context.shape[1] if context is not None and context.ndim == 3 else None
        return plan_svd_call(unet, tuple(x.shape), x.element_size(), budget, attention_laws(), tokens, video_length)

    def peaks(self, unet, x, context, config, video_norm, video_length=None) -> tuple[int, int]:
        return svd_peaks(unet, x, context, config, attention_laws(), video_length)

    def estimate(self, base_model, input_shape, dtype_bytes, config, planned_budget, motion_models, offload) -> int:
        """The estimate takes the batch as one video (its frames are the batch; two videos of half the frames
        differ only in the small temporal-attention scores)."""
        unet, video_length, laws = base_model.diffusion_model, input_shape[0], attention_laws()
        if planned_budget is not None:
            try:
                return plan_svd_call(unet, tuple(input_shape), dtype_bytes, planned_budget(), laws, None,
                                     video_length).predicted_peak_bytes
            except ValueError:
                config = SliceConfig(1, 1, token_chunk=1)
        shaped, context = Shaped(input_shape, dtype_bytes), Shaped((input_shape[0], 1, 1), dtype_bytes)
        return svd_peaks(unet, shaped, context, config, laws, video_length)[0]

    def preview(self, model, planned, budget, budget_text, width, height, clip_frames, dtype_bytes, offload,
                cond_batching) -> str:
        from ...core.plan_search import BudgetError

        latent = preview_latent(width, height, clip_frames)
        try:
            chosen = plan_svd_call(model.model.diffusion_model, latent, dtype_bytes, planned, attention_laws(), None,
                                   clip_frames)
        except BudgetError as e:
            return f"budget {budget_text}: {e}"
        return (f"budget {budget_text}, {width}x{height}x{clip_frames} with CFG batched ({self}, latent "
                f"{'x'.join(map(str, latent))}): {plan_text(chosen)}")

    # -- Streamline Model Patch -------------------------------------------------------------------------------

    def verdict_sliced(self) -> bool:
        return svd_forward_module.svd_verdict().sliced

    def call_mode(self, unet, x, kwargs, transformer_options) -> tuple[bool, int | None]:
        return False, svd_video_length(kwargs, x, unet)

    def sliced_forward(self, unet, config, log, x):
        # skip offload is the UNet forward's (SVD's forward keeps its skips)
        return functools.partial(svd_forward_module.svd_forward, unet, config, log), None

    # -- Step Rehash ------------------------------------------------------------------------------------------

    def unsliced_forward(self):
        return svd_forward


SVD = SVDFamily()
