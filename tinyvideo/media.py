"""Frames -> files a person can look at: an animated GIF and a PNG strip (frames side by side)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor


def _to_uint8(frames: Tensor) -> Tensor:  # (frames, h, w, 3) in [0, 1] -> uint8
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def save_gif(frames: Tensor, path: Path, fps: int = 8) -> Path:
    """frames: (frames, h, w, 3) in [0, 1] (a ComfyUI IMAGE)."""
    images = [Image.fromarray(f.numpy()) for f in _to_uint8(frames)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def save_strip(rows: list[Tensor], path: Path, gap: int = 2) -> Path:
    """rows: clips of (frames, h, w, 3) in [0, 1], one row each, frames left to right."""
    rows = [_to_uint8(r) for r in rows]
    frames, h, w = max(r.shape[0] for r in rows), rows[0].shape[1], rows[0].shape[2]
    canvas = torch.full((len(rows) * (h + gap) - gap, frames * (w + gap) - gap, 3), 255, dtype=torch.uint8)
    for i, clip in enumerate(rows):
        for j, frame in enumerate(clip):
            canvas[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = frame
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.numpy()).save(path)
    return path


def tile(clips: list[Tensor], columns: int, gap: int = 2) -> Tensor:
    """Clips of (frames, h, w, 3) -> one clip whose frames show them in a grid (white gaps)."""
    frames, h, w, _ = clips[0].shape
    rows = -(-len(clips) // columns)
    grid = torch.ones(frames, rows * (h + gap) - gap, columns * (w + gap) - gap, 3)
    for i, clip in enumerate(clips):
        r, c = divmod(i, columns)
        grid[:, r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = clip.float().cpu()
    return grid


def save_line_plot(xs: list[float], ys: list[float], path: Path, title: str, size=(480, 280)) -> Path:
    """A log-y line plot with PIL (the host has no plotting library)."""
    import math

    from PIL import ImageDraw

    width, height = size
    left, right, top, bottom = 48, 12, 28, 28
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    low, high = math.log10(min(ys)), math.log10(max(ys))
    low, high = math.floor(low), math.ceil(high) if high > math.floor(low) else math.floor(low) + 1

    def point(x, y):
        px = left + (x - xs[0]) / max(1e-9, xs[-1] - xs[0]) * (width - left - right)
        py = top + (high - math.log10(y)) / (high - low) * (height - top - bottom)
        return px, py

    for decade in range(low, high + 1):
        _, py = point(xs[0], 10.0**decade)
        draw.line([(left, py), (width - right, py)], fill=(220, 220, 220))
        draw.text((4, py - 6), f"1e{decade}", fill="black")
    draw.line([point(x, y) for x, y in zip(xs, ys)], fill=(200, 40, 30), width=2)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    draw.text((left, height - bottom + 8), f"step {xs[0]:g}", fill="black")
    draw.text((width - right - 70, height - bottom + 8), f"step {xs[-1]:g}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
