"""Memory Budget: plan slices to fit a budget at run time, and tell ComfyUI what a forward needs.

The node patches a MODEL clone like Streamline Model Patch, but its slicing is planned per input
shape by core.budget from the UNet's structure as it is when the forward runs (AnimateDiff-Evolved's
motion modules included). "auto" budgets the memory free on the device at that moment, minus a
safety margin. The plan shown on the node is made by the same function as the run's, from the same
structure (the motion modules ADE will inject, where it injects them), dtype and prompt length, so
for the shown shape it is the plan the run uses. Models the pack does not slice get ComfyUI's own
memory estimate, and the node says it cannot plan for them.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..core.budget import Plan
from ..core.plan_search import BudgetError, format_bytes
from ..core.slicing import SliceConfig
from ..families import registry as families
from ..families.registry import unsupported_reason
from ..host.log import logger
from ..host.options import STREAMLINE_KEY as STATE_KEY

SAFETY_BYTES = 256 * 2**20  # "auto": free memory minus this; plans keep allocator headroom too (core/plan_search.py)
HELD_STEP = 64 * 2**20  # memory held across calls is budgeted in steps of at most this (a plan per step, not per byte)
HELD_STEPS_PER_BUDGET = 16  # ... and of at most 1/16 of the budget, so small budgets are not eaten by the rounding
FREE_STEPS_PER_DOUBLING = 8  # "auto" plans for free memory rounded down to one of 8 steps per doubling (~9%)
ESTIMATE_MARGIN = 1.1  # what the patched model tells ComfyUI: the predicted peak times this
# ComfyUI runs cond and uncond in one call while memory_required(batched shape) x this < free memory
# (comfy/samplers.py, _calc_cond_batch), else one after the other
COMFY_BATCH_FACTOR = 1.5


def compute_dtype(base_model) -> torch.dtype:
    """The dtype the diffusion model computes in (BaseModel.apply_model casts its input to it)."""
    return base_model.manual_cast_dtype or base_model.get_dtype()


def free_memory(device: torch.device, patcher=None) -> int:
    """Free memory on `device` as ComfyUI's sampler counts it when it decides whether cond and uncond fit in
    one call: the patcher's view where it has one (ComfyUI 0.33: torch's free memory plus the weight memory
    DynamicVRAM can evict for activations), else model management's."""
    import comfy.model_management

    get = getattr(patcher, "get_free_memory", None)
    return int(get(device) if get is not None else comfy.model_management.get_free_memory(device))


def free_activation_bytes(device: torch.device, patcher=None) -> int:
    return max(0, free_memory(device, patcher) - SAFETY_BYTES)


def auto_budget(device: torch.device, patcher=None) -> int:
    """The budget "auto" plans with: free memory less the margin, rounded down to a step (one plan per
    step: a run replans when free memory moves to another step, not at every call)."""
    return free_step(free_activation_bytes(device, patcher))


def free_step(free_bytes: int) -> int:
    """`free_bytes` rounded down to one of FREE_STEPS_PER_DOUBLING steps per doubling."""
    if free_bytes < 2**20:
        return free_bytes
    return int(2 ** (math.floor(math.log2(free_bytes) * FREE_STEPS_PER_DOUBLING) / FREE_STEPS_PER_DOUBLING))


