"""The part of a DiT block replacement every family shares: which slices a block runs with, and when it runs
ComfyUI's own block instead (with one log line per run saying why).

API:
- TokenChunkFor: (transformer_options, x (B, L, C), tokens_per_frame) -> tokens per slice, or None (unsliced);
- token_chunk_from_state: the TokenChunkFor of Streamline Model Patch / Memory Budget (the run's StreamlineState);
- QUERY_BLOCK, exact_token_chunk(chunk): slices that keep a block-quantised attention kernel's query blocks whole;
- KNOWN_REPLACES: the patches_replace kinds a sliced block runs under ("dit": the block replacements);
- common_unsliced_reason(call, transformer_options, x, known_patches): the reasons every family shares;
- SlicedBlockHook: the base of a family's replacement (index, token_chunk_for, log); its slice_size() runs the
  common reasons, the rounding and the family's host verdict, and says once why a block runs unsliced.
A family's call info (what its DIFFUSION_MODEL wrapper puts in the call's transformer_options) is any object
with `tokens_per_frame` (int) and `unknown_conds` (tuple of names).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import Tensor

from ...host.attention import block_quantised_attention
from ...host.log import LogOnce
from ...host.options import STREAMLINE_KEY as STATE_KEY

# (transformer_options, x (B, L, C), tokens_per_frame) -> tokens per slice, or None: run the block unsliced
TokenChunkFor = Callable[[dict, Tensor, int], "int | None"]

# SageAttention and ComfyUI's int8 attention (comfy-kitchen) quantise queries in blocks of up to this many
# rows, counted from the start of the sequence: a slice that starts inside a block changes the result
QUERY_BLOCK = 128

KNOWN_REPLACES = frozenset({"dit"})


def token_chunk_from_state(transformer_options: dict, x: Tensor, tokens_per_frame: int) -> int | None:
    """The slice size the run's StreamlineState (techniques/slicing.py) gives: its SliceConfig mapped to
    tokens by core.slicing.token_chunk_size; None without a state."""
    from ...core.slicing import token_chunk_size

    state = transformer_options.get(STATE_KEY)
    if state is None:
        return None
    return token_chunk_size(state.config, batch=x.shape[0], tokens=x.shape[1], tokens_per_frame=tokens_per_frame,
                            dim=x.shape[2])


def exact_token_chunk(chunk: int) -> int:
    """The largest token slice <= chunk whose boundaries keep the attention kernel's query blocks whole: a
    multiple of QUERY_BLOCK under a block-quantised kernel (0: none fits), else chunk itself."""
    return chunk // QUERY_BLOCK * QUERY_BLOCK if block_quantised_attention() is not None else chunk


def common_unsliced_reason(call, transformer_options: dict, x: Tensor, known_patches: frozenset[str] | set[str],
                           no_call: str = "the diffusion-model wrapper did not run") -> str | None:
    """Why a block runs unsliced, for reasons of no family: no call info (`no_call`), conds the family does
    not know, an attention override, an attn1_patch (it reads the whole self-attention output), patches or
    patches_replace kinds the family does not know, gradients on. None: none of these."""
    if call is None:
        return no_call
    if call.unknown_conds:
        return f"the call has conds the pack does not know ({', '.join(call.unknown_conds)})"
    to = transformer_options
    if "optimized_attention_override" in to:
        return "an attention override is set (it may need whole query sequences)"
    patches = to.get("patches", {})
    if patches.get("attn1_patch"):
        return "an attn1_patch is set (it reads the whole self-attention output)"
    unknown = sorted(k for k, v in patches.items() if v and k not in known_patches)
    unknown += sorted(k for k, v in to.get("patches_replace", {}).items() if v and k not in KNOWN_REPLACES)
    if unknown:
        return f"patches the pack does not know are set ({', '.join(unknown)})"
    if torch.is_grad_enabled() and x.requires_grad:
        return "gradients are on"
    return None


@dataclass
class SlicedBlockHook:
    """Base of a family's ("double_block" / "single_block", index) replacement. A subclass sets `family` (the
    name in log lines), implements verdict() (host_fingerprints.verdict of the host functions it mirrors) and
    its __call__, which asks slice_size() for the slice to run with (None: ComfyUI's own block)."""

    index: int
    token_chunk_for: TokenChunkFor
    # where notices go when no run state carries a log (a bare install): one LogOnce shared by the blocks of
    # one install, so each notice is said once per install
    log: LogOnce = field(default_factory=LogOnce)

    family: ClassVar[str] = "DiT"
    kind: ClassVar[str] = "block"  # the block's name in log lines ("block", "double block", "single block")

    def verdict(self):
        raise NotImplementedError

    def run_log(self, transformer_options: dict) -> LogOnce:
        """The run's LogOnce (the StreamlineState's), else the install's."""
        state = transformer_options.get(STATE_KEY)
        return getattr(state, "log", None) or self.log

    def slice_size(self, transformer_options: dict, x: Tensor, call, reason: str | None) -> int | None:
        """Tokens per slice for this block on x (B, L, C), or None: ComfyUI's own block. `reason`: why the
        family would not slice it (common_unsliced_reason and its own), said once per run where slices were
        asked for (or the call info is missing); the host verdict's refusal is the verdict's one line."""
        chunk = None if call is None else self.token_chunk_for(transformer_options, x, call.tokens_per_frame)
        if reason is None and chunk is not None and chunk < x.shape[1]:
            exact = exact_token_chunk(chunk)
            if exact == 0:
                reason = (f"the attention kernel ({block_quantised_attention()}) quantises queries in blocks of "
                          f"{QUERY_BLOCK} tokens, more than a slice of {chunk}")
            chunk = exact or chunk
        if reason or chunk is None or chunk >= x.shape[1]:
            if reason and (call is None or chunk is not None):
                self.run_log(transformer_options).warn(
                    f"{self.family.lower()}-unsliced-{reason}",
                    f"Streamline: {self.family} {self.kind} {self.index}: {reason}; it runs unsliced "
                    "(ComfyUI's own block).")
            return None
        if not self.verdict().sliced:
            return None
        return chunk
