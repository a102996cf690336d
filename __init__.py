"""ComfyUI-Streamline: Streamlined Inference (Feature Slicer, Operator Grouping, Step Rehash) for
video diffusion in ComfyUI.

The node classes are imported inside `comfy_entrypoint` so that `core/` (plain PyTorch) can be
imported and tested without a ComfyUI host.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import StreamlineExtension

    return StreamlineExtension()
