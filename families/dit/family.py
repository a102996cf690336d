"""The adapter of a DiT family whose blocks the pack slices over tokens through ComfyUI's block-replace hook
(families/dit/hooks.py): the model's own forward runs, the slicing wrapper chooses each call's slice and the
block replacements run it. What the DiT families' adapters share is here once; a family's adapter says what
its slices cover, how many tokens a slice takes (its laws) and how its hooks go in and out.

- BlockSlicedFamily: the report's line, the call's slice (an automatic one from the laws), a finer slice after
  an out-of-memory error, Step Rehash's split of the block stack (families/dit/rehash.py).
- LatentLawsFamily: a BlockSlicedFamily whose laws read a call's latent shape and its text tokens (Wan, LTX,
  HunyuanVideo): the Memory Budget's plan, peaks, ComfyUI's estimate and the node's text from two laws.
"""
from __future__ import annotations

import dataclasses

from ...core.budget import Plan
from ...core.slicing import SliceConfig, is_automatic
from ..family import Family, latent_plan_preview
from .rehash import DeepSpanCall, shallow_blocks


def text_tokens(context) -> int | None:
    """The text tokens of a call's context (None: none given, the laws count the family's usual number)."""
    return context.shape[1] if context is not None and context.ndim == 3 else None


class BlockSlicedFamily(Family):
    swaps_forward = False  # the model's own forward runs; the block replacements slice each block
    splits_block_stack = True
    tokens_text = "tokens"  # what the slices cover, in the report's line

    def sliced_tokens(self, diffusion_model, x) -> int:
        """The tokens a call of `x` (call_input's) is sliced over."""
        raise NotImplementedError

    def token_chunk(self, diffusion_model, x, context, config: SliceConfig) -> int:
        """Tokens per slice of a call of `x` with `config` (an automatic config: the slice the laws choose)."""
        raise NotImplementedError

    # -- Streamline Model Patch -------------------------------------------------------------------------------

    def slice_text(self, diffusion_model, x, context, config: SliceConfig) -> str:
        chunk = self.token_chunk(diffusion_model, x, context, config)
        auto = " (automatic)" if is_automatic(config) else ""
        return (f"slices of {chunk} of {self.sliced_tokens(diffusion_model, x)} {self.tokens_text} in each "
                f"{self.name} block{auto}")

    def call_slicing(self, diffusion_model, x, context, config: SliceConfig) -> SliceConfig:
        """A config left automatic gets the slice the family's laws choose for this call."""
        if not is_automatic(config):
            return config
        return dataclasses.replace(config, token_chunk=self.token_chunk(diffusion_model, x, context, config))

    def finer_after_oom(self, diffusion_model, config: SliceConfig, x, context) -> SliceConfig | None:
        """Half the tokens per slice (None: one token per slice already)."""
        chunk = self.token_chunk(diffusion_model, x, context, config)
        return None if chunk <= 1 else dataclasses.replace(config, token_chunk=chunk // 2)

    # -- Step Rehash ------------------------------------------------------------------------------------------

    def rehash_split(self, diffusion_model, split_point: int) -> int:
        return shallow_blocks(split_point, self.block_stack_length(diffusion_model), self.name)

    def rehash_call(self, call_state, first_deep: int, last_deep: int):
        return DeepSpanCall(call_state, first_deep, last_deep)


class LatentLawsFamily(BlockSlicedFamily):
    """A family whose laws read one call's latent shape, element size and text tokens (None: its usual count)."""

    def plan_latent(self, diffusion_model, latent_shape: tuple[int, ...], dtype_bytes: int, budget: int,
                    text: int | None) -> Plan:
        """The coarsest token slicing predicted to fit `budget` (raises core.plan_search.BudgetError)."""
        raise NotImplementedError

    def latent_peaks(self, diffusion_model, latent_shape: tuple[int, ...], dtype_bytes: int, config: SliceConfig,
                     text: int | None) -> tuple[int, int]:
        """(sliced with `config`, ComfyUI's forward) predicted peak bytes of one call."""
        raise NotImplementedError

    def preview_latent(self, diffusion_model, width: int, height: int, clip_frames: int) -> tuple[int, ...]:
        """The latent of one CFG-batched sampling call for a width x height x clip_frames clip."""
        raise NotImplementedError

    def estimate_shape(self, base_model, input_shape) -> tuple[int, ...]:
        """The latent shape the laws read for the input ComfyUI estimates."""
        return tuple(input_shape)

    # -- Memory Budget ----------------------------------------------------------------------------------------

    def plan(self, diffusion_model, x, context, budget, held, set_budget, video_norm, video_length, offload) -> Plan:
        return self.plan_latent(diffusion_model, tuple(x.shape), x.element_size(), budget, text_tokens(context))

    def peaks(self, diffusion_model, x, context, config, video_norm=False, video_length=None) -> tuple[int, int]:
        return self.latent_peaks(diffusion_model, tuple(x.shape), x.element_size(), config, text_tokens(context))

    def estimate(self, base_model, input_shape, dtype_bytes, config, planned_budget, motion_models, offload) -> int:
        model = base_model.diffusion_model
        shape = self.estimate_shape(base_model, input_shape)
        if planned_budget is not None:
            try:
                return self.plan_latent(model, shape, dtype_bytes, planned_budget(), None).predicted_peak_bytes
            except ValueError:  # no plan fits: the finest slicing is what the run will try
                config = SliceConfig(1, 1, token_chunk=1)
        return self.latent_peaks(model, shape, dtype_bytes, config, None)[0]

    def preview(self, model, planned, budget, budget_text, width, height, clip_frames, dtype_bytes, offload,
                cond_batching) -> str:
        dm = model.model.diffusion_model
        latent = self.preview_latent(dm, width, height, clip_frames)
        return latent_plan_preview(self, budget_text, f"{width}x{height}x{clip_frames}", latent,
                                   lambda: self.plan_latent(dm, latent, dtype_bytes, planned, None))
