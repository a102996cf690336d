"""Random weights for the test models, and ADE's modules: the base every fixture builder uses."""
from __future__ import annotations

import importlib
import math

import torch
import torch.nn as nn


def ade_module(name: str):
    """An AnimateDiff-Evolved module (the ADE folder must be on sys.path)."""
    return importlib.import_module(f"animatediff.{name}")


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module
