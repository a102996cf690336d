"""ComfyUI's DiT block-replace hook (`patches_replace["dit"][("double_block", i)]`), as the pack installs and
removes its own block replacements: blocks another node already replaces keep that replacement; a
DIFFUSION_MODEL wrapper (under its key) hands the replacements what they need of each call."""
from __future__ import annotations

from typing import Callable

import comfy.patcher_extension

BLOCK = "double_block"


def block_hooks(transformer_options: dict) -> dict:
    """The block replacements of a model's options (or of a call's transformer_options)."""
    return transformer_options.get("patches_replace", {}).get("dit", {})


def install_block_hooks(model, blocks: int, make_hook: Callable[[int], object], hook_type: type,
                        wrapper_key: str, call_wrapper) -> tuple[list[int], list[int]]:
    """Replace each of the `blocks` blocks of `model` (a clone the caller owns) with make_hook(index), except
    those another node replaces already (not a `hook_type`), and wrap its diffusion model's call with
    `call_wrapper` under `wrapper_key`. Returns (the indices replaced, the indices kept)."""
    replaced = block_hooks(model.model_options.get("transformer_options", {}))
    patched, kept = [], []
    for index in range(blocks):
        earlier = replaced.get((BLOCK, index))
        if earlier is not None and not isinstance(earlier, hook_type):
            kept.append(index)
            continue
        model.set_model_patch_replace(make_hook(index), "dit", BLOCK, index)
        patched.append(index)
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, wrapper_key)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, wrapper_key, call_wrapper)
    return patched, kept


def remove_block_hooks(model, hook_type: type, wrapper_key: str) -> None:
    """Undo install_block_hooks on `model` (a clone the caller owns)."""
    dit = block_hooks(model.model_options.get("transformer_options", {}))
    for key in [k for k, v in dit.items() if isinstance(v, hook_type)]:
        del dit[key]
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, wrapper_key)


def foreign_blocks(transformer_options: dict, first: int, last: int, hook_type: type) -> list[int]:
    """Blocks first..last whose replacement is not a `hook_type` (another node's, or none)."""
    dit = block_hooks(transformer_options)
    return [i for i in range(first, last + 1) if not isinstance(dit.get((BLOCK, i)), hook_type)]
