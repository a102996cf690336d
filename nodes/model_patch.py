"""Streamline Model Patch: attach the exact Feature Slicer + Operator Grouping to a MODEL clone.

The patch is a DIFFUSION_MODEL wrapper plus a small state object in transformer_options. It takes
effect at every UNet call, on the layers present at that moment, so it sees AnimateDiff-Evolved's
motion modules, which ADE injects only when sampling starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import comfy.patcher_extension
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io
from torch import Tensor

from ..core.slicing import SliceConfig
from .streamlined_unet import LogOnce, make_streamline_wrapper

STATE_KEY = "streamline"
WRAPPER_KEY = "streamline"


@dataclass
class StreamlineState:
    """The patched model's slicing; `config` becomes finer if a forward runs out of memory."""

    config: SliceConfig
    log: LogOnce = field(default_factory=LogOnce)
    # Memory Budget: picks the config per input shape (nodes/memory_budget.py); None: use `config`
    planner: Callable | None = None

    def config_for(self, unet, x: Tensor, context: Tensor | None, held_bytes: int = 0) -> SliceConfig:
        """held_bytes: memory other parts of the pack keep alive across calls (Step Rehash's cache),
        which a planned budget must leave to them."""
        return self.planner(unet, x, context, self.log, held_bytes) if self.planner is not None else self.config

    def settle(self, config: SliceConfig, unet, x: Tensor, context: Tensor | None, held_bytes: int = 0) -> None:
        """Use `config` from now on (after an out-of-memory retry): for inputs shaped like `x` when a
        planner chooses per shape (other shapes keep their own plans), else for every input."""
        if self.planner is not None and hasattr(self.planner, "settle"):
            self.planner.settle(unet, x, context, config, held_bytes)
        else:
            self.config, self.planner = config, None


def _state_from(transformer_options: dict) -> StreamlineState | None:
    return transformer_options.get(STATE_KEY)


streamline_wrapper = make_streamline_wrapper(_state_from)


def apply_streamline(model: ModelPatcher, config: SliceConfig, planner: Callable | None = None) -> ModelPatcher:
    """A clone of `model` whose UNet runs sliced and grouped; `model` itself is left as it was.
    The clone also tells ComfyUI's memory management what a forward needs now (object patch of
    BaseModel.memory_required), so weights stay loaded and CFG stays batched when they fit."""
    from .memory_budget import MemoryEstimate

    patched = model.clone()
    state = StreamlineState(config, planner=planner)
    patched.model_options["transformer_options"][STATE_KEY] = state
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, streamline_wrapper)
    patched.add_object_patch("memory_required", MemoryEstimate(patched.model, patched.model_options))
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY,
                                 load_with_streamline_estimate)
    return patched


def load_with_streamline_estimate(executor, model: ModelPatcher, noise_shape, conds, model_options=None, **kwargs):
    """PREPARE_SAMPLING wrapper. ComfyUI estimates a run's memory before it loads the model, i.e.
    before the memory_required object patch is in place: load the model first with the streamlined
    estimate, so the weights ComfyUI keeps on the device are decided with it (the executor then finds
    the model loaded and its estimate patched)."""
    import comfy.model_management

    estimate = model.object_patches.get("memory_required")
    if estimate is not None:
        needed = estimate([noise_shape[0] * 2] + list(noise_shape[1:]))
        minimum = estimate([noise_shape[0]] + list(noise_shape[1:]))
        comfy.model_management.load_models_gpu([model], memory_required=needed, minimum_memory_required=minimum)
    return executor(model, noise_shape, conds, model_options=model_options, **kwargs)


def remove_streamline(model: ModelPatcher) -> ModelPatcher:
    """A clone of `model` without the patch."""
    plain = model.clone()
    plain.model_options["transformer_options"].pop(STATE_KEY, None)
    plain.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    plain.object_patches.pop("memory_required", None)
    plain.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY)
    return plain


class StreamlineModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamlineModelPatch",
            display_name="Streamline Model Patch",
            category="Streamline",
            description="Exact Feature Slicer + Operator Grouping (Streamlined Inference): the UNet and the "
            "AnimateDiff motion modules run in slices, so peak memory drops while the output stays the same.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch, e.g. the output of AnimateDiff-Evolved's nodes."),
                io.Int.Input("frame_chunk", default=0, min=0, max=4096, step=1,
                             tooltip="Samples (batch x frames, CFG counts twice) per slice for per-frame layers "
                             "at full resolution; deeper levels use larger slices. 0 = automatic (slices of about 64K tokens, "
                             "large enough to keep a GPU busy; for a given memory budget use Streamline Memory Budget)."),
                io.Int.Input("spatial_chunk", default=0, min=0, max=1 << 20, step=64,
                             tooltip="Pixel positions per slice inside motion modules at full resolution. "
                             "0 = automatic (about 64K tokens per slice: 2048 positions of a 32-sample batch)."),
                io.Boolean.Input("scale_with_level", default=True, optional=True,
                                 tooltip="Grow slices at deeper (smaller) UNet levels so each slice holds about "
                                 "as many values as at full resolution. Off: the same sizes at every level."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model (a clone; the input model is unchanged).")],
        )

    @classmethod
    def execute(cls, model: ModelPatcher, frame_chunk: int, spatial_chunk: int, scale_with_level: bool = True) -> io.NodeOutput:
        config = SliceConfig(frame_chunk=frame_chunk, spatial_chunk=spatial_chunk, scale_with_level=scale_with_level)
        return io.NodeOutput(apply_streamline(model, config))
