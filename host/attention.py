"""Which attention kernel ComfyUI runs in this process (chosen at its start from the device and flags), as the
pack's laws need to know it."""
from __future__ import annotations

from ..core.budget import SDPA, SUB_QUADRATIC, WorkingSets

# ComfyUI's attention kernels that hold the whole (heads x queries x keys) score matrix
_SCORE_KERNELS = ("attention_sub_quad", "attention_split", "attention_basic")


def attention_laws() -> WorkingSets:
    """The working-set laws of the attention ComfyUI runs in this process (chosen at its start from
    the device and flags): PyTorch SDPA, xformers, flash and sage attention never materialise scores."""
    import comfy.ldm.modules.attention as attention

    return SUB_QUADRATIC if attention.optimized_attention.__name__ in _SCORE_KERNELS else SDPA


def dit_attention_law():
    """core/dit_budget's law for the attention ComfyUI runs in this process."""
    import comfy.ldm.modules.attention as attention

    from ..core.dit_budget import SDPA as DIT_SDPA, SUB_QUADRATIC as DIT_SUB_QUADRATIC

    return DIT_SDPA if attention.optimized_attention.__name__ == "attention_pytorch" else DIT_SUB_QUADRATIC
