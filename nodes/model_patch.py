"""Streamline Model Patch: attach the exact Feature Slicer + Operator Grouping to a MODEL clone.

The patch is a DIFFUSION_MODEL wrapper plus a small state object in transformer_options. It takes
effect at every UNet call, on the layers present at that moment, so it sees AnimateDiff-Evolved's
motion modules, which ADE injects only when sampling starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import comfy.patcher_extension
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from ..core.slicing import SliceConfig
from .streamlined_unet import LogOnce, make_streamline_wrapper

STATE_KEY = "streamline"
WRAPPER_KEY = "streamline"


@dataclass
class StreamlineState:
    config: SliceConfig
    log: LogOnce = field(default_factory=LogOnce)


def _state_from(transformer_options: dict) -> tuple[SliceConfig, LogOnce] | None:
    state = transformer_options.get(STATE_KEY)
    return None if state is None else (state.config, state.log)


streamline_wrapper = make_streamline_wrapper(_state_from)


def apply_streamline(model: ModelPatcher, config: SliceConfig) -> ModelPatcher:
    """A clone of `model` whose UNet runs sliced and grouped; `model` itself is left as it was."""
    patched = model.clone()
    patched.model_options["transformer_options"][STATE_KEY] = StreamlineState(config)
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, streamline_wrapper)
    return patched


def remove_streamline(model: ModelPatcher) -> ModelPatcher:
    """A clone of `model` without the patch."""
    plain = model.clone()
    plain.model_options["transformer_options"].pop(STATE_KEY, None)
    plain.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
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
                             "at full resolution; deeper levels use larger slices. 0 = automatic."),
                io.Int.Input("spatial_chunk", default=0, min=0, max=1 << 20, step=64,
                             tooltip="Pixel positions per slice inside motion modules at full resolution. "
                             "0 = automatic."),
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
