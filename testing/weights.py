"""Random weights for the test models, and ADE's modules: the base every fixture builder uses."""
from __future__ import annotations

import importlib
import math

import torch
import torch.nn as nn


def ade_module(name: str):
    """An AnimateDiff-Evolved module (the ADE folder must be on sys.path)."""
    return importlib.import_module(f"animatediff.{name}")


def _law_(value: torch.Tensor, name: str) -> torch.Tensor:
    """randomize_'s law on standard-normal `value` (in place): fan-in-scaled weights, norm scales near 1, small
    biases."""
    if value.ndim >= 2:
        return value.mul_(1.0 / math.sqrt(math.prod(value.shape[1:])))
    return value.mul_(0.1).add_(1.0 if name.endswith("weight") else 0.0)


POOL_VALUES = 1 << 24


def pooled_state_dict(module: nn.Module, seed: int, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """The state dict of `module` in `dtype`, its parameters drawn with randomize_'s law from one pool of 2^24
    standard-normal values, each a stretch of it at a random offset; its buffers as they are. For files whose
    weights must be random at the law's scale but whose exact values matter to no test (the server tests'
    checkpoint): at SD1.5's size about 10x faster than drawing every value. The module's parameters are never
    read (build it without initialisation: comfy.ops.disable_weight_init)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL_VALUES, generator=g).repeat(2)  # a stretch from any offset up to POOL_VALUES long
    parameters = dict(module.named_parameters())
    sd = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if name not in parameters:
            sd[name] = tensor.detach().to(dtype).contiguous()
            continue
        n, start = tensor.numel(), int(torch.randint(POOL_VALUES, (), generator=g))
        stretch = pool[start:start + n] if n <= POOL_VALUES else pool[:POOL_VALUES].repeat(-(-n // POOL_VALUES))[:n]
        sd[name] = _law_(stretch.reshape(tensor.shape).clone(), name).to(dtype)
    return sd


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
