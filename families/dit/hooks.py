"""ComfyUI's DiT block-replace hook (`patches_replace["dit"][(kind, i)]`), as the pack installs and removes its
own block replacements: blocks another node already replaces keep that replacement; a DIFFUSION_MODEL wrapper
(under its key) hands the replacements what they need of each call.

API (a block is named by its hook key, (kind, index): ("double_block", 3), ("single_block", 0)):
- block_keys(count, kind=DOUBLE) -> [(kind, 0), ..., (kind, count - 1)];
- block_hooks(transformer_options) -> the "dit" replacements of a model's (or a call's) options;
- install_block_hooks(model, keys, make_hook, hook_type, wrapper_key, call_wrapper) -> (keys replaced, kept);
- install_sliced_blocks(model, family, reason, keys, make_hook, hook_type, wrapper_key, call_wrapper) -> keys
  replaced: a family's whole install (nothing and one info line where `reason` says why; one warning naming the
  blocks another node replaces);
- remove_block_hooks(model, hook_type, wrapper_key);
- foreign_blocks(transformer_options, first, last, hook_type, kind=DOUBLE) -> indices not run by hook_type.
"""
from __future__ import annotations

from typing import Callable, Iterable

import comfy.patcher_extension

DOUBLE = "double_block"
SINGLE = "single_block"
BLOCK = DOUBLE  # the kind a single-stream DiT (Wan) hooks its blocks under

BlockKey = tuple[str, int]


def block_keys(count: int, kind: str = DOUBLE) -> list[BlockKey]:
    """The hook keys of `count` blocks of one kind."""
    return [(kind, index) for index in range(count)]


def block_hooks(transformer_options: dict) -> dict:
    """The block replacements of a model's options (or of a call's transformer_options)."""
    return transformer_options.get("patches_replace", {}).get("dit", {})


def install_block_hooks(model, keys: Iterable[BlockKey], make_hook: Callable[[BlockKey], object], hook_type: type,
                        wrapper_key: str, call_wrapper) -> tuple[list[BlockKey], list[BlockKey]]:
    """Replace each block `keys` names on `model` (a clone the caller owns) with make_hook(key), except those
    another node replaces already (not a `hook_type`), and wrap its diffusion model's call with `call_wrapper`
    under `wrapper_key`. Returns (the keys replaced, the keys kept)."""
    replaced = block_hooks(model.model_options.get("transformer_options", {}))
    patched, kept = [], []
    for key in keys:
        earlier = replaced.get(key)
        if earlier is not None and not isinstance(earlier, hook_type):
            kept.append(key)
            continue
        model.set_model_patch_replace(make_hook(key), "dit", key[0], key[1])
        patched.append(key)
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, wrapper_key)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, wrapper_key, call_wrapper)
    return patched, kept


def install_sliced_blocks(model, family: str, reason: str | None, keys: Iterable[BlockKey],
                          make_hook: Callable[[BlockKey], object], hook_type: type, wrapper_key: str,
                          call_wrapper) -> list[BlockKey]:
    """A family's sliced blocks on `model` (a clone the caller owns): none where `reason` (why the pack leaves the
    model to ComfyUI) is given, one info line; else install_block_hooks, one warning naming the blocks another
    node already replaces (they run through that replacement, unsliced). Returns the keys replaced."""
    from ...host.log import logger

    if reason is not None:
        logger.info(f"Streamline: {reason}; {family} slicing not installed.")
        return []
    patched, kept = install_block_hooks(model, keys, make_hook, hook_type, wrapper_key, call_wrapper)
    if kept:
        named = [i for _, i in kept] if len({kind for kind, _ in kept}) == 1 else kept
        logger.warning(f"Streamline: {family} blocks {named} already have a block replacement (another node's); "
                       "they run through it, unsliced.")
    return patched


def remove_block_hooks(model, hook_type: type, wrapper_key: str) -> None:
    """Undo install_block_hooks on `model` (a clone the caller owns)."""
    dit = block_hooks(model.model_options.get("transformer_options", {}))
    for key in [k for k, v in dit.items() if isinstance(v, hook_type)]:
        del dit[key]
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, wrapper_key)


def foreign_blocks(transformer_options: dict, first: int, last: int, hook_type: type, kind: str = DOUBLE) -> list[int]:
    """Blocks first..last of `kind` whose replacement is not a `hook_type` (another node's, or none)."""
    dit = block_hooks(transformer_options)
    return [i for i in range(first, last + 1) if not isinstance(dit.get((kind, i)), hook_type)]
