"""Streamline Model Patch: attach the exact Feature Slicer + Operator Grouping to a MODEL clone.

The patch is a DIFFUSION_MODEL wrapper plus a small state object in transformer_options. It takes
effect at every UNet call, on the layers present at that moment, so it sees AnimateDiff-Evolved's
motion modules, which ADE injects only when sampling starts. An OUTER_SAMPLE wrapper gives every
sampling run its own copy of the state (as ComfyUI's EasyCache does): what a run learns (an
out-of-memory retry's finer slices, the Memory Budget's plans) lasts that run only.

Models the pack cannot slice (families other than those in families/registry.py) run exactly as ComfyUI
runs them: the wrappers hand their arguments on untouched, the memory estimate is ComfyUI's own, and
each run logs that once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import comfy.model_patcher
import comfy.patcher_extension
import torch.nn as nn
from comfy.model_patcher import ModelPatcher
from torch import Tensor

from ..core import offload
from ..core.slicing import SliceConfig
from ..families.registry import family_of, remove_slicing, unsupported_reason
from ..host.log import LogOnce
from ..host.options import (
    CALL_CONFIG_KEY, STREAMLINE_KEY as STATE_KEY, STREAMLINE_WRAPPER_KEY as WRAPPER_KEY,
)
from .budget import MemoryEstimate
from .report import RunReport, publish
from .slicing_call import make_streamline_wrapper

UNCHANGED_LOG_KEY = "model-unchanged"  # the one notice a run logs for a model the pack does not handle


def leaves_unchanged(state: "StreamlineState", diffusion_model: nn.Module) -> bool:
    """Whether the pack leaves this model to ComfyUI; says so once per run (in the run's log)."""
    # Memory Budget needs the model's laws as well as its sliced forward
    reason = unsupported_reason(diffusion_model, "plan" if state.planner is not None else "slice")
    if reason is not None:
        state.report.unchanged = f"{reason}; it ran unchanged (ComfyUI's own forward and memory estimate)."
        state.log.warn(UNCHANGED_LOG_KEY, f"Streamline: {reason}; running it unchanged (ComfyUI's own forward "
                       "and memory estimate).")
    return reason is not None


@dataclass
class StreamlineState:
    """The patched model's slicing; during a run, the run's copy may settle on finer slices."""

    config: SliceConfig
    log: LogOnce = field(default_factory=LogOnce)
    # Memory Budget: picks the config per input shape (techniques/budget.py); None: use `config`
    planner: Callable | None = None
    source: str = "Streamline Model Patch"  # the node, as the run's report names it
    node_id: str | None = None  # where the browser shows the run's report (the node's UNIQUE_ID)
    report: RunReport = field(default_factory=RunReport)  # what this run did (filled on the run's copy)

    def for_run(self, patcher=None) -> "StreamlineState":
        """The state one sampling run works on: the node's config, no plans yet, its own log (each run
        says its notices once) and its own report; `patcher` (the run's ModelPatcher): whose free memory an
        "auto" budget reads."""
        planner = self.planner.for_run(patcher) if hasattr(self.planner, "for_run") else self.planner
        return StreamlineState(self.config, LogOnce(), planner, self.source, self.node_id)

    def config_for(self, unet, x: Tensor, context: Tensor | None, held_bytes: int = 0,
                   video_norm: bool = False, video_length: int | None = None) -> SliceConfig:
        """held_bytes: memory other parts of the pack keep alive across calls (Step Rehash's cache),
        which a planned budget must leave to them; video_norm: ADE's GroupNorm-over-videos mode;
        video_length: SVD's frames per video."""
        if self.planner is None:
            return self.config
        return self.planner(unet, x, context, self.log, held_bytes, video_norm, video_length=video_length)

    def settle(self, config: SliceConfig, unet, x: Tensor, context: Tensor | None, held_bytes: int = 0,
               video_norm: bool = False, video_length: int | None = None) -> None:
        """Use `config` from now on (after an out-of-memory retry): for inputs shaped like `x` when a
        planner chooses per shape (other shapes keep their own plans), else for every input."""
        if self.planner is not None and hasattr(self.planner, "settle"):
            self.planner.settle(unet, x, context, config, held_bytes, video_norm, video_length=video_length)
        else:
            self.config, self.planner = config, None


def _state_from(transformer_options: dict) -> StreamlineState | None:
    return transformer_options.get(STATE_KEY)


streamline_wrapper = make_streamline_wrapper(_state_from, leaves_unchanged)


def run_with_own_state(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: the run samples with its own copy of the patch's state, in a copy of the
    guider's model options; the patched model's state is as it was when the run ends, however it ends."""
    guider = executor.class_obj
    original_options = guider.model_options
    state = original_options.get("transformer_options", {}).get(STATE_KEY)
    if state is None:
        return executor(*args, **kwargs)
    run_state = state.for_run(guider.model_patcher)
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    guider.model_options["transformer_options"][STATE_KEY] = run_state
    try:
        leaves_unchanged(run_state, guider.model_patcher.model.diffusion_model)  # said at the start of the run
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original_options
        offload.end_run()  # the run's pinned host buffers are unpinned and dropped
        report = run_state.report
        # a model left unchanged was logged at the start of the run: the node alone gets the report
        publish(report.text(run_state.source), run_state.node_id, log=report.unchanged is None)


_WRAPPERS = (
    (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, run_with_own_state),
    (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, streamline_wrapper),
)


def apply_streamline(model: ModelPatcher, config: SliceConfig, planner: Callable | None = None,
                     source: str = "Streamline Model Patch", node_id: str | None = None) -> ModelPatcher:
    """A clone of `model` whose UNet runs sliced and grouped; `model` itself is left as it was.
    The clone also tells ComfyUI's memory management what a forward needs now (object patch of
    BaseModel.memory_required), so weights stay loaded and CFG stays batched when they fit. Each run
    reports what it did in the log and, given the node's `node_id`, on that node."""
    patched = model.clone()
    patched.model_options["transformer_options"][STATE_KEY] = StreamlineState(config, planner=planner, source=source,
                                                                              node_id=node_id)
    for kind, wrapper in _WRAPPERS:
        patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    earlier = patched.object_patches.get("memory_required")  # another pack's, or this pack's from an earlier patch
    earlier = earlier.earlier_patch if isinstance(earlier, MemoryEstimate) else earlier
    family = family_of(patched.model.diffusion_model)
    attached = family.attached_models(patched) if family is not None else []  # ADE's motion models
    patched.add_object_patch("memory_required", MemoryEstimate(patched.model, patched.model_options, earlier,
                                                               attached, patched.load_device, patched))
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY,
                                 load_with_streamline_estimate)
    multigpu = getattr(comfy.patcher_extension.CallbacksMP, "ON_DEEPCLONE_MULTIGPU", None)  # ComfyUI 0.33
    if multigpu is not None:
        patched.remove_callbacks_with_key(multigpu, WRAPPER_KEY)
        patched.add_callback_with_key(multigpu, WRAPPER_KEY, estimate_for_device_clone)
    if family is not None:  # a DiT's blocks are sliced through the block-replace hook
        family.install_slicing(patched, dit_token_chunk)
    return patched


