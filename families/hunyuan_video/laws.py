"""Memory of a HunyuanVideo forward (comfy/ldm/hunyuan_video/model.py), run as ComfyUI runs it or with token slices."""
from __future__ import annotations

TEXT_TOKENS = 256  # text tokens a HunyuanVideo prompt typically keeps after the text encoder's template is cropped


def plan_reason(diffusion_model) -> str | None:
    """Why Memory Budget leaves this HunyuanVideo to ComfyUI (None: it plans it)."""
    return ("the pack has no memory laws for HunyuanVideo yet, so Memory Budget cannot plan it (Streamline Model "
            "Patch slices it)")
