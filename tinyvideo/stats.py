"""What a TinyVideo clip shows, measured from its RGB frames: is it one coloured shape on a grey
background, of the asked colour, moving like the data does? Used by the tests and the quality report
to tell a model that learned the data from one that outputs noise or unrelated frames. Plain PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import COLOURS, PALETTE, render, random_words, to_rgb

SATURATED = 0.3  # the background is grey (saturation 0), every shape colour is above 0.4
MIN_BLOB_PIXELS = 3  # smaller specks are counted as noise, not as a shape


@dataclass(frozen=True)
class ClipStats:
    foreground_fraction: float  # share of saturated pixels, mean over frames
    blobs: tuple[int, ...]  # connected saturated regions of >= MIN_BLOB_PIXELS pixels, per frame
    colour: str  # the palette colour nearest to the mean foreground colour ("none": no foreground)
    colour_distance: float  # RGB distance from the mean foreground colour to that palette colour
    motion: float  # mean displacement of the foreground centroid between frames, in pixels
    colour_consistency: float  # share of frames whose own foreground colour is `colour`

    @property
    def single_shape_share(self) -> float:
        return sum(b == 1 for b in self.blobs) / len(self.blobs)


def _components(mask: Tensor) -> Tensor:
    """Labels of 8-connected regions of a (h, w) bool mask (0 = background)."""
    h, w = mask.shape
    labels = torch.where(mask, torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w), torch.zeros(h, w))
    while True:
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * mask
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def _blob_count(mask: Tensor) -> int:
    labels = _components(mask)
    sizes = torch.bincount(labels.flatten())[1:]
    return int((sizes >= MIN_BLOB_PIXELS).sum())


def clip_stats(rgb: Tensor) -> ClipStats:
    """rgb: (frames, 3, h, w) in [0, 1]."""
    rgb = rgb.float().clamp(0, 1)
    saturation = rgb.amax(1) - rgb.amin(1)  # (frames, h, w)
    mask = saturation > SATURATED
    blobs = tuple(_blob_count(m) for m in mask)
    pixels = mask.sum()
    if pixels == 0:
        return ClipStats(0.0, blobs, "none", float("inf"), 0.0, 0.0)
    mean_rgb = (rgb * mask[:, None]).sum((0, 2, 3)) / pixels
    distances = (PALETTE - mean_rgb).norm(dim=1)
    h, w = mask.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    counts = mask.sum((1, 2)).clamp_min(1)
    centroids = torch.stack([(mask * xs).sum((1, 2)) / counts, (mask * ys).sum((1, 2)) / counts], dim=1)
    present = mask.flatten(1).any(1)
    steps = [(centroids[i + 1] - centroids[i]).norm() for i in range(len(mask) - 1) if present[i] and present[i + 1]]
    frame_rgb = (rgb * mask[:, None]).sum((2, 3)) / counts[:, None]  # (frames, 3)
    frame_colours = (PALETTE[None] - frame_rgb[:, None]).norm(dim=2).argmin(1)
    colour_index = int(distances.argmin())
    return ClipStats(
        foreground_fraction=float(mask.float().mean()),
        blobs=blobs,
        colour=COLOURS[colour_index],
        colour_distance=float(distances.min()),
        motion=float(torch.stack(steps).mean()) if steps else 0.0,
        colour_consistency=float((present & (frame_colours == colour_index)).sum()) / len(mask),
    )


@dataclass(frozen=True)
class DataRanges:
    """What the generator's own clips measure (over `clips` random clips): the yardstick for samples."""

    foreground_fraction: tuple[float, float]  # 1st and 99th percentile
    single_shape_share: float  # mean
    colour_distance: float  # 99th percentile
    motion: tuple[float, float]  # 1st and 99th percentile


def data_ranges(frames: int, size: int, clips: int = 256, seed: int = 123) -> DataRanges:
    g = torch.Generator().manual_seed(seed)
    videos = render(random_words(clips, g), frames, size, g)
    stats = [clip_stats(to_rgb(v)) for v in videos]

    def q(values, p):
        return float(torch.tensor(values).quantile(p))

    fg = [s.foreground_fraction for s in stats]
    motion = [s.motion for s in stats]
    return DataRanges(
        foreground_fraction=(q(fg, 0.01), q(fg, 0.99)),
        single_shape_share=sum(s.single_shape_share for s in stats) / clips,
        colour_distance=q([s.colour_distance for s in stats], 0.99),
        motion=(q(motion, 0.01), q(motion, 0.99)),
    )


def looks_like_data(stats: ClipStats, ranges: DataRanges, colour: str | None = None) -> list[str]:
    """Why a clip's frames, or the clip as a video, do not look like the data (empty list: they do)."""
    return frame_problems(stats, ranges, colour) + temporal_problems(stats, ranges)


def frame_problems(stats: ClipStats, ranges: DataRanges, colour: str | None = None) -> list[str]:
    """Why the frames, one by one, do not look like the data's: noise, no shape, many shapes, wrong colour."""
    problems = []
    low, high = ranges.foreground_fraction
    if not low / 2 <= stats.foreground_fraction <= high * 1.5:
        problems.append(f"foreground fraction {stats.foreground_fraction:.3f} outside [{low / 2:.3f}, {high * 1.5:.3f}]")
    if stats.single_shape_share < 0.75:
        problems.append(f"only {stats.single_shape_share:.0%} of frames show exactly one shape (blobs {stats.blobs})")
    if colour is not None and stats.colour != colour:
        problems.append(f"shape colour is {stats.colour}, asked {colour}")
    if stats.colour_distance > 2 * ranges.colour_distance:
        problems.append(f"shape colour is {stats.colour_distance:.2f} from any palette colour")
    return problems


def temporal_problems(stats: ClipStats, ranges: DataRanges) -> list[str]:
    """Why the frames are not one video: the shape changes colour or jumps further than the data's move."""
    problems = []
    if stats.colour_consistency < 0.75:
        problems.append(f"the shape keeps its colour in only {stats.colour_consistency:.0%} of frames")
    if stats.motion > 1.5 * ranges.motion[1]:
        problems.append(f"the shape jumps {stats.motion:.1f} px per frame (data: up to {ranges.motion[1]:.1f})")
    return problems
