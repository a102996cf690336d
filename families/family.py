"""What a technique may ask a model family. One adapter per family (families/<name>/adapter.py), listed in
families/registry.py; the techniques (techniques/) ask the adapter `family_of` returns and never which family a
model is. The defaults here are what a family without the feature answers."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn
from torch import Tensor

from ..core.budget import Plan
from ..core.slicing import SliceConfig


class Family:
    name = ""
    # the slicing wrapper runs the family's own sliced forward in place of the model's (UNet, SVD); False: the
    # model's forward runs and block hooks slice inside it (DiT), the wrapper choosing the call's slicing
    swaps_forward = True

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{self.name} family>"

    # -- which models ---------------------------------------------------------------------------------------

    def claims(self, diffusion_model: nn.Module) -> bool:
        raise NotImplementedError

    def reason(self, diffusion_model: nn.Module, purpose: str) -> str | None:
        """Why a model of this family is left to ComfyUI for `purpose` ("slice", "plan", "rehash"); None: handled."""
        return None

    # -- Memory Budget ----------------------------------------------------------------------------------------

    def video_length(self, diffusion_model: nn.Module) -> int | None:
        """Frames per video the model's temporal layers were set to (part of a plan's key); None: none."""
        return None

    def attached_models(self, patcher) -> list:
        """Models the host attaches to the MODEL and injects when sampling starts (counted in its estimate)."""
        return []

    def plan(self, diffusion_model, x: Tensor, context: Tensor | None, budget: int, held: int, set_budget: int,
             video_norm: bool, video_length: int | None, offload: Callable[[], bool]) -> Plan:
        """The coarsest slicing predicted to fit `budget` for one call (raises core.plan_search.BudgetError)."""
        raise NotImplementedError

    def peaks(self, diffusion_model, x: Tensor, context: Tensor | None, config: SliceConfig, video_norm: bool,
              video_length: int | None = None) -> tuple[int, int]:
        """(sliced with `config`, ComfyUI's forward) predicted peak bytes of one call."""
        raise NotImplementedError

    def settled_plan(self, diffusion_model, x: Tensor, context: Tensor | None, config: SliceConfig,
                     video_norm: bool, video_length: int | None) -> Plan:
        """`config` as a plan (after an out-of-memory retry settled on it)."""
        return Plan(config, *self.peaks(diffusion_model, x, context, config, video_norm, video_length))

    def estimate(self, base_model, input_shape, dtype_bytes: int, config: SliceConfig,
                 planned_budget: Callable[[], int] | None, motion_models: list, offload: Callable[[], bool]) -> int:
        """The predicted peak of one call of `input_shape` with the node's slicing `config`, or with the plan the
        run will make when `planned_budget` (the budget it will plan with) is given."""
        raise NotImplementedError

    def preview(self, model, planned: int, budget: int, budget_text: str, width: int, height: int, clip_frames: int,
                dtype_bytes: int, offload: Callable[[], bool], cond_batching: Callable) -> str:
        """The Memory Budget node's text: the plan the run makes for a width x height x clip_frames clip."""
        raise NotImplementedError

    # -- Streamline Model Patch -------------------------------------------------------------------------------

    def install_slicing(self, patcher, token_chunk_for: Callable) -> None:
        """What the family needs on a patched MODEL besides the slicing wrapper (DiT: the block hooks)."""

    def remove_slicing(self, patcher) -> None:
        """Undo install_slicing on a clone."""

    def slice_text(self, diffusion_model, x: Tensor, context: Tensor | None, config: SliceConfig) -> str:
        """The slices a call of `x` runs with, for the run's report."""
        raise NotImplementedError

    def call_slicing(self, diffusion_model, x: Tensor, context: Tensor | None, config: SliceConfig) -> SliceConfig:
        """The slicing a call's block hooks get (DiT): `config`, its automatic slice chosen by the family's laws."""
        return config

    def finer_after_oom(self, diffusion_model, config: SliceConfig, x: Tensor,
                        context: Tensor | None) -> SliceConfig | None:
        """Finer slices after an out-of-memory error (None: the finest already)."""
        raise NotImplementedError

    def verdict_sliced(self) -> bool:
        """The host verdict on the host functions the family's sliced forward mirrors."""
        return True

    def call_input(self, diffusion_model, args: tuple, kwargs: dict) -> Tensor:
        """The tensor that stands for one call of the model to the planner, the laws and the run's report (its
        shape, dtype, device): the latent (the forward's first argument), where the family's laws read that."""
        return args[0] if args else kwargs["x"]

    def unknown_inputs(self, transformer_options: dict, kwargs: dict) -> list[str]:
        """What a call hands the model that the family's sliced forward does not know."""
        return []

    def call_mode(self, diffusion_model, x: Tensor, kwargs: dict, transformer_options: dict) -> tuple[bool, int | None]:
        """(whole-video GroupNorm mode, frames per video) of one call, for the planner and the report."""
        return False, None

    def sliced_forward(self, diffusion_model, config: SliceConfig, log, x: Tensor):
        """(the sliced forward for a call, with the forward's signature after its first three arguments, the
        offload transfers it counts into or None)."""
        raise NotImplementedError

    def rehash_split_bytes(self, diffusion_model, latent_shape, dtype_bytes: int) -> int:
        """What Step Rehash's split adds to a full call besides its caches (planned as held memory)."""
        return 0

    # -- Step Rehash ------------------------------------------------------------------------------------------

    splits_block_stack = False  # Step Rehash splits a stack of blocks (DiT), not a UNet's skips

    def block_stack_length(self, diffusion_model) -> int:
        """The blocks of the stack Step Rehash splits (splits_block_stack), counted as rehash_call's positions."""
        return len(diffusion_model.blocks)

    def rehash_split(self, diffusion_model, split_point: int) -> int:
        """Where Step Rehash splits a call, from RehashConfig.split_point (raises core.rehash.RehashConfigError)."""
        raise NotImplementedError

    def install_rehash(self, patcher) -> None:
        """What Step Rehash needs on the MODEL besides its wrappers (DiT: the block hooks)."""

    def unsliced_forward(self):
        """The family's forward that takes a RehashCall, for a call Streamline does not slice (UNet-like)."""
        raise NotImplementedError

    def rehash_conflict(self, transformer_options: dict, first_deep: int, last_deep: int) -> str | None:
        """Why a block-stack call must run in full (another node's hooks on the deep blocks...)."""
        return None

    def rehash_call(self, call_state, first_deep: int, last_deep: int):
        """The per-call object the block hooks read under host.options.DIT_REHASH_CALL_KEY."""
        raise NotImplementedError


class Shaped:
    """Stands for a tensor where the laws read only its shape and element size."""

    def __init__(self, shape, element_size: int):
        self.shape, self._element_size, self.ndim = tuple(shape), element_size, len(shape)

    def element_size(self) -> int:
        return self._element_size


def latent_plan_preview(family: Family, budget_text: str, clip: str, latent: tuple[int, ...],
                        make_plan: Callable[[], Plan]) -> str:
    """The Memory Budget node's text for a DiT family: the plan `make_plan` makes for a CFG-batched `latent` (the
    clip `clip`, "WxHxF"), or why none fits."""
    from ..core.plan_search import BudgetError

    try:
        chosen = make_plan()
    except BudgetError as e:
        return f"budget {budget_text}: {e}"
    return (f"budget {budget_text}, {clip} with CFG batched ({family}, latent {'x'.join(map(str, latent))}): "
            f"{plan_text(chosen)}")


def plan_text(plan: Plan) -> str:
    """A plan as the pack prints it; a DiT's slicing is in tokens."""
    from ..core.plan_search import format_bytes

    if plan.config.token_chunk:
        return (f"token_chunk {plan.config.token_chunk}: predicted peak activation "
                f"{format_bytes(plan.predicted_peak_bytes)} (unpatched {format_bytes(plan.baseline_peak_bytes)})")
    return plan.text()
