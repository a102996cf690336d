"""Out of memory, as the host counts it."""
from __future__ import annotations

import torch


def is_oom(e: BaseException) -> bool:
    """What ComfyUI counts as out of memory (0.33's model_management.is_oom: torch's OutOfMemoryError, and
    accelerator errors that say so), else torch's OutOfMemoryError alone (0.3.64)."""
    import comfy.model_management

    check = getattr(comfy.model_management, "is_oom", None)
    return bool(check(e)) if check is not None else isinstance(e, torch.OutOfMemoryError)
