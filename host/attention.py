"""Which attention kernel ComfyUI runs in this process (chosen at its start from the device and flags), as the
pack's laws need to know it."""
from __future__ import annotations

from comfy.ldm.modules.attention import optimized_attention

from ..core.budget import SDPA, SUB_QUADRATIC, WorkingSets

# ComfyUI's attention kernels that hold the whole (heads x queries x keys) score matrix
_SCORE_KERNELS = ("attention_sub_quad", "attention_split", "attention_basic")
# ComfyUI's attention kernels that quantise queries in blocks of rows (a DiT block's token slices keep them whole)
_BLOCK_QUANTISED = ("attention_sage", "attention3_sage", "attention_comfy_kitchen_int8")


def attention_laws() -> WorkingSets:
    """The working-set laws of the attention ComfyUI runs in this process (chosen at its start from
    the device and flags): PyTorch SDPA, xformers, flash and sage attention never materialise scores."""
    import comfy.ldm.modules.attention as attention

    return SUB_QUADRATIC if attention.optimized_attention.__name__ in _SCORE_KERNELS else SDPA


def runs_pytorch_attention() -> bool:
    """Whether the attention ComfyUI runs in this process is PyTorch SDPA (the DiT laws tell it from the rest)."""
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention.__name__ == "attention_pytorch"


def block_quantised_attention() -> str | None:
    """The name of ComfyUI's attention kernel when it quantises queries by blocks (None: it does not)."""
    import comfy.ldm.modules.attention as attention

    for name in _BLOCK_QUANTISED:
        function = getattr(attention, name, None)
        if function is not None and optimized_attention is function:
            return name
    return None
