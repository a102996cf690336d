"""What ComfyUI's UNetModel families (the SD UNet with ADE, SVD's video UNet) answer alike (UNetLike)."""
from __future__ import annotations

from ...core.rehash import resolve_output_block
from ...core.slicing import SliceConfig, finer, frame_chunk_size, spatial_chunk_size
from ..family import Family
from .inputs import KNOWN_CONDS, KNOWN_PATCHES, KNOWN_REPLACES, unknown_inputs


class UNetLike(Family):
    """What ComfyUI's UNetModel families (the SD UNet with ADE, SVD's video UNet) answer alike."""

    def slice_text(self, unet, x, context, config: SliceConfig) -> str:
        tokens = context.shape[1] if context is not None and context.ndim == 3 else 0
        positions = x.shape[-2] * x.shape[-1]
        channels = getattr(unet, "model_channels", 1)
        top = channels * (positions + 2 * tokens)
        samples = frame_chunk_size(config, x.shape[0], top, top)
        spatial = spatial_chunk_size(config, x.shape[0], positions, channels, channels)
        auto = " (automatic)" if config.frame_chunk == 0 or config.spatial_chunk == 0 else ""
        offload = (", skips and block outputs offloaded" if getattr(config, "offload_features", False) else
                   ", skips offloaded" if config.offload_skips else "")
        return (f"slices of {samples} of {x.shape[0]} samples in per-frame layers, {spatial} of {positions} "
                f"positions in temporal layers{auto}{offload}")

    def finer_after_oom(self, unet, config: SliceConfig, x, context) -> SliceConfig | None:
        tokens = context.shape[1] if context is not None and context.ndim == 3 else 0
        positions = x.shape[-2] * x.shape[-1]
        return finer(config, x.shape[0], positions, unet.model_channels,
                     unet.model_channels * (positions + 2 * tokens))

    def unknown_inputs(self, transformer_options: dict, kwargs: dict) -> list[str]:
        return unknown_inputs(transformer_options, kwargs, KNOWN_PATCHES, KNOWN_REPLACES, KNOWN_CONDS)

    def rehash_split(self, unet, split_point: int) -> int:
        return resolve_output_block(split_point, len(unet.output_blocks))
