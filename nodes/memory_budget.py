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
from comfy_api.latest import io, ui
from torch import Tensor

from ..core.budget import (
    SDPA, SUB_QUADRATIC, Block, BudgetError, Layer, Plan, UNetShape, WorkingSets, Workload, format_bytes,
    plan, plan_traffic, predict_peak_bytes,
)
from ..core.slicing import SliceConfig
from .layer_roles import is_ade_motion_module
from ..host.log import logger
from . import families
from .layer_roles import unsupported_reason
from .model_patch import STATE_KEY, apply_streamline, node_id_of
from .structure import _heads, unet_shape

SAFETY_BYTES = 256 * 2**20  # "auto": free memory minus this; plans keep allocator headroom too (core/budget.py)
HELD_STEP = 64 * 2**20  # memory held across calls is budgeted in steps of at most this (a plan per step, not per byte)
HELD_STEPS_PER_BUDGET = 16  # ... and of at most 1/16 of the budget, so small budgets are not eaten by the rounding
FREE_STEPS_PER_DOUBLING = 8  # "auto" plans for free memory rounded down to one of 8 steps per doubling (~9%)
CLIP_TOKENS = 77  # the preview's prompt length: one CLIP chunk (SD1.5, SDXL)
ESTIMATE_MARGIN = 1.1  # what the patched model tells ComfyUI: the predicted peak times this
# ComfyUI runs cond and uncond in one call while memory_required(batched shape) x this < free memory
# (comfy/samplers.py, _calc_cond_batch), else one after the other
COMFY_BATCH_FACTOR = 1.5
# ComfyUI's attention kernels that hold the whole (heads x queries x keys) score matrix
_SCORE_KERNELS = ("attention_sub_quad", "attention_split", "attention_basic")


def attention_laws() -> WorkingSets:
    """The working-set laws of the attention ComfyUI runs in this process (chosen at its start from
    the device and flags): PyTorch SDPA, xformers, flash and sage attention never materialise scores."""
    import comfy.ldm.modules.attention as attention

    return SUB_QUADRATIC if attention.optimized_attention.__name__ in _SCORE_KERNELS else SDPA


def workload_for(x: Tensor, context: Tensor | None, frames: int | None = None, video_norm: bool = False) -> Workload:
    """video_norm: the call runs in ADE's GroupNorm-over-videos mode (nodes/video_norm.py)."""
    batch = x.shape[0]
    return Workload(batch=batch, frames=frames or max(1, batch // 2), height=x.shape[-2], width=x.shape[-1],
                    context_tokens=context.shape[1] if context is not None and context.ndim == 3 else CLIP_TOKENS,
                    dtype_bytes=x.element_size(), video_norm=video_norm)


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


def make_plan(shape: UNetShape, work: Workload, budget: int, held: int, set_budget: int,
              offload: bool = False) -> Plan:
    """The plan for a forward of `work`: the one function the run and the node's preview both use.
    offload: skip offload may be planned (offload_available)."""
    try:
        return plan(shape, work, max(budget, 0), attention_laws(), offload=offload)
    except BudgetError as e:
        if not held:
            raise
        raise BudgetError(f"{e}, after {format_bytes(held)} held by Step Rehash's cache (budget "
                          f"{format_bytes(set_budget)})") from None


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
             frames: int | None = None) -> tuple:
        tokens = context.shape[1] if context is not None else 0
        return tuple(x.shape), x.dtype, x.device.type, tokens, _video_length(unet), video_norm, frames, budget

    def __call__(self, unet, x: Tensor, context: Tensor | None, log, held_bytes: int = 0,
                 video_norm: bool = False, frames: int | None = None) -> SliceConfig:
        budget, held = self.budget(x.device, held_bytes)
        key = self.last_key = self._key(unet, x, context, budget, video_norm, frames)
        if key not in self.plans:
            family = families.family_of(unet)
            if family in (families.SVD, families.WAN):  # the family's own laws (nodes/families.py)
                tokens = context.shape[1] if context is not None and context.ndim == 3 else None
                chosen = families.plan_for(family, unet, tuple(x.shape), x.element_size(), budget, attention_laws(),
                                           tokens, frames)
            else:
                chosen = make_plan(unet_shape(unet), workload_for(x, context, _video_length(unet), video_norm),
                                   budget, held, self.budget_bytes, offload_available(x.device))
            self.plans[key] = chosen
            held_text = f" after {format_bytes(held)} held by Step Rehash's cache" if held else ""
            logger.info(f"Streamline Memory Budget ({format_bytes(budget)}{held_text} for {tuple(x.shape)}): "
                        f"{families.plan_text(chosen)}")
        return self.plans[key].config

    def settle(self, unet, x: Tensor, context: Tensor | None, config: SliceConfig, held_bytes: int = 0,
               video_norm: bool = False, frames: int | None = None) -> None:
        """After an out-of-memory retry: inputs shaped like `x`, at the budget the failed forward was
        planned for, use `config` for the rest of the run."""
        key = self.last_key or self._key(unet, x, context, self.budget(x.device, held_bytes)[0], video_norm, frames)
        family = families.family_of(unet)
        if family in (families.SVD, families.WAN):
            self.plans[key] = Plan(config, *families.peaks_for(family, unet, x, context, config, attention_laws(),
                                                                frames))
            return
        work = workload_for(x, context, _video_length(unet), video_norm)
        shape, laws = unet_shape(unet), attention_laws()
        self.plans[key] = Plan(config, predict_peak_bytes(shape, work, config, laws),
                               predict_peak_bytes(shape, work, None, laws),
                               plan_traffic(shape, work, config))


