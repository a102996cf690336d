"""Streamline's DIFFUSION_MODEL wrapper: one diffusion-model call, sliced the way its family slices (the family
adapter's sliced forward in place of the model's, or the model's own forward with the call's slicing handed to
its block hooks), with the slicing the node or the Memory Budget chose, retried finer after an out-of-memory
error."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch.nn as nn

from ..core import offload
from ..families import registry as families
from ..host.log import logger
from ..host.oom import is_oom
from ..host.options import CALL_CONFIG_KEY, REHASH_KEY


def rehash_run(transformer_options: dict):
    """Step Rehash's state of this run, if it is on this model (read from its per-run holder, so it does not
    matter which of the two wrappers runs outside)."""
    return getattr(transformer_options.get(REHASH_KEY), "run", None)


def held_across_calls(transformer_options: dict) -> int:
    """Device memory Step Rehash keeps alive between calls (its caches), if it is on this model."""
    run = rehash_run(transformer_options)
    return run.held_bytes() if run is not None else 0


def unet_arguments(x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
    """UNetModel._forward's signature (the one the forward-swapping families' forwards share)."""
    return x, timesteps, context, y, control, {} if transformer_options is None else transformer_options, kwargs


def make_streamline_wrapper(get_state: Callable[[dict], "object | None"],
                            leaves_unchanged: Callable[["object", nn.Module], bool]):
    """A DIFFUSION_MODEL wrapper that runs the family's sliced forward in place of the model's (keeping any
    wrappers registered after it in the chain), or, for a family that slices inside the model's own forward
    (DiT block hooks), hands the call its slicing. get_state returns the patched model's state (with `.config`
    and `.log`), or None; leaves_unchanged(state, diffusion_model) says (and logs, once per run) that the pack
    does not slice this model. Whatever it does not handle, it hands on with the arguments exactly as it
    received them: every model family has its own forward signature. On an out-of-memory error the forward
    is retried with finer slices, which the (run's) state keeps."""

    def state_in(args: tuple, kwargs: dict):
        """The state, from transformer_options wherever the model's forward signature puts them."""
        for candidate in (kwargs.get("transformer_options"), *args, *kwargs.values()):
            state = get_state(candidate) if isinstance(candidate, dict) else None
            if state is not None:
                return state
        return None

    def wrapper(executor, *args, **kwargs):
        model = executor.class_obj
        state = state_in(args, kwargs)
        if state is None or leaves_unchanged(state, model):
            return executor(*args, **kwargs)
        family = families.family_of(model)
        if not family.swaps_forward:
            return hooked_call(executor, family, state, args, kwargs)
        return swapped_call(executor, family, state, args, kwargs)

    def swapped_call(executor, family, state, args: tuple, kwargs: dict):
        """A call whose forward the family's sliced forward replaces (UNet, SVD)."""
        import comfy.model_management
        import comfy.patcher_extension

        unet = executor.class_obj
        x, timesteps, context, y, control, transformer_options, call_kwargs = unet_arguments(*args, **kwargs)
        if not family.verdict_sliced():  # its one line is the verdict's
            return executor(*args, **kwargs)
        unknown = family.unknown_inputs(transformer_options, call_kwargs)
        if unknown:
            state.log.warn(f"unknown-{unknown}", f"Streamline: this UNet call has {', '.join(unknown)}, which the "
                           "sliced forward does not know; it runs ComfyUI's own forward, unsliced.")
            return executor(*args, **kwargs)
        kwargs = call_kwargs
        held = held_across_calls(transformer_options)
        video_norm_mode, video_length = family.call_mode(unet, x, kwargs, transformer_options)
        config = state.config_for(unet, x, context, held, video_norm_mode, video_length=video_length)
        report = getattr(state, "report", None)  # the run's (techniques/report.py)
        while True:
            oom = None
            forward, transfers = family.sliced_forward(unet, config, state.log, x)
            # the forward pops ControlNet residuals from their lists: each attempt gets its own lists
            attempt_control = {k: list(v) for k, v in control.items()} if isinstance(control, dict) else control
            try:
                peak = report.measure(x, video_norm_mode) if report is not None else None
                out = comfy.patcher_extension.WrapperExecutor.new_class_executor(
                    forward, unet, executor.wrappers, idx=executor.idx + 1
                ).execute(x, timesteps, context, y, attempt_control, transformer_options, **kwargs)
                if report is not None:
                    report.record(unet, x, context, config, video_norm_mode, peak, transfers, video_length=video_length)
                return out
            except Exception as e:  # noqa: BLE001 — only what ComfyUI counts as out of memory is retried
                if isinstance(e, offload.HostMemoryError) and config.offload_skips:
                    # host memory, not the device's: the same slices with the skips kept on the device
                    smaller = dataclasses.replace(config, offload_skips=False, offload_features=False)
                    oom = f"host memory during offload: {e}"
                else:
                    if not is_oom(e):
                        raise
                    smaller = family.finer_after_oom(unet, config, x, context)
                    if smaller is None:
                        raise
                    oom = f"{type(e).__name__}"
            # out of the except block: its traceback no longer holds the failed attempt's tensors
            logger.warning(f"Streamline: out of memory ({oom}) with {config}; retrying with {smaller} and keeping "
                           "it for the rest of this run.")
            state.settle(smaller, unet, x, context, held, video_norm_mode, video_length=video_length)
            config = smaller
            comfy.model_management.soft_empty_cache()

    def hooked_call(executor, family, state, args: tuple, kwargs: dict):
        """A call the model's own forward runs, its blocks sliced by the family's block hooks (DiT): here the
        call's slicing is chosen (the Memory Budget plans it per latent shape) and handed to them in a per-call
        copy of transformer_options, and the run's report records it."""
        import comfy.model_management

        model = executor.class_obj
        x = family.call_input(model, args, kwargs)
        options = next((v for v in (kwargs.get("transformer_options"), *args) if isinstance(v, dict)
                        and get_state(v) is state), None)
        context = args[2] if len(args) > 2 else kwargs.get("context")
        held = held_across_calls(options or {})
        if rehash_run(options or {}) is not None:
            # Step Rehash's split keeps the deep blocks' input during a full call: planned as held memory
            held += family.rehash_split_bytes(model, tuple(x.shape), x.element_size())
        config = state.config_for(model, x, context, held, False)
        report = getattr(state, "report", None)
        while True:  # the block hooks get the call's slice (an automatic one chosen by the family's laws)
            call_options = {**(options or {}), CALL_CONFIG_KEY: family.call_slicing(model, x, context, config)}
            call_args = tuple(call_options if a is options else a for a in args)
            call_kwargs = {k: call_options if v is options else v for k, v in kwargs.items()}
            try:
                peak = report.measure(x, False) if report is not None else None
                out = executor(*call_args, **call_kwargs)
                if report is not None:
                    report.record(model, x, context, config, False, peak)
                return out
            except Exception as e:  # noqa: BLE001 — only what ComfyUI counts as out of memory is retried
                if not is_oom(e):
                    raise
                smaller = family.finer_after_oom(model, config, x, context)
                if smaller is None:
                    raise
                oom = type(e).__name__
            logger.warning(f"Streamline: out of memory ({oom}) with {config}; retrying with {smaller} and keeping "
                           "it for the rest of this run.")
            state.settle(smaller, model, x, context, held, False)
            config = smaller
            comfy.model_management.soft_empty_cache()

    return wrapper
