"""Feature Slicer: how big each sub-feature is.

Per-frame operators are sliced over the batch axis (batch x frames); temporal operators over spatial
positions. Chunk sizes are given for the full-resolution level of the UNet and, by default, grow at
deeper levels so that every chunk holds about the same number of values: the memory peak sits at the
full-resolution level, and slicing the small deep tensors would only add kernel launches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

# "Automatic" chunk sizes, in values per chunk (a budget-driven choice lives in budget.py), sized so
# each chunk still keeps a GPU busy: about 64K tokens of 320 channels (16 SD1.5 frames at a 64x64
# latent; a 32-sample CFG batch x 2048 positions in a motion module). Seen on an H100 at SD1.5 shapes
# (README, "Memory and time per UNet forward"): chunks of 4 frames or 32K tokens and fewer ran 1.8-8x
# slower than the unsliced forward, chunks of this size about 1.1-1.3x.
AUTO_CHUNK_VALUES = 2**16 * 320
AUTO_FRAME_CHUNK_VALUES = AUTO_CHUNK_VALUES
AUTO_SPATIAL_CHUNK_VALUES = AUTO_CHUNK_VALUES


class SliceConfigError(ValueError):
    """A slicing setting that cannot be honoured."""

    __module__ = "comfyui_streamline"  # ComfyUI imports the pack under its folder path; its error dialog shows this


@dataclass(frozen=True)
class SliceConfig:
    """How to slice. 0 means automatic.

    frame_chunk: samples of the (batch x frames) axis per chunk at full resolution.
    spatial_chunk: spatial positions per chunk inside motion modules at full resolution.
    scale_with_level: grow chunks at deeper levels to keep the values per chunk constant; False
        uses the given sizes at every level (useful to exercise every level in tests).
    offload_skips: the UNet's skip tensors wait in host memory (core/offload.py); the output is the same.
    token_chunk: tokens per slice in a DiT block (Wan); 0: from frame_chunk, or automatic
        (token_chunk_size).
    offload_features: with offload_skips, the whole-batch features between blocks (a block's output that
        the next block's first group reads chunk by chunk) wait in host memory too, and come back by rows.
    """

    frame_chunk: int = 0
    spatial_chunk: int = 0
    scale_with_level: bool = True
    offload_skips: bool = False
    token_chunk: int = 0
    offload_features: bool = False

    def __post_init__(self) -> None:
        for name in ("frame_chunk", "spatial_chunk", "token_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SliceConfigError(f"{name} must be an integer >= 0 (0 = automatic), got {value!r}")
        if self.offload_features and not self.offload_skips:  # the input blocks' outputs are the skips
            raise SliceConfigError("offload_features needs offload_skips")


# One chunk for every group at every level: the grouped forward without slicing (Step Rehash alone).
UNSLICED = SliceConfig(frame_chunk=2**62, spatial_chunk=2**62, scale_with_level=False)


def chunk_ranges(total: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, end) ranges of at most `size` covering 0..total; the last one may be shorter."""
    if total <= 0:
        return
    if size <= 0:
        raise SliceConfigError(f"chunk size must be >= 1, got {size}")
    for start in range(0, total, size):
        yield start, min(start + size, total)


def frame_chunk_size(config: SliceConfig, batch: int, sample_values: int, top_sample_values: int) -> int:
    """Samples per chunk for a per-frame group whose input holds `sample_values` values per sample.

    top_sample_values: values per sample at the full-resolution level (model_channels x H x W).
    """
    if config.frame_chunk == 0:
        chunk = AUTO_FRAME_CHUNK_VALUES // max(sample_values, 1)
    elif config.scale_with_level:
        chunk = config.frame_chunk * top_sample_values // max(sample_values, 1)
    else:
        chunk = config.frame_chunk
    return max(1, min(batch, chunk))


def spatial_chunk_size(config: SliceConfig, batch: int, positions: int, channels: int, top_channels: int) -> int:
    """Positions per chunk for a temporal group over a (batch, channels, positions) feature."""
    if config.spatial_chunk == 0:
        chunk = AUTO_SPATIAL_CHUNK_VALUES // max(batch * channels, 1)
    elif config.scale_with_level:
        chunk = config.spatial_chunk * top_channels // max(channels, 1)
    else:
        chunk = config.spatial_chunk
    return max(1, min(positions, chunk))


def finer(config: SliceConfig, batch: int, positions: int, top_channels: int, top_sample_values: int) -> SliceConfig | None:
    """Half the slice sizes `config` gives at full resolution (automatic sizes resolved first), or None
    when both are already 1 sample / 1 position."""
    samples = frame_chunk_size(config, batch, top_sample_values, top_sample_values)
    spatial = spatial_chunk_size(config, batch, positions, top_channels, top_channels)
    if samples <= 1 and spatial <= 1:
        return None
    return SliceConfig(frame_chunk=max(1, samples // 2), spatial_chunk=max(1, spatial // 2),
                       scale_with_level=config.scale_with_level, offload_skips=config.offload_skips,
                       offload_features=config.offload_features)


def is_automatic(config: SliceConfig) -> bool:
    """Whether a DiT's slice is left to the pack (neither token_chunk nor frame_chunk given)."""
    return not (config.token_chunk or config.frame_chunk)


def frame_slices(tokens: int, tokens_per_frame: int) -> list[int]:
    """A DiT's candidate slices of whole latent frames, coarse to fine: all tokens, then one frame fewer each,
    down to one frame (a clip of one frame: all tokens only)."""
    per_frame = max(1, tokens_per_frame)
    latent_frames = -(-tokens // per_frame)
    return [min(tokens, k * per_frame) for k in range(latent_frames, 0, -1)]


def token_chunk_size(config: SliceConfig, batch: int, tokens: int, tokens_per_frame: int, dim: int) -> int:
    """Tokens per slice for a DiT block from the pack's SliceConfig. A slice holds all batch rows of
    `n` consecutive tokens; token_chunk counts tokens; frame_chunk counts samples (batch x latent frames) as
    for the UNet, so it maps to frame_chunk x tokens_per_frame token rows. Left automatic (is_automatic), the
    family's laws choose a call's slice (families/wan/laws.py automatic_token_chunk, through the adapter's
    call_slicing); where no laws were asked (a block hook installed without the slicing wrapper), about
    AUTO_CHUNK_VALUES values per slice."""
    if config.token_chunk:
        n = config.token_chunk
    elif config.frame_chunk:
        n = config.frame_chunk * tokens_per_frame // max(batch, 1)
    else:
        n = AUTO_CHUNK_VALUES // max(batch * dim, 1)
    return max(1, min(tokens, n))