def _video_length(unet) -> int | None:
    for module in unet.modules():
        if type(module).__name__ == "VanillaTemporalModule":
            length = getattr(getattr(module, "temporal_transformer", None), "video_length", None)
            if isinstance(length, int) and length > 0:
                return length
    return None


# -- the UNet the run will see ---------------------------------------------------------------------------


def ade_motion_models(model) -> list:
    """AnimateDiff-Evolved's motion models attached to a MODEL (it injects them when sampling starts)."""
    patchers = getattr(model, "additional_models", {}).get("ADE", [])
    return [p.model for p in patchers if hasattr(getattr(p, "model", None), "down_blocks")]


def _inject(blocks: tuple[Block, ...], motion_blocks: list) -> tuple[Block, ...]:
    """ADE's injection rule (AnimateDiffModel._inject) on described blocks: one motion module per UNet
    block in order, after its last spatial transformer, else after its first ResBlock, else none."""
    modules = [m for block in motion_blocks if block is not None for m in block.motion_modules]
    out = []
    for block in blocks:
        kinds = [layer.kind for layer in block.layers]
        at = len(kinds) - kinds[::-1].index("attn") if "attn" in kinds else \
            kinds.index("res") + 1 if "res" in kinds else None
        layers = list(block.layers)
        if at is not None and modules:
            channels = layers[at - 1].channels_out
            layers.insert(at, Layer("motion", channels, channels, _heads(modules.pop(0))))
        out.append(Block(tuple(layers), block.skip_channels))
    return tuple(out)


def planned_shape(unet, motion_models: list) -> UNetShape:
    """The UNet as its forward will run: as it is, or, while AnimateDiff-Evolved's motion models
    (`ade_motion_models`) are not injected yet, with them where ADE will put them."""
    shape = unet_shape(unet)
    if any(is_ade_motion_module(m) for m in unet.modules()):
        return shape
    for mm in motion_models:
        inputs = _inject(shape.input_blocks, list(mm.down_blocks or []))
        middle = _inject((shape.middle,), [mm.mid_block])[0]
        outputs = _inject(shape.output_blocks, list(mm.up_blocks or []))
        shape = UNetShape(shape.model_channels, inputs, middle, outputs, shape.out_channels)
    return shape


def frames_per_call(model, frames: int) -> int:
    """Frames one UNet call sees: the clip, or AnimateDiff-Evolved's context window when the clip is longer."""
    params = model.get_attachment("ADE_params") if hasattr(model, "get_attachment") else None
    contexts = getattr(getattr(params, "context_options", None), "contexts", None) or []
    length = getattr(contexts[0], "context_length", None) if contexts else None
    return min(frames, length) if isinstance(length, int) and length > 0 else frames


