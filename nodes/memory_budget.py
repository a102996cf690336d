"""Memory Budget: plan slices to fit a budget at run time, and tell ComfyUI what a forward needs.

The node patches a MODEL clone like Streamline Model Patch, but its slicing is planned per input
shape by core.budget from the UNet's structure as it is when the forward runs (AnimateDiff-Evolved's
motion modules included). "auto" budgets the memory free on the device at that moment, minus a
safety margin.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from comfy_api.latest import io, ui
from torch import Tensor

from ..core.budget import SDPA, SUB_QUADRATIC, BudgetError, Plan, WorkingSets, Workload, plan, predict_peak_bytes
from ..core.slicing import SliceConfig
from .log import logger
from .structure import unet_shape

SAFETY_BYTES = 256 * 2**20  # "auto": free memory minus this; plans keep allocator headroom too (core/budget.py)
HELD_STEP = 64 * 2**20  # memory held across calls is budgeted in steps of this (one plan per step, not per byte)
# ComfyUI's attention kernels that hold the whole (heads x queries x keys) score matrix
_SCORE_KERNELS = ("attention_sub_quad", "attention_split", "attention_basic")


def attention_laws() -> WorkingSets:
    """The working-set laws of the attention ComfyUI runs in this process (chosen at its start from
    the device and flags): PyTorch SDPA, xformers, flash and sage attention never materialise scores."""
    import comfy.ldm.modules.attention as attention

    return SUB_QUADRATIC if attention.optimized_attention.__name__ in _SCORE_KERNELS else SDPA


def workload_for(x: Tensor, context: Tensor | None, frames: int | None = None) -> Workload:
    batch = x.shape[0]
    return Workload(batch=batch, frames=frames or max(1, batch // 2), height=x.shape[-2], width=x.shape[-1],
                    context_tokens=context.shape[1] if context is not None and context.ndim == 3 else 77,
                    dtype_bytes=x.element_size())


def free_activation_bytes(device: torch.device) -> int:
    import comfy.model_management

    free = comfy.model_management.get_free_memory(device)
    return max(0, int(free) - SAFETY_BYTES)


@dataclass
class BudgetPlanner:
    """Chooses the slicing per input shape; budget_bytes 0 = auto (free memory at run time)."""

    budget_bytes: int
    plans: dict = field(default_factory=dict)

    def _key(self, unet, x: Tensor, context: Tensor | None, held_bytes: int) -> tuple:
        frames = _video_length(unet)
        shape_key = tuple(x.shape), x.dtype, x.device.type, context.shape[1] if context is not None else 0, frames
        return shape_key + (self._held_bucket(held_bytes),)

    def _held_bucket(self, held_bytes: int) -> int:
        """Memory held across calls, rounded up to HELD_STEP: an "auto" budget sees it as used already."""
        return 0 if not self.budget_bytes else -(-held_bytes // HELD_STEP)

    def __call__(self, unet, x: Tensor, context: Tensor | None, log, held_bytes: int = 0) -> SliceConfig:
        key = self._key(unet, x, context, held_bytes)
        if key not in self.plans:
            held = key[-1] * HELD_STEP
            budget = self.budget_bytes - held if self.budget_bytes else free_activation_bytes(x.device)
            held_text = f" after {held / 2**30:.2f} GiB held by Step Rehash's cache" if held else ""
            try:
                chosen = plan(unet_shape(unet), workload_for(x, context, _video_length(unet)), max(budget, 0),
                              attention_laws())
            except BudgetError as e:
                if not held:
                    raise
                raise BudgetError(f"{e}{held_text} (budget {self.budget_bytes / 2**30:.2f} GiB)") from None
            self.plans[key] = chosen
            logger.info(f"Streamline Memory Budget ({budget / 2**30:.2f} GiB{held_text} for {tuple(x.shape)}): "
                        f"{chosen.text()}")
        return self.plans[key].config

    def settle(self, unet, x: Tensor, context: Tensor | None, config: SliceConfig, held_bytes: int = 0) -> None:
        """After an out-of-memory retry: inputs shaped like `x` use `config` from now on."""
        key = self._key(unet, x, context, held_bytes)
        work = workload_for(x, context, _video_length(unet))
        shape, laws = unet_shape(unet), attention_laws()
        self.plans[key] = Plan(config, predict_peak_bytes(shape, work, config, laws),
                               predict_peak_bytes(shape, work, None, laws))


def _video_length(unet) -> int | None:
    for module in unet.modules():
        if type(module).__name__ == "VanillaTemporalModule":
            length = getattr(getattr(module, "temporal_transformer", None), "video_length", None)
            if isinstance(length, int) and length > 0:
                return length
    return None


class MemoryEstimate:
    """BaseModel.memory_required for a Streamline-patched model (installed as an object patch): the
    predicted peak activation of the sliced forward instead of ComfyUI's area-based estimate."""

    def __init__(self, base_model, model_options: dict):
        self.base_model, self.model_options = base_model, model_options

    def __call__(self, input_shape, cond_shapes={}) -> int:
        from .model_patch import STATE_KEY

        state = self.model_options["transformer_options"].get(STATE_KEY)
        unet = self.base_model.diffusion_model
        device = next(unet.parameters()).device
        dtype_bytes = torch.empty(0, dtype=self.base_model.get_dtype()).element_size()
        shape = unet_shape(unet, assume_motion_modules=True)
        work = Workload(batch=input_shape[0], frames=max(1, input_shape[0] // 2), height=input_shape[-2],
                        width=input_shape[-1], dtype_bytes=dtype_bytes)
        config = state.config
        if state.planner is not None:
            budget = state.planner.budget_bytes or free_activation_bytes(device)
            try:
                config = plan(shape, work, budget, attention_laws()).config
            except ValueError:
                config = SliceConfig(1, 1)
        return int(predict_peak_bytes(shape, work, config, attention_laws()) * 1.1)


class MemoryBudget(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamlineMemoryBudget",
            display_name="Streamline Memory Budget",
            category="Streamline",
            description="Streamline Model Patch with slices chosen to fit a memory budget: the largest (fastest) "
            "slices whose predicted peak activation fits, planned at run time for the actual latent.",
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("budget_gb", default=0.0, min=0.0, max=1024.0, step=0.25,
                               tooltip="Activation memory budget in GB (weights not included). 0 = auto: the memory "
                               "free on the device when sampling runs, minus a safety margin."),
                io.Int.Input("width", default=512, min=64, max=8192, step=8, tooltip="For the plan shown on the node."),
                io.Int.Input("height", default=512, min=64, max=8192, step=8, tooltip="For the plan shown on the node."),
                io.Int.Input("frames", default=16, min=1, max=4096, tooltip="For the plan shown on the node."),
            ],
            outputs=[io.Model.Output(), io.String.Output("plan")],
        )

    @classmethod
    def execute(cls, model, budget_gb: float, width: int, height: int, frames: int) -> io.NodeOutput:
        from .model_patch import apply_streamline

        budget = int(budget_gb * 2**30)
        patched = apply_streamline(model, SliceConfig(), planner=BudgetPlanner(budget))
        text = preview_plan(model, budget, width, height, frames)
        logger.info(f"Streamline Memory Budget: {text}")
        return io.NodeOutput(patched, text, ui=ui.PreviewText(text))


def preview_plan(model, budget: int, width: int, height: int, frames: int) -> str:
    """The plan for a width x height x frames clip with CFG batched, for the node's display."""
    device = model.load_device
    shape = unet_shape(model.model.diffusion_model, assume_motion_modules=True)
    dtype_bytes = torch.empty(0, dtype=model.model.get_dtype()).element_size()
    work = Workload(batch=2 * frames, frames=frames, height=height // 8, width=width // 8, dtype_bytes=dtype_bytes)
    budget_text = f"{budget / 2**30:.2f} GiB" if budget else "auto (free memory at run time)"
    if not budget:
        budget = free_activation_bytes(device)
    try:
        chosen: Plan = plan(shape, work, budget, attention_laws())
    except ValueError as e:
        return f"budget {budget_text}: {e}"
    return f"budget {budget_text}, {width}x{height}x{frames} with CFG: {chosen.text()}"
