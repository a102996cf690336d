"""Procedural videos for TinyVideo: one coloured shape on a grey striped background, moving.

Plain PyTorch, seeded, no downloads. A video is described by three words, one per slot:
colour (red, green, blue, yellow), shape (circle, square, triangle) and motion:
- slide: constant velocity, reflected at the walls;
- bounce: a ball under gravity bouncing on the floor, drifting sideways;
- pulse: in place, size and brightness oscillate (a size and colour change);
- pan: the camera pans, so the striped background and the shape shift together.

Each frame has 4 channels in [-1, 1]: R, G, B and the shape's coverage (alpha). TinyVideo's latent
space is this pixel space (see tinyvideo/model.py), so a "latent" of 32x32 is a 32x32 video.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("slide", "bounce", "pulse", "pan")
SLOTS = (COLOURS, SHAPES, MOTIONS)
PALETTE = torch.tensor([[0.90, 0.15, 0.10], [0.10, 0.80, 0.20], [0.15, 0.30, 0.95], [0.95, 0.85, 0.10]])
NO_WORD = -1  # a slot left empty (the model is trained with empty slots: classifier-free guidance)


@dataclass(frozen=True)
class VideoBatch:
    videos: Tensor  # (videos, frames, 4, height, width) in [-1, 1]
    words: Tensor  # (videos, 3) long: indices into COLOURS, SHAPES, MOTIONS


def prompt_words(text: str) -> tuple[int, int, int]:
    """'red circle bounce' -> slot indices; words may come in any order, slots may stay empty."""
    ids = [NO_WORD, NO_WORD, NO_WORD]
    for word in text.lower().replace(",", " ").split():
        for slot, vocabulary in enumerate(SLOTS):
            if word in vocabulary:
                if ids[slot] != NO_WORD:
                    raise ValueError(f"prompt {text!r} names two {('colours', 'shapes', 'motions')[slot]}")
                ids[slot] = vocabulary.index(word)
                break
        else:
            known = ", ".join(w for vocabulary in SLOTS for w in vocabulary)
            raise ValueError(f"TinyVideo does not know the word {word!r}; it knows: {known}")
    return ids[0], ids[1], ids[2]


def describe(words: Tensor) -> str:
    return " ".join(SLOTS[slot][int(i)] for slot, i in enumerate(words) if int(i) != NO_WORD)


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _reflect(position: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Fold an unbounded path into [low, high] (a wall bounce)."""
    span = (high - low).clamp_min(1e-6)
    phase = torch.remainder(position - low, 2 * span)
    return low + torch.where(phase > span, 2 * span - phase, phase)


def _signed_distance(shape: Tensor, dx: Tensor, dy: Tensor, radius: Tensor) -> Tensor:
    """Distance to the shape's edge in pixels, negative inside. dx, dy: (n, f, h, w); shape, radius: (n, f, 1, 1)."""
    circle = torch.sqrt(dx * dx + dy * dy) - radius
    square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * radius
    # upward equilateral triangle with circumradius `radius`: three half-planes at the inradius
    faces = [math.cos(a) * dx + math.sin(a) * dy for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
    triangle = torch.stack(faces).amax(0) - 0.5 * radius
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))