def prompt_tokens(model) -> int:
    """Cross-attention tokens of the model's prompts, for the preview: TinyVideo's word slots, else one
    CLIP chunk."""
    from ..tinyvideo import model as tinyvideo

    get = getattr(model, "get_attachment", None)
    return len(tinyvideo.SLOTS) if get is not None and get(tinyvideo.PROMPT_ATTACHMENT) is not None else CLIP_TOKENS


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

    def family_estimate(self, family: str, unet, input_shape, state, device) -> int:
        """SVD or Wan: the peak of one call with the node's slicing, or with the plan the run will make.
        SVD's estimate takes the batch as one video (its frames are the batch; two videos of half the
        frames differ only in the small temporal-attention scores)."""
        dtype_bytes = torch.empty(0, dtype=compute_dtype(self.base_model)).element_size()
        frames = input_shape[0] if family == families.SVD else None
        laws = attention_laws()
        config = state.config
        if state.planner is not None:
            try:
                return families.plan_for(family, unet, tuple(input_shape), dtype_bytes,
                                         state.planner.budget(device, 0, self.patcher())[0], laws, None,
                                         frames).predicted_peak_bytes
            except ValueError:
                config = SliceConfig(1, 1, token_chunk=1)
        shaped = families._shaped(input_shape, dtype_bytes)
        context = families._shaped((input_shape[0], 1 if family == families.SVD else families.WAN_TEXT_TOKENS, 1),
                                   dtype_bytes)
        return families.peaks_for(family, unet, shaped, context, config, laws, frames)[0]

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
        family = families.family_of(unet)
        if family in (families.SVD, families.WAN):
            return int(self.family_estimate(family, unet, input_shape, state, device) * ESTIMATE_MARGIN)
        shape = planned_shape(unet, self.motion_models)
        dtype_bytes = torch.empty(0, dtype=compute_dtype(self.base_model)).element_size()
        work = Workload(batch=input_shape[0], frames=max(1, input_shape[0] // 2), height=input_shape[-2],
                        width=input_shape[-1], dtype_bytes=dtype_bytes)
        config = state.config
        if state.planner is not None:  # the plan the run will make, offload included where it pays
            try:
                config = plan(shape, work, state.planner.budget(device, 0, self.patcher())[0], attention_laws(),
                              offload=offload_available(device)).config
            except ValueError:
                config = SliceConfig(1, 1, offload_skips=offload_available(device),
                                     offload_features=offload_available(device))
        return int(predict_peak_bytes(shape, work, config, attention_laws()) * ESTIMATE_MARGIN)


class MemoryBudget(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamlineMemoryBudget",
            display_name="Streamline Memory Budget",
            category="Streamline",
            description="Streamline Model Patch with slices chosen to fit a memory budget: the largest (fastest) "
            "slices whose predicted peak activation fits, planned at run time for the actual latent. Models it "
            "cannot plan for (families other than SD/SDXL UNets with AnimateDiff, SVD and Wan) run unchanged, with "
            "ComfyUI's own memory estimate.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch, e.g. the output of AnimateDiff-Evolved's nodes."),
                io.Float.Input("budget_gb", display_name="budget (GiB)", default=0.0, min=0.0, max=1024.0, step=0.05,
                               round=0.01,
                               tooltip="Activation memory budget in GiB (1 GiB = 2^30 bytes; weights not included). "
                               "0 = auto: the memory free on the device when sampling runs, minus 256 MiB."),
                io.Int.Input("width", default=512, min=64, max=8192, step=8, tooltip="For the plan shown on the node."),
                io.Int.Input("height", default=512, min=64, max=8192, step=8, tooltip="For the plan shown on the node."),
                io.Int.Input("frames", default=16, min=1, max=4096, tooltip="For the plan shown on the node."),
            ],
            outputs=[io.Model.Output(tooltip="The model with budget-planned slicing (a clone)."),
                     io.String.Output("plan", display_name="plan",
                                      tooltip="The plan for width x height x frames, as shown on the node.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, budget_gb: float, width: int, height: int, frames: int) -> io.NodeOutput:
        budget = int(budget_gb * 2**30)
        source = f"Streamline Memory Budget ({format_bytes(budget) if budget else 'auto'})"
        patched = apply_streamline(model, SliceConfig(), planner=BudgetPlanner(budget), source=source,
                                   node_id=node_id_of(cls))
        text = preview_plan(model, budget, width, height, frames)
        logger.info(f"Streamline Memory Budget: {text}")
        return io.NodeOutput(patched, text, ui=ui.PreviewText(text))


def preview_plan(model, budget: int, width: int, height: int, frames: int) -> str:
    """The plan the run makes for a width x height x frames clip with CFG batched (a prompt of one CLIP
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
    if family in (families.SVD, families.WAN):
        dm = model.model.diffusion_model
        latent = families.preview_latent(family, dm, width, height, frames)
        try:
            chosen = families.plan_for(family, dm, latent, dtype_bytes, planned, attention_laws(), None,
                                       frames if family == families.SVD else None)
        except BudgetError as e:
            return f"budget {budget_text}: {e}"
        return (f"budget {budget_text}, {width}x{height}x{frames} with CFG batched ({family}, latent "
                f"{'x'.join(map(str, latent))}): {families.plan_text(chosen)}")
    per_call = frames_per_call(model, frames)
    shape = planned_shape(model.model.diffusion_model, ade_motion_models(model))
    offload = offload_available(model.load_device)

    def plan_for(conds: int) -> Plan:
        work = Workload(batch=conds * per_call, frames=per_call, height=height // 8, width=width // 8,
                        context_tokens=prompt_tokens(model), dtype_bytes=dtype_bytes)
        return make_plan(shape, work, planned, 0, budget, offload)

    try:
        chosen = plan_for(2)
    except BudgetError as e:
        return f"budget {budget_text}: {e}"
    windows = f" in context windows of {per_call} frames" if per_call < frames else ""
    return (f"budget {budget_text}, {width}x{height}x{frames}{windows} with CFG: {chosen.text()}; "
            f"{cond_batching(model.load_device, chosen, plan_for, model)}")


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
