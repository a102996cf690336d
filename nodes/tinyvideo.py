"""TinyVideo nodes: the pack's own small trained video model (tinyvideo/), for demos and fidelity checks.

Load TinyVideo -> MODEL; TinyVideo Prompt -> CONDITIONING; Empty Latent Image at 8x the clip size
(256x256 -> a 32x32 clip, batch = frames); any sampler; TinyVideo Decode -> IMAGE frames.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..tinyvideo import data
from ..tinyvideo import model as tinyvideo


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


class TinyVideoPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        words = ", ".join(w for slot in data.SLOTS for w in slot)
        return io.Schema(
            node_id="StreamlineTinyVideoPrompt",
            display_name="TinyVideo Prompt (Streamline)",
            category="Streamline/TinyVideo",
            description="Conditioning for TinyVideo from up to three words: a colour, a shape and a motion. "
            "An empty prompt is the unconditional (negative) prompt.",
            inputs=[io.Model.Input("model", tooltip="TinyVideo (Load TinyVideo's output, patched or not)."),
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
            description="TinyVideo latent -> frames: its latent is already RGB (+ a shape mask), so this only "
            "rescales the values and enlarges the pixels.",
            inputs=[io.Latent.Input("samples", tooltip="The sampled latent: with TinyVideo, the clip itself (frames in the batch)."),
                    io.Int.Input("scale", default=8, min=1, max=32, tooltip="Pixel enlargement (nearest neighbour).")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples: dict, scale: int) -> io.NodeOutput:
        return io.NodeOutput(decode(samples["samples"], scale))


def decode(latent: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """(frames, 4, h, w) TinyVideo latent -> (frames, h*scale, w*scale, 3) ComfyUI IMAGE in [0, 1]."""
    if latent.ndim != 4 or latent.shape[1] != 4:
        raise ValueError(f"a TinyVideo latent is (frames, 4, h, w), got {tuple(latent.shape)}")
    rgb = data.to_rgb(latent.float().cpu())
    if scale > 1:
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=scale, mode="nearest")
    return rgb.permute(0, 2, 3, 1).contiguous()


NODES = [TinyVideoLoader, TinyVideoPrompt, TinyVideoDecode]


def sample_clip(model, prompt: str, frames: int = 8, size: int = 32, steps: int = 20, cfg: float = 5.0,
                seed: int = 0, sampler: str = "euler", scheduler: str = "normal") -> torch.Tensor:
    """One clip through ComfyUI's KSampler path: (frames, 4, size, size) latent."""
    import comfy.model_management
    import nodes as comfy_nodes

    positive = TinyVideoPrompt.execute(model, prompt).result[0]
    negative = TinyVideoPrompt.execute(model, "").result[0]
    latent = {"samples": torch.zeros(frames, 4, size, size, device=comfy.model_management.intermediate_device())}
    out = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)
    return out[0]["samples"]
