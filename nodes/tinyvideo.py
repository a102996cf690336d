"""TinyVideo nodes: the pack's own small trained video models, for demos and fidelity checks.

TinyVideo (tinyvideo/, UNet + AnimateDiff motion modules): Load TinyVideo -> MODEL; TinyVideo Prompt ->
CONDITIONING; Empty Latent Image at 8x the clip size (256x256 -> a 32x32 clip, batch = frames); any
sampler; TinyVideo Decode -> IMAGE frames.
TinyWan (tinywan/, ComfyUI's WanModel at reduced size): Load TinyWan -> MODEL; the same prompt node;
EmptyHunyuanLatentVideo (Wan's empty latent) at 8x the clip size (256x256, length 29 -> 8 frames, as Wan
counts them); any sampler; the same decode node.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..tinyvideo import data
from ..tinyvideo import model as tinyvideo
from ..tinywan import model as tinywan


class TinyVideoLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamlineTinyVideoLoader",
            display_name="Load TinyVideo (Streamline)",
            category="Streamline/TinyVideo",
            description="The pack's small trained video model: an SD1.5-style UNet with AnimateDiff motion "
            "modules, trained on procedural clips of moving shapes. Its latent is the clip itself (RGB + shape "
            "mask): use Empty Latent Image at 8x the clip size (256x256 gives 32x32), batch = frames (up to 32).",
            inputs=[],
            outputs=[io.Model.Output(tooltip="TinyVideo, ready for Streamline Model Patch, Step Rehash or any sampler.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(tinyvideo.load_model_patcher())


class TinyWanLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamlineTinyWanLoader",
            display_name="Load TinyWan (Streamline)",
            category="Streamline/TinyVideo",
            description="The pack's small trained Wan-architecture model: ComfyUI's own WanModel (Wan 2.1 t2v "
            "layout) at reduced width and depth, trained on the same procedural clips as TinyVideo, with "
            "rectified flow as Wan. Prompt it with TinyVideo Prompt; its latent is the clip itself in Wan's "
            "layout: use EmptyHunyuanLatentVideo at 8x the clip size (256x256 gives 32x32; length 29 gives "
            "8 frames, as Wan counts them), and TinyVideo Decode for the frames.",
            inputs=[],
            outputs=[io.Model.Output(tooltip="TinyWan, ready for Streamline Model Patch, Memory Budget, Step "
                                     "Rehash or any sampler.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(tinywan.load_model_patcher())


class TinyVideoPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        words = ", ".join(w for slot in data.SLOTS for w in slot)
        return io.Schema(
            node_id="StreamlineTinyVideoPrompt",
            display_name="TinyVideo Prompt (Streamline)",
            category="Streamline/TinyVideo",
            description="Conditioning for TinyVideo or TinyWan from up to three words: a colour, a shape and a "
            "motion. An empty prompt is the unconditional (negative) prompt.",
            inputs=[io.Model.Input("model", tooltip="TinyVideo or TinyWan (a loader's output, patched or not)."),
                    io.String.Input("text", default="red circle bounce",
                                    tooltip=f"Words TinyVideo knows: {words}. Any order; each kind at most once.")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, model, text: str) -> io.NodeOutput:
        words = torch.tensor([data.prompt_words(text)])
        with torch.no_grad():
            context = tinyvideo.prompt_encoder_of(model)(words)  # (1, 3, CONTEXT_DIM)
        return io.NodeOutput([[context, {}]])


class TinyVideoDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamlineTinyVideoDecode",
            display_name="TinyVideo Decode (Streamline)",
            category="Streamline/TinyVideo",
            description="TinyVideo or TinyWan latent -> frames: their latent is already RGB (+ a shape mask), so "
            "this only rescales the values and enlarges the pixels.",
            inputs=[io.Latent.Input("samples", tooltip="The sampled latent: the clip itself (TinyVideo: frames in the "
                                    "batch; TinyWan: Wan's (batch, channels, frames, height, width), videos one "
                                    "after another)."),
                    io.Int.Input("scale", default=8, min=1, max=32, tooltip="Pixel enlargement (nearest neighbour).")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples: dict, scale: int) -> io.NodeOutput:
        return io.NodeOutput(decode(samples["samples"], scale))


def decode(latent: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """(frames, 4, h, w) TinyVideo latent or (videos, 4, frames, h, w) TinyWan latent -> (frames, h*scale,
    w*scale, 3) ComfyUI IMAGE in [0, 1]."""
    if latent.ndim == 5 and latent.shape[1] == 4:
        latent = tinywan.from_wan_layout(latent)
    if latent.ndim != 4 or latent.shape[1] != 4:
        raise ValueError(f"a TinyVideo latent is (frames, 4, h, w) and a TinyWan latent (videos, 4, frames, h, w), "
                         f"got {tuple(latent.shape)}")
    rgb = data.to_rgb(latent.float().cpu())
    if scale > 1:
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=scale, mode="nearest")
    return rgb.permute(0, 2, 3, 1).contiguous()


NODES = [TinyVideoLoader, TinyWanLoader, TinyVideoPrompt, TinyVideoDecode]


def empty_latent(model, frames: int, size: int) -> torch.Tensor:
    """The zero latent of one clip for this model: (frames, 4, size, size) for TinyVideo, (1, 4, frames, size,
    size) for TinyWan (Wan's layout)."""
    import comfy.model_management

    shape = (1, 4, frames, size, size) if model.model.latent_format.latent_dimensions == 3 else (frames, 4, size, size)
    return torch.zeros(shape, device=comfy.model_management.intermediate_device())


def sample_clip(model, prompt: str, frames: int = 8, size: int = 32, steps: int = 20, cfg: float = 5.0,
                seed: int = 0, sampler: str = "euler", scheduler: str = "normal") -> torch.Tensor:
    """One clip through ComfyUI's KSampler path: the sampled latent (see empty_latent for its layout)."""
    import nodes as comfy_nodes

    positive = TinyVideoPrompt.execute(model, prompt).result[0]
    negative = TinyVideoPrompt.execute(model, "").result[0]
    latent = {"samples": empty_latent(model, frames, size)}
    out = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)
    return out[0]["samples"]
