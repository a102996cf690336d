"""Exact Feature Slicer + Operator Grouping for Wan 2.1 / 2.2 DiT blocks (ComfyUI's comfy/ldm/wan/model.py)."""
from .patch import install_wan_slicing, remove_wan_slicing, unsupported_wan_reason  # noqa: F401
