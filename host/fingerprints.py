"""The host verdict: run sliced where the pack is known to compute what the host computes, else the host's own code.

The sliced forwards repeat what some host functions do (UNetModel._forward, forward_timestep_embed's
dispatch, apply_control's use, ResBlock._forward, SpatialTransformer.forward; SVD's VideoResBlock and
SpatialVideoTransformer; Wan's attention block and forward_orig; ADE's motion-module forward and its
whole-video GroupNorm). Each function's source is fingerprinted, and RECORDED holds the fingerprints of the
hosts the exactness tests passed on. For each group of functions one forward mirrors there is one verdict
per process, and only two outcomes:

- every function matches a recorded fingerprint: the pack runs sliced, quietly;
- one does not (a host the pack has not recorded): the pack checks itself on this install before first use,
  with a self-check the group provides (a tiny random model of the family run through the pack's path and
  through ComfyUI's, in float64 where the host's kernels take it, about a second on a CPU). Equal: it runs sliced, with one info line.
  Not equal (or the check itself fails): that group runs ComfyUI's own code, with one warning that gives
  the command that checks the install.

`python tools/host_fingerprints.py` prints the table for the host it finds.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from .log import logger

HOST_0_3_64 = "ComfyUI 0.3.64 (a125cd84)"
HOST_0_33_0 = "ComfyUI 0.33.0 (783545f6)"
ADE_1_5_7 = "ComfyUI-AnimateDiff-Evolved 1.5.7 (d8d163c)"
TESTED_HOSTS = f"{HOST_0_33_0} and {HOST_0_3_64}, with {ADE_1_5_7}"
CHECK_COMMAND = ("COMFYUI_PATH=<your ComfyUI> python -m pytest tests/test_unet_exact.py tests/test_sd15_real_width.py "
                 "tests/test_sampling_exact.py "
                 "tests/test_video_norm.py tests/test_motion_families.py tests/test_svd_exact.py "
                 "tests/test_wan_exact.py (in the pack's folder)")
# relative difference (float64) below which a self-check counts as equal: the sliced path and the host's differ
# only in the order of float reductions, ~1e-15 in float64; a changed host function differs by far more
SELF_CHECK_TOLERANCE = 1e-10

# function -> {fingerprint of its source: the hosts the exactness tests passed on with it}
RECORDED: dict[str, dict[str, str]] = {
    "comfy UNetModel._forward": {"f246204b0afdf752": HOST_0_33_0, "f725b54e2a27b52e": HOST_0_3_64},
    "comfy forward_timestep_embed": {"e913f1117b7ef6cf": HOST_0_33_0, "9d5288c3a1191ca4": HOST_0_3_64},
    "comfy apply_control": {"036e8c11633af31d": f"{HOST_0_33_0}, {HOST_0_3_64}"},
    "comfy ResBlock._forward": {"0365f931929f030a": f"{HOST_0_33_0}, {HOST_0_3_64}"},
    "comfy SpatialTransformer.forward": {"19bbcec1db675d65": f"{HOST_0_33_0}, {HOST_0_3_64}"},
    "comfy VideoResBlock.forward": {"8313c12ad5e530af": f"{HOST_0_33_0}, {HOST_0_3_64}"},
    "comfy SpatialVideoTransformer.forward": {"65abe8dd9c86cda1": f"{HOST_0_33_0}, {HOST_0_3_64}"},
    "comfy WanAttentionBlock.forward": {"8bea6988c828b0a8": HOST_0_33_0, "d7832c9c3c9bee7d": HOST_0_3_64},
    "comfy WanSelfAttention.forward": {"d82a9df120021a94": HOST_0_33_0, "1874b02fb0fc0c7f": HOST_0_3_64},
    "comfy WanT2VCrossAttention.forward": {"7bb1fba222c7a7ca": f"{HOST_0_33_0}, {HOST_0_3_64}"},
    "comfy WanI2VCrossAttention.forward": {"aa5380b8583992a2": HOST_0_33_0, "bf7a551d05eeb8f6": HOST_0_3_64},
    "comfy repeat_e": {"8fe20fbbb055f096": f"{HOST_0_33_0}, {HOST_0_3_64}"},
    "comfy WanModel.forward_orig": {"3dbb3bbc07da60ec": HOST_0_33_0, "32cee57e700e7875": HOST_0_3_64},
    "ADE forward_timestep_embed_patch_ade": {"5db59f3f67fd2740": ADE_1_5_7},
    "ADE VanillaTemporalModule.forward": {"0b9438a3ea69df5e": ADE_1_5_7},
    "ADE TemporalTransformer3DModel.forward": {"67b1583e9233dab5": ADE_1_5_7},
    "ADE groupnorm_mm_factory": {"f4c0a88b833d41c4": ADE_1_5_7},
}


def source_fingerprint(source: str) -> str:
    """Hash of source text, blank lines and indentation-only changes ignored."""
    lines = [line.strip() for line in source.splitlines()]
    return hashlib.sha256("\n".join(line for line in lines if line).encode()).hexdigest()[:16]


@lru_cache(maxsize=None)
def fingerprint(function: Callable) -> str:
    try:
        return source_fingerprint(inspect.getsource(function))
    except (OSError, TypeError):  # no source (compiled, frozen): cannot be recognised
        return "unknown"


def source_mentions(function: Callable, text: str, default: bool) -> bool:
    """Whether a host function's source contains `text` (what a host version calls there, e.g. a patch key);
    `default` where it has no source to read (the host verdict's self-check then decides)."""
    try:
        return text in inspect.getsource(function)
    except (OSError, TypeError):
        return default


def comfy_functions() -> dict[str, Callable]:
    """What the UNet forward (families/unet/forward.py, families/svd/forward.py) mirrors of ComfyUI."""
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


def unrecorded(functions: dict[str, Callable], recorded: dict[str, dict[str, str]] | None = None) -> list[str]:
    """The functions whose source matches no recorded host's."""
    recorded = RECORDED if recorded is None else recorded
    return [name for name, function in functions.items() if fingerprint(function) not in recorded.get(name, {})]


@dataclass(frozen=True)
class Verdict:
    """What the pack does with one group of mirrored functions on this install."""

    sliced: bool
    unrecorded: tuple[str, ...]  # the group's functions this host changed (empty: a recorded host)
    difference: float | None = None  # the self-check's relative difference (None: not run, or it failed)
    failure: str | None = None  # why the self-check could not run


# (group, its functions' fingerprints) -> verdict: one per process and install
_VERDICTS: dict[tuple, Verdict] = {}


def verdict(group: str, functions: dict[str, Callable], self_check: Callable[[], float] | None,
            recorded: dict[str, dict[str, str]] | None = None, tolerance: float = SELF_CHECK_TOLERANCE) -> Verdict:
    """Whether the forward mirroring `functions` ("group", e.g. "UNet") may run sliced on this host.
    self_check() (None: there is none) returns the relative difference between the pack's path and the host's on a tiny float64
    model; it runs once per process, and only when a function is unrecorded. Logs once per verdict."""
    changed = tuple(unrecorded(functions, recorded))
    if not changed:
        return Verdict(True, ())
    key = (group, tuple(sorted((name, fingerprint(f)) for name, f in functions.items())))
    if key in _VERDICTS:
        return _VERDICTS[key]
    # the self-check runs the pack's path, which asks for this verdict: while it runs, that path is sliced
    _VERDICTS[key] = Verdict(True, changed)
    started = time.perf_counter()
    try:
        if self_check is None:
            raise LookupError("the pack has no self-check for it")
        difference, failure = float(self_check()), None
    except Exception as e:  # noqa: BLE001 — any failure of the check is a "not equal"
        difference, failure = None, f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - started
    sliced = difference is not None and difference <= tolerance
    result = _VERDICTS[key] = Verdict(sliced, changed, difference, failure)
    names = ", ".join(changed)
    if sliced:
        logger.info(f"Streamline: this host's {names} differ from the ones the pack recorded ({TESTED_HOSTS}); its "
                    f"self-check on this install ({group}, {seconds:.2f} s) gave ComfyUI's output "
                    f"(relative difference {difference:.1e}): {group} runs sliced.")
    else:
        outcome = f"failed ({failure})" if failure else f"differs from ComfyUI's by {difference:.1e} (relative)"
        logger.warning(f"Streamline: this host's {names} differ from the ones the pack recorded ({TESTED_HOSTS}), "
                       f"and its self-check on this install ({group}) {outcome}: {group} runs ComfyUI's own "
                       f"code, unsliced. Check this install with: {CHECK_COMMAND}")
    return result


def relative_difference(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs| (float64)."""
    ours, theirs = ours.double(), theirs.double()
    scale = theirs.abs().max().clamp_min(1e-300)
    return float(((ours - theirs).abs().max() / scale).item())