def estimate_for_device_clone(original: ModelPatcher, clone: ModelPatcher) -> None:
    """ON_DEEPCLONE_MULTIGPU callback (ComfyUI 0.33's MultiGPU CFG split): the per-device clone keeps the
    patch (its model options and wrappers are copied), and gets a memory estimate of its own, for its model and
    its load device, so each device's slices are planned for that device's memory."""
    estimate = original.object_patches.get("memory_required")
    if not isinstance(estimate, MemoryEstimate):
        return
    family = family_of(clone.model.diffusion_model)
    attached = family.attached_models(clone) if family is not None else []
    clone.add_object_patch("memory_required", MemoryEstimate(clone.model, clone.model_options, estimate.earlier_patch,
                                                             attached, clone.load_device, clone))


def dit_token_chunk(transformer_options: dict, x: Tensor, tokens_per_frame: int) -> int | None:
    """Tokens per slice for a DiT block: the slicing the streamline wrapper chose for this call (the
    Memory Budget's plan, or the node's), else the node's own; None without the patch's state."""
    from ..core.slicing import token_chunk_size

    state = transformer_options.get(STATE_KEY)
    if state is None:
        return None
    config = transformer_options.get(CALL_CONFIG_KEY, state.config)
    return token_chunk_size(config, batch=x.shape[0], tokens=x.shape[1], tokens_per_frame=tokens_per_frame,
                            dim=x.shape[2])


def load_with_streamline_estimate(executor, model: ModelPatcher, noise_shape, conds, model_options=None, **kwargs):
    """PREPARE_SAMPLING wrapper. ComfyUI estimates a run's memory before it loads the model, i.e.
    before the memory_required object patch is in place: load the model first with the streamlined
    estimate, so the weights ComfyUI keeps on the device are decided with it (the executor then finds
    the model loaded and its estimate patched). Models the pack does not slice are left to ComfyUI."""
    import comfy.model_management

    estimate = model.object_patches.get("memory_required")
    if estimate is not None and unsupported_reason(model.model.diffusion_model, "plan") is None:
        needed = estimate([noise_shape[0] * 2] + list(noise_shape[1:]))
        minimum = estimate([noise_shape[0]] + list(noise_shape[1:]))
        comfy.model_management.load_models_gpu([model], memory_required=needed, minimum_memory_required=minimum)
    return executor(model, noise_shape, conds, model_options=model_options, **kwargs)


def remove_streamline(model: ModelPatcher) -> ModelPatcher:
    """A clone of `model` without the patch."""
    plain = model.clone()
    plain.model_options["transformer_options"].pop(STATE_KEY, None)
    for kind, _ in _WRAPPERS:
        plain.remove_wrappers_with_key(kind, WRAPPER_KEY)
    earlier = getattr(plain.object_patches.pop("memory_required", None), "earlier_patch", None)
    if earlier is not None:
        plain.add_object_patch("memory_required", earlier)
    plain.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY)
    multigpu = getattr(comfy.patcher_extension.CallbacksMP, "ON_DEEPCLONE_MULTIGPU", None)
    if multigpu is not None:
        plain.remove_callbacks_with_key(multigpu, WRAPPER_KEY)
    remove_slicing(plain)
    return plain