def _paths(motion: Tensor, frames: int, size: int, radius: Tensor, g: torch.Generator):
    """Per-frame centre (x, y), radius scale, brightness scale and background shift, each (n, frames)."""
    n = motion.shape[0]
    t = torch.arange(frames, dtype=torch.float32)[None]
    lo, hi = radius[:, None], size - radius[:, None]
    x0 = _uniform(g, n, 0.25, 0.75)[:, None] * size
    y0 = _uniform(g, n, 0.25, 0.75)[:, None] * size
    speed = _uniform(g, n, 0.04, 0.08)[:, None] * size  # pixels per frame
    angle = _uniform(g, n, 0, 2 * math.pi)[:, None]
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)[:, None]

    slide_x = _reflect(x0 + speed * torch.cos(angle) * t, lo, hi)
    slide_y = _reflect(y0 + speed * torch.sin(angle) * t, lo, hi)

    gravity = 0.04 * size
    floor = hi
    fall = (floor - _uniform(g, n, 0.2, 0.5)[:, None] * size).clamp_min(0)  # drop height above the floor
    period = 2 * torch.sqrt(2 * fall / gravity).clamp_min(1.0)
    start = _uniform(g, n, 0, 1)[:, None] * period
    tau = torch.remainder(t + start, period) - period / 2
    bounce_y = floor - (fall - 0.5 * gravity * tau * tau).clamp_min(0)
    bounce_x = _reflect(x0 + 0.4 * sign * speed * t, lo, hi)

    phase = _uniform(g, n, 0, 2 * math.pi)[:, None]
    wave = torch.sin(2 * math.pi * t / frames * 1.5 + phase)
    pan_shift = sign * speed * 0.8 * t

    is_ = [(motion == k)[:, None] for k in range(len(MOTIONS))]
    pan_x = size / 2 - sign * 0.2 * size + pan_shift  # starts on the side it pans away from: stays in view
    x = torch.where(is_[0], slide_x, torch.where(is_[1], bounce_x, torch.where(is_[3], pan_x, x0)))
    y = torch.where(is_[0], slide_y, torch.where(is_[1], bounce_y, y0))
    radius_scale = torch.where(is_[2], 1 + 0.35 * wave, torch.ones_like(wave))
    brightness = torch.where(is_[2], 0.8 + 0.2 * wave, torch.ones_like(wave))
    background_shift = torch.where(is_[3], pan_shift, torch.zeros_like(pan_shift))
    return x, y, radius_scale, brightness, background_shift


def render(words: Tensor, frames: int, size: int, g: torch.Generator) -> Tensor:
    """Videos for `words` (n, 3) (no empty slots): (n, frames, 4, size, size) in [-1, 1]."""
    n = words.shape[0]
    colour, shape, motion = words[:, 0], words[:, 1], words[:, 2]
    radius = _uniform(g, n, 0.12, 0.2) * size
    x, y, radius_scale, brightness, background_shift = _paths(motion, frames, size, radius, g)

    coords = torch.arange(size, dtype=torch.float32) + 0.5
    px, py = coords[None, None, None, :], coords[None, None, :, None]  # (1, 1, 1, w), (1, 1, h, 1)
    dx, dy = px - x[..., None, None], py - y[..., None, None]
    r = (radius[:, None] * radius_scale)[..., None, None]
    distance = _signed_distance(shape[:, None, None, None], dx, dy, r)
    alpha = torch.sigmoid(-distance / 0.5)  # (n, f, h, w): about one pixel of anti-aliasing

    grey = _uniform(g, n, 0.2, 0.4)[:, None, None, None]
    stripe_period = _uniform(g, n, 0.2, 0.35)[:, None, None, None] * size
    stripe_phase = _uniform(g, n, 0, 2 * math.pi)[:, None, None, None]
    stripes = torch.sin(2 * math.pi * (px - background_shift[..., None, None]) / stripe_period + stripe_phase)
    background = (grey + 0.08 * stripes).expand(n, frames, size, size)

    rgb = PALETTE[colour] + 0.05 * (torch.rand(n, 3, generator=g) - 0.5)  # (n, 3)
    fg = rgb[:, None, :, None, None] * brightness[..., None, None, None]  # (n, f, 3, 1, 1)
    image = background[:, :, None] * (1 - alpha[:, :, None]) + fg * alpha[:, :, None]
    video = torch.cat([image, alpha[:, :, None]], dim=2)  # (n, f, 4, h, w) in [0, 1]
    return (video * 2 - 1).clamp(-1, 1)


def random_words(n: int, g: torch.Generator) -> Tensor:
    return torch.stack([torch.randint(len(v), (n,), generator=g) for v in SLOTS], dim=1)


def sample_batch(n: int, frames: int, size: int, g: torch.Generator) -> VideoBatch:
    words = random_words(n, g)
    return VideoBatch(videos=render(words, frames, size, g), words=words)


def to_rgb(video: Tensor) -> Tensor:
    """(frames, 4, h, w) in [-1, 1] -> (frames, 3, h, w) in [0, 1]."""
    return ((video[:, :3] + 1) / 2).clamp(0, 1)
