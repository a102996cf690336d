"""SVD's memory side: its structure and a call's work as core/svd_budget.py's laws read them."""
from __future__ import annotations

from torch import Tensor

from ...core.budget import Plan
from ...core.slicing import SliceConfig

SVD_DEFAULT_FRAMES = 14  # what the estimate assumes when a call's frame count is unknown (SVD's own default)


def svd_frames(kwargs: dict, x: Tensor, unet) -> int:
    """Frames per video of one SVD call (the model passes num_video_frames; the batch is videos x frames)."""
    frames = kwargs.get("num_video_frames") or getattr(unet, "default_num_video_frames", None) or x.shape[0]
    return int(frames) if x.shape[0] % int(frames) == 0 else x.shape[0]


def _svd(unet, x: Tensor, context: Tensor | None, frames: int):
    from .structure import read_svd_structure, svd_work

    return read_svd_structure(unet), svd_work(x, context, frames)


def plan_svd_call(unet, latent_shape, dtype_bytes: int, budget: int, laws, context_tokens: int | None = None,
                  frames: int | None = None) -> Plan:
    """The coarsest slicing predicted to fit `budget` for one SVD call. Raises core.budget.BudgetError."""
    from ...core.svd_budget import plan_svd
    from ..family import Shaped

    x = Shaped(latent_shape, dtype_bytes)
    context = Shaped((latent_shape[0], context_tokens or 1, 1), dtype_bytes)
    structure, work = _svd(unet, x, context, frames or SVD_DEFAULT_FRAMES)
    return plan_svd(structure, work, budget, laws)


def svd_peaks(unet, x: Tensor, context: Tensor | None, config: SliceConfig, laws,
              frames: int | None = None) -> tuple[int, int]:
    """(sliced with `config`, ComfyUI's forward) predicted peak bytes of one SVD call."""
    from ...core.svd_budget import predict_svd_peak_bytes

    structure, work = _svd(unet, x, context, frames or SVD_DEFAULT_FRAMES)
    return (predict_svd_peak_bytes(structure, work, config, laws),
            predict_svd_peak_bytes(structure, work, None, laws))


def preview_latent(width: int, height: int, frames: int) -> tuple[int, ...]:
    """The latent of one sampling call with cond and uncond batched (SVD's frames are its batch)."""
    return (2 * frames, 4, height // 8, width // 8)
