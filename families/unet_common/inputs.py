"""What the sliced forwards of ComfyUI's UNetModel families (families/unet/forward.py, families/svd/forward.py)
know of a call's inputs: the patch keys, replacements and conds they run as UNetModel._forward does."""
from __future__ import annotations

# transformer_options patch keys that act between blocks on whole tensors; any other patch may look
# inside attention at batch-dependent data, so spatial transformers then run unsliced.
BLOCK_LEVEL_PATCHES = {
    "forward_timestep_embed_patch",
    "emb_patch",
    "input_block_patch",
    "input_block_patch_after_skip",
    "output_block_patch",
    "middle_block_after_patch",
}
# What the sliced UNet forwards (families/unet/forward.py, families/svd/forward.py) know. Patch keys: the
# block-level ones they call as UNetModel._forward does, and those ComfyUI's transformer blocks read (the spatial transformers then run
# unsliced); patches_replace: attention replacements (likewise). Model kwargs (conds): those _forward reads.
# Anything else makes the call run ComfyUI's own forward, with one log line naming it.
_TRANSFORMER_PATCHES = {"attn1_patch", "attn1_output_patch", "attn2_patch", "attn2_output_patch", "middle_patch"}
KNOWN_PATCHES = BLOCK_LEVEL_PATCHES | _TRANSFORMER_PATCHES
KNOWN_REPLACES = {"attn1", "attn2"}
KNOWN_CONDS = {"time_context", "num_video_frames", "image_only_indicator"}


def unknown_inputs(transformer_options: dict, kwargs: dict, known_patches: set[str], known_replaces: set[str],
                   known_conds: set[str]) -> list[str]:
    """What a call hands the diffusion model that the sliced path does not know (patch keys, replacements,
    conds), named for the log; empty: it knows everything."""
    found = [f"patch {k!r}" for k, v in transformer_options.get("patches", {}).items() if v and k not in known_patches]
    found += [f"replacement {k!r}" for k, v in transformer_options.get("patches_replace", {}).items()
              if v and k not in known_replaces]
    found += [f"cond {k!r}" for k, v in kwargs.items() if v is not None and k not in known_conds]
    return found
