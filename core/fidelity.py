"""Fidelity of a result against a reference: PSNR and SSIM, for latents or frames (plain PyTorch)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(x: Tensor, reference: Tensor) -> float:
    """Peak signal-to-noise ratio in dB, with the reference's value range as the peak."""
    x, reference = x.float(), reference.float()
    mse = F.mse_loss(x, reference).item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def ssim(x: Tensor, reference: Tensor, window: int = 7, sigma: float = 1.5) -> float:
    """Mean structural similarity over (N, C, H, W) images, each channel on its own, with a Gaussian
    window and constants relative to the reference's value range (Wang et al. 2004). Videos in Wan's layout
    (N, C, T, H, W) are scored as their N x T frames."""
    x, reference = x.float(), reference.float()
    if x.ndim == 5:
        x, reference = (t.movedim(2, 1).flatten(0, 1) for t in (x, reference))
    channels = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()
    peak = (reference.max() - reference.min()).item() or 1.0
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_r = blur(x), blur(reference)
    var_x = blur(x * x) - mu_x**2
    var_r = blur(reference * reference) - mu_r**2
    cov = blur(x * reference) - mu_x * mu_r
    score = ((2 * mu_x * mu_r + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_r**2 + c1) * (var_x + var_r + c2))
    return score.mean().item()
