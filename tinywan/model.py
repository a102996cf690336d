"""TinyWan: a small Wan-architecture video diffusion model built from ComfyUI's own WanModel class.

- The network is ComfyUI's `comfy.ldm.wan.model.WanModel` (Wan 2.1 t2v layout: patch embedding, time
  embedding and its 6-way modulation, WanAttentionBlocks with RoPE self-attention, RMS q/k norms,
  cross-attention to the text context and a gated feed-forward, the modulated head) at reduced width and
  depth (WAN_CONFIG). Everything the pack does to Wan (slicing, Memory Budget, Step Rehash) runs on it
  through the same code paths as on Wan 2.1 / 2.2.
- Latent space = TinyVideo's pixel space (tinyvideo/data.py): 4 channels (RGB + shape coverage) in
  [-1, 1], laid out as Wan's (batch, channels, frames, height, width).
- Conditioning: TinyVideo's prompt encoder (three word slots, learned tokens), as the text context.
- Rectified flow, as Wan: ComfyUI's FLOW model type (ModelSamplingDiscreteFlow, CONST), with its own shift.

comfy is imported inside functions: this module is importable without a host.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from ..tinyvideo.model import (CONTEXT_DIM, PROMPT_ATTACHMENT, PromptEncoder, TinyVideoError, _prompt_encoder,
                               choose_dtypes, join_state_dict, save_file_fp16, split_state_dict, training_ops)

WEIGHTS_PATH = Path(__file__).resolve().parent / "tinywan-v1.safetensors"
FORMAT = "tinywan-v1"
# Wan 2.1 t2v's layout at reduced width and depth (Wan 2.1 1.3B: dim 1536, ffn 8960, 12 heads, 30 layers,
# text_dim 4096, patch (1, 2, 2) over a latent 8x smaller than the frames, 16 latent channels). TinyWan's
# latent is the 32x32 clip itself, so its 4x4 patches cover what Wan's 2x2 patches cover in a 16x16 latent:
# 64 tokens a frame (a 2x2 patch made 256, and training 7x slower on a CPU).
WAN_CONFIG = {
    "model_type": "t2v", "patch_size": (1, 4, 4), "in_dim": 4, "out_dim": 4, "dim": 128, "ffn_dim": 384,
    "freq_dim": 64, "text_dim": CONTEXT_DIM, "text_len": 8, "num_heads": 4, "num_layers": 8,
    "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}
SHIFT = 3.0  # flow shift of the sampling schedule (Wan 2.1 uses 8 at 480p); training draws sigmas the same way


class TinyWanError(TinyVideoError):
    """TinyWan cannot be built or used as asked."""


def wan_config(metadata: dict | None = None) -> dict:
    """The WanModel arguments: WAN_CONFIG, or the ones a checkpoint records."""
    config = dict((metadata or {}).get("wan_config") or WAN_CONFIG)
    config["patch_size"] = tuple(config["patch_size"])
    return config


def _latent_format_class():
    import comfy.latent_formats

    class TinyWanLatent(comfy.latent_formats.LatentFormat):
        latent_channels = 4
        latent_dimensions = 3  # (batch, channels, frames, height, width), as Wan
        scale_factor = 1.0
        latent_rgb_factors = [[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0, 0, 0]]
        latent_rgb_factors_bias = [0.5, 0.5, 0.5]

    return TinyWanLatent


def _model_config_class(config: dict):
    import comfy.supported_models

    class TinyWanConfig(comfy.supported_models.WAN21_T2V):
        unet_config = {"image_model": "wan2.1", **config}
        sampling_settings = {"shift": SHIFT}
        latent_format = _latent_format_class()

    return TinyWanConfig


def model_sampling(shift: float = SHIFT):
    """Wan's rectified-flow sampling (ModelSamplingDiscreteFlow, CONST) with TinyWan's shift."""
    import comfy.model_base

    config = _model_config_class(WAN_CONFIG)(dict(WAN_CONFIG))
    config.sampling_settings = {"shift": shift}
    return comfy.model_base.model_sampling(config, comfy.model_base.ModelType.FLOW)


def initialise(model: nn.Module) -> None:
    """Wan's own initialisation (the reference WanModel.init_weights): xavier-uniform linears and patch
    embedding, zero biases, N(0, 0.02) for the text and time embeddings, zero output head, and the
    modulation tables N(0, 1/dim) and the norms' scales at one (ComfyUI creates these with torch.empty)."""
    for module in model.modules():
        if isinstance(module, (nn.RMSNorm, nn.LayerNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.xavier_uniform_(model.patch_embedding.weight.flatten(1))
    nn.init.zeros_(model.patch_embedding.bias)
    for sequence in (model.text_embedding, model.time_embedding):
        for module in sequence:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
    nn.init.zeros_(model.head.head.weight)
    nn.init.zeros_(model.head.head.bias)
    with torch.no_grad():
        for block in model.blocks:
            block.modulation.normal_(std=model.dim ** -0.5)
        model.head.modulation.normal_(std=model.dim ** -0.5)


def build_training_model(seed: int, config: dict | None = None):
    """A freshly initialised TinyWan (ComfyUI's WanModel with weight initialisation left on)."""
    from comfy.ldm.wan.model import WanModel

    torch.manual_seed(seed)
    model = WanModel(**(config or wan_config()), operations=training_ops())
    initialise(model)
    return model


def save_checkpoint(path: Path, wan: nn.Module, prompt: PromptEncoder, metadata: dict) -> None:
    metadata = {"format": FORMAT, "wan_config": {**WAN_CONFIG, "patch_size": list(WAN_CONFIG["patch_size"])},
                "shift": SHIFT, **metadata}
    save_file_fp16(path, wan, prompt, metadata)


def read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def load_model_patcher(path: Path = WEIGHTS_PATH, state_dict: dict[str, Tensor] | None = None,
                       metadata: dict | None = None):
    """TinyWan as a ComfyUI MODEL: ComfyUI's WAN21 model with this config, dtype and devices chosen by
    ComfyUI's model management, and TinyVideo's prompt encoder attached (TinyVideo Prompt works on it)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    from safetensors.torch import load_file

    if state_dict is None:
        if not Path(path).is_file():
            raise TinyWanError(f"TinyWan weights not found at {path}")
        state_dict, metadata = load_file(str(path)), read_metadata(Path(path))
    metadata = metadata or {}
    if metadata.get("format", FORMAT) != FORMAT:
        raise TinyWanError(f"{path} is a {metadata['format']} file, not TinyWan")
    wan_sd, prompt_sd = split_state_dict(state_dict)
    config = wan_config(metadata)
    model_config = _model_config_class(config)(dict(config))
    model_config.sampling_settings = {"shift": float(metadata.get("shift", SHIFT))}
    load_device, _, _ = choose_dtypes(model_config, sum(v.numel() for v in wan_sd.values()))
    base = model_config.get_model({}, "")
    base.load_model_weights({f"diffusion_model.{k}": v for k, v in wan_sd.items()}, "diffusion_model.")
    missing = set(base.diffusion_model.state_dict()) - set(wan_sd)
    if missing:
        raise TinyWanError(f"not a TinyWan checkpoint: {len(missing)} Wan tensors missing, e.g. {sorted(missing)[0]}")
    base = base.to(mm.unet_offload_device())
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=mm.unet_offload_device())
    patcher.set_attachments(PROMPT_ATTACHMENT, _prompt_encoder(prompt_sd))
    return patcher


def untrained_state_dict(seed: int = 0) -> dict[str, Tensor]:
    """The checkpoint training starts from (same architecture, fresh initialisation)."""
    return join_state_dict(build_training_model(seed), PromptEncoder())


def shifted_sigmas(u: Tensor, shift: float = SHIFT) -> Tensor:
    """Uniform u in [0, 1] -> sigma with the flow shift (ComfyUI's time_snr_shift): the sigmas sampling visits."""
    return shift * u / (1 + (shift - 1) * u)


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """What a rectified-flow (CONST) model outputs for x = (1 - sigma) x0 + sigma noise: noise - x0."""
    return noise - x0


def to_wan_layout(videos: Tensor) -> Tensor:
    """TinyVideo clips (n, frames, 4, h, w) -> Wan latents (n, 4, frames, h, w)."""
    return videos.permute(0, 2, 1, 3, 4).contiguous()


def from_wan_layout(latent: Tensor) -> Tensor:
    """Wan latents (n, 4, frames, h, w) -> frames (n * frames, 4, h, w), video-major."""
    return latent.permute(0, 2, 1, 3, 4).flatten(0, 1)


@torch.no_grad()
def denoising_loss(model, videos: Tensor, words: Tensor, sigmas: Tensor, seed: int = 0) -> float:
    """Mean squared error of the noise a TinyWan MODEL infers (from its denoised output) on `videos`
    (n, frames, 4, h, w), each noised at each of `sigmas` (flow sigmas in (0, 1])."""
    from ..tinyvideo.model import prompt_encoder_of

    base = model.model
    wan, sampling = base.diffusion_model, base.model_sampling
    device, dtype = next(wan.parameters()).device, next(wan.parameters()).dtype
    context = prompt_encoder_of(model)(words)
    g = torch.Generator().manual_seed(seed)
    x0 = to_wan_layout(videos)
    losses = []
    for sigma_value in sigmas.tolist():
        sigma = torch.full((x0.shape[0],), sigma_value)
        noise = torch.randn(x0.shape, generator=g)
        x = sampling.noise_scaling(sigma.view(-1, 1, 1, 1, 1), noise, x0)
        out = wan(x.to(device, dtype), sampling.timestep(sigma).float().to(device), context.to(device, dtype))
        denoised = sampling.calculate_denoised(sigma.view(-1, 1, 1, 1, 1), out.float().cpu(), x)
        inferred_noise = (x - (1 - sigma_value) * denoised) / sigma_value  # x = (1 - s) x0 + s noise
        losses.append(torch.nn.functional.mse_loss(inferred_noise, noise).item())
    return sum(losses) / len(losses)