def held_step(budget_bytes: int) -> int:
    """Memory held across calls (Step Rehash's cache) is budgeted in steps of this."""
    return max(1, min(HELD_STEP, budget_bytes // HELD_STEPS_PER_BUDGET))


def offload_available(device: torch.device) -> bool:
    """Whether skip offload can save device memory here: host memory apart from the device's (CUDA). On
    the CPU the offloaded skips would stay in the same memory, so the planner never chooses it there."""
    return torch.device(device).type == "cuda"


@dataclass
class BudgetPlanner:
    """Chooses the slicing per input shape; budget_bytes 0 = auto (free memory at run time). The plans
    belong to one run (StreamlineState.for_run gives each run a fresh planner)."""

    budget_bytes: int
    plans: dict = field(default_factory=dict)
    last_key: tuple | None = None  # the plan the latest forward ran with (an out-of-memory retry refines it)
    patcher: object | None = None  # the run's ModelPatcher (set at OUTER_SAMPLE): whose free memory "auto" reads

    def for_run(self, patcher=None) -> "BudgetPlanner":
        return BudgetPlanner(self.budget_bytes, patcher=patcher)

    def budget(self, device: torch.device, held_bytes: int, patcher=None) -> tuple[int, int]:
        """(the activation budget to plan with, the held memory it leaves out). A set budget leaves the
        held memory out, rounded up to a step; "auto" reads free memory (the patcher's view: `patcher`, else
        the run's), which has it counted already."""
        if not self.budget_bytes:
            return auto_budget(device, patcher if patcher is not None else self.patcher), 0
        step = held_step(self.budget_bytes)
        held = -(-held_bytes // step) * step
        return self.budget_bytes - held, held

    def _key(self, unet, x: Tensor, context: Tensor | None, budget: int, video_norm: bool = False,
             video_length: int | None = None) -> tuple:
        tokens = context.shape[1] if context is not None else 0
        family = families.family_of(unet)
        model_length = family.video_length(unet) if family is not None else None  # its temporal layers' setting
        return tuple(x.shape), x.dtype, x.device.type, tokens, model_length, video_norm, video_length, budget

    def __call__(self, unet, x: Tensor, context: Tensor | None, log, held_bytes: int = 0,
                 video_norm: bool = False, video_length: int | None = None) -> SliceConfig:
        budget, held = self.budget(x.device, held_bytes)
        key = self.last_key = self._key(unet, x, context, budget, video_norm, video_length)
        if key not in self.plans:
            chosen = families.family_of(unet).plan(unet, x, context, budget, held, self.budget_bytes, video_norm,
                                                   video_length, lambda: offload_available(x.device))
            self.plans[key] = chosen
            held_text = f" after {format_bytes(held)} held by Step Rehash's cache" if held else ""
            logger.info(f"Streamline Memory Budget ({format_bytes(budget)}{held_text} for {tuple(x.shape)}): "
                        f"{families.plan_text(chosen)}")
        return self.plans[key].config

    def settle(self, unet, x: Tensor, context: Tensor | None, config: SliceConfig, held_bytes: int = 0,
               video_norm: bool = False, video_length: int | None = None) -> None:
        """After an out-of-memory retry: inputs shaped like `x`, at the budget the failed forward was
        planned for, use `config` for the rest of the run."""
        key = self.last_key or self._key(unet, x, context, self.budget(x.device, held_bytes)[0], video_norm,
                                           video_length)
        self.plans[key] = families.family_of(unet).settled_plan(unet, x, context, config, video_norm, video_length)


class MemoryEstimate:
    """BaseModel.memory_required for a Streamline-patched model (installed as an object patch): the
    predicted peak activation of the sliced forward instead of ComfyUI's area-based estimate. For a
    model the pack does not slice, ComfyUI's own (`earlier_patch`, if another patch set one, else the
    base model's method)."""

    def __init__(self, base_model, model_options: dict, earlier_patch: Callable | None = None,
                 motion_models: list = (), load_device: torch.device | None = None, patcher=None):
        self.base_model, self.model_options, self.earlier_patch = base_model, model_options, earlier_patch
        self.motion_models = list(motion_models)  # ADE's, attached to the patched MODEL (ade_motion_models)
        # the device the run computes on: the weights' device is the CPU before loading, under lowvram and
        # under ComfyUI 0.33's DynamicVRAM, which keeps them in host memory
        self.load_device = load_device
        # whose free memory "auto" reads (a weak reference: the patcher holds this estimate in its object patches)
        self.patcher = weakref.ref(patcher) if patcher is not None else (lambda: None)

    def device(self) -> torch.device:
        if self.load_device is not None:
            return torch.device(self.load_device)
        return next(self.base_model.diffusion_model.parameters()).device

    def comfy_estimate(self, input_shape, cond_shapes=None, **kwargs) -> int:
        cond_shapes = {} if cond_shapes is None else cond_shapes
        if self.earlier_patch is not None:
            return self.earlier_patch(input_shape, cond_shapes=cond_shapes, **kwargs)
        return type(self.base_model).memory_required(self.base_model, input_shape, cond_shapes=cond_shapes, **kwargs)

    def __call__(self, input_shape, cond_shapes=None, **kwargs) -> int:
        """kwargs: what a newer host hands memory_required besides (passed on to ComfyUI's own estimate)."""
        unet = self.base_model.diffusion_model
        state = self.model_options["transformer_options"].get(STATE_KEY)
        if state is None or unsupported_reason(unet, "plan") is not None:  # the run's log says so, once
            return self.comfy_estimate(input_shape, cond_shapes, **kwargs)
        device = self.device()
        dtype_bytes = torch.empty(0, dtype=compute_dtype(self.base_model)).element_size()
        planner = state.planner
        planned = (lambda: planner.budget(device, 0, self.patcher())[0]) if planner is not None else None
        estimate = families.family_of(unet).estimate(self.base_model, input_shape, dtype_bytes, state.config, planned,
                                                      self.motion_models, lambda: offload_available(device))
        return int(estimate * ESTIMATE_MARGIN)


def preview_plan(model, budget: int, width: int, height: int, clip_frames: int) -> str:
    """The plan the run makes for a width x height x clip_frames clip with CFG batched (a prompt of one CLIP
    chunk; ADE's context windows, if the clip is longer), for the node's display."""
    reason = unsupported_reason(model.model.diffusion_model, "plan")
    if reason is not None:
        return (f"Streamline Memory Budget cannot plan for this model: {reason}. It runs unchanged, with "
                "ComfyUI's own memory estimate.")
    planner = BudgetPlanner(budget, patcher=model)
    planned, _ = planner.budget(model.load_device, 0)
    budget_text = format_bytes(budget) if budget else \
        f"auto ({format_bytes(planned)} free now; planned again with what is free at run time)"
    dtype_bytes = torch.empty(0, dtype=compute_dtype(model.model)).element_size()
    family = families.family_of(model.model.diffusion_model)
    return family.preview(model, planned, budget, budget_text, width, height, clip_frames, dtype_bytes,
                          lambda: offload_available(model.load_device), cond_batching)


def cond_batching(device: torch.device, batched: Plan, plan_for: Callable[[int], Plan], patcher=None) -> str:
    """Whether ComfyUI will run cond and uncond in one call, judged as it judges it (its estimate, ours
    under the patch, times COMFY_BATCH_FACTOR against free memory now, the patcher's view: weights not loaded
    yet count as free)."""
    free = free_memory(device, patcher)
    need = batched.predicted_peak_bytes * ESTIMATE_MARGIN * COMFY_BATCH_FACTOR
    if need < free:
        return (f"cond and uncond batched (ComfyUI batches them while {COMFY_BATCH_FACTOR:g} x the estimate, "
                f"{format_bytes(need)}, is below free memory: {format_bytes(free)} now)")
    try:
        alone = plan_for(1).text()
    except BudgetError as e:
        alone = str(e)
    return (f"cond and uncond one after the other (ComfyUI splits them: {COMFY_BATCH_FACTOR:g} x the estimate, "
            f"{format_bytes(need)}, is above free memory, {format_bytes(free)} now); each call: {alone}")
