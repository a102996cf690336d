"""A guard against host drift: fingerprints of the ComfyUI and AnimateDiff-Evolved functions the pack mirrors.

The sliced forward repeats what some host functions do (UNetModel._forward, forward_timestep_embed's
dispatch, apply_control's use, ResBlock._forward and SpatialTransformer.forward for ADE's
GroupNorm-over-videos mode, ADE's motion-module forward and its whole-video GroupNorm). When the host
changes one of them, the pack may no longer compute what the host computes. Each function's source
is fingerprinted; the table below holds the fingerprints of the hosts the exactness tests passed on.
A host whose function differs gets one log line naming it and the command that checks the pack on
that install. `python tools/host_fingerprints.py` prints the table for the host it finds.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from functools import lru_cache
from typing import Callable

TESTED_HOSTS = "ComfyUI 0.3.64 (a125cd84) with ComfyUI-AnimateDiff-Evolved 1.5.7 (d8d163c)"
CHECK_COMMAND = ("COMFYUI_PATH=<your ComfyUI> python -m pytest tests/test_unet_exact.py tests/test_sampling_exact.py "
                 "tests/test_video_norm.py tests/test_motion_families.py (in the pack's folder)")

# function -> fingerprint of its source on TESTED_HOSTS
RECORDED = {
    "comfy UNetModel._forward": "f725b54e2a27b52e",
    "comfy forward_timestep_embed": "9d5288c3a1191ca4",
    "comfy apply_control": "036e8c11633af31d",
    "comfy ResBlock._forward": "0365f931929f030a",
    "comfy SpatialTransformer.forward": "19bbcec1db675d65",
    "ADE forward_timestep_embed_patch_ade": "5db59f3f67fd2740",
    "ADE VanillaTemporalModule.forward": "0b9438a3ea69df5e",
    "ADE TemporalTransformer3DModel.forward": "67b1583e9233dab5",
    "ADE groupnorm_mm_factory": "f4c0a88b833d41c4",
}


def source_fingerprint(source: str) -> str:
    """Hash of source text, blank lines and indentation-only changes ignored."""
    lines = [line.strip() for line in source.splitlines()]
    return hashlib.sha256("\n".join(line for line in lines if line).encode()).hexdigest()[:16]


@lru_cache(maxsize=None)
def fingerprint(function: Callable) -> str:
    return source_fingerprint(inspect.getsource(function))


def comfy_functions() -> dict[str, Callable]:
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules import openaimodel

    return {
        "comfy UNetModel._forward": openaimodel.UNetModel._forward,
        "comfy forward_timestep_embed": openaimodel.forward_timestep_embed,
        "comfy apply_control": openaimodel.apply_control,
        "comfy ResBlock._forward": openaimodel.ResBlock._forward,
        "comfy SpatialTransformer.forward": SpatialTransformer.forward,
    }


def ade_functions(transformer_options: dict) -> dict[str, Callable]:
    """ADE's functions, found through what ADE put into this UNet call (ComfyUI imports ADE under a
    folder name the pack cannot know): its dispatch patch and the motion-module class it names."""
    found: dict[str, Callable] = {}
    for cls, handler in transformer_options.get("patches", {}).get("forward_timestep_embed_patch", []):
        if cls.__name__ != "VanillaTemporalModule":
            continue
        motion_module = sys.modules.get(cls.__module__)
        sampling = None
        if handler.__module__.partition(".")[0] != __name__.partition(".")[0]:  # not the pack's own (TinyVideo's)
            try:  # ADE's package, under whatever name ComfyUI imported it
                sampling = importlib.import_module(handler.__module__.rsplit(".", 1)[0] + ".sampling")
            except ImportError:
                pass
            found["ADE forward_timestep_embed_patch_ade"] = handler
        found["ADE VanillaTemporalModule.forward"] = cls.forward
        transformer = getattr(motion_module, "TemporalTransformer3DModel", None)
        if transformer is not None:
            found["ADE TemporalTransformer3DModel.forward"] = transformer.forward
        factory = getattr(sampling, "groupnorm_mm_factory", None)
        if factory is not None:
            found["ADE groupnorm_mm_factory"] = factory
    return found


def changed(functions: dict[str, Callable], recorded: dict[str, str] = RECORDED) -> list[str]:
    out = []
    for name, function in functions.items():
        try:
            current = fingerprint(function)
        except (OSError, TypeError):  # no source (compiled, frozen): cannot be checked
            current = "unknown"
        if recorded.get(name) != current:
            out.append(name)
    return out


def warn_on_drift(log, transformer_options: dict, recorded: dict[str, str] = RECORDED) -> None:
    """Log once per function that differs from the tested hosts' (log: a LogOnce)."""
    functions = {**comfy_functions(), **ade_functions(transformer_options)}
    for name in changed(functions, recorded):
        log.warn(f"host-drift-{name}", f"Streamline: {name} differs from the one the pack's exactness tests passed "
                 f"on ({TESTED_HOSTS}); the sliced forward mirrors it, so its output may differ from ComfyUI's. "
                 f"Check this install with: {CHECK_COMMAND}")
