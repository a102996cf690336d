"""TinyVideo: a small SD1.5-style video diffusion model built from ComfyUI's and AnimateDiff-Evolved's classes.

- The UNet is ComfyUI's UNetModel (ResBlocks, spatial transformers with cross-attention, the SD1.5 block
  layout) with reduced widths: 32/64/128 channels over three levels, one ResBlock per level.
- The motion modules are AnimateDiff-Evolved's VanillaTemporalModule (two temporal self-attention
  blocks, sinusoidal position encoding), placed the way ADE injects them into SD1.5: after the last
  spatial transformer of each block, else after its first ResBlock, in every down, mid and up block.
  They stay in the UNet; the forward_timestep_embed patch that ADE uses runs them.
- Latent space = pixel space (tinyvideo/data.py): 4 channels (RGB + shape coverage) in [-1, 1].
- Conditioning: three word slots (colour, shape, motion), each a learned 64-d token.
- v-prediction on SD1.5's discrete noise schedule (ComfyUI's V_PREDICTION model type), so every ComfyUI
  sampler and scheduler applies. (An epsilon-prediction run learned the low-noise steps but not the global
  layout at high noise: its samples kept noise and ignored the prompt.)

comfy and ADE are imported inside functions: this module is importable without a host.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from .data import NO_WORD, SLOTS

WEIGHTS_PATH = Path(__file__).resolve().parent / "tinyvideo-v1.safetensors"
CONTEXT_DIM = 64
MOTION_PE_LENGTH = 32
UNET_CONFIG = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 4], "use_spatial_transformer": True, "transformer_depth": [0, 0, 1],
    "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 0, 0, 1, 1], "context_dim": CONTEXT_DIM,
    "use_linear_in_transformer": True, "legacy": False, "adm_in_channels": None, "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
HEAD_CHANNELS = 32
ADE_MODULE_SUFFIX = "animatediff.motion_module_ad"


class TinyVideoError(RuntimeError):
    """TinyVideo cannot be built or used as asked."""


class PromptEncoder(nn.Module):
    """Word slots -> cross-attention context (batch, 3, CONTEXT_DIM); an empty slot has its own token."""

    def __init__(self, dim: int = CONTEXT_DIM):
        super().__init__()
        self.words = nn.ParameterList([nn.Parameter(torch.randn(len(v), dim) * 0.5) for v in SLOTS])
        self.empty = nn.Parameter(torch.randn(len(SLOTS), dim) * 0.5)

    def forward(self, words: Tensor) -> Tensor:  # words: (batch, 3) long, NO_WORD for an empty slot
        tokens = []
        for slot, table in enumerate(self.words):
            ids = words[:, slot]
            present = table[ids.clamp_min(0)]
            tokens.append(torch.where((ids == NO_WORD)[:, None], self.empty[slot].expand_as(present), present))
        return torch.stack(tokens, dim=1)


def ade_motion_module_ad():
    """AnimateDiff-Evolved's motion_module_ad, as loaded by ComfyUI (under a path-derived name) or by tests."""
    for name, module in list(sys.modules.items()):
        if name.endswith(ADE_MODULE_SUFFIX) and hasattr(module, "VanillaTemporalModule"):
            return module
    try:
        import animatediff.motion_module_ad as module  # ADE's folder on sys.path (tests, tools)
        return module
    except ImportError:
        raise TinyVideoError("TinyVideo's motion modules are AnimateDiff-Evolved's: install "
                             "ComfyUI-AnimateDiff-Evolved next to this pack") from None


def _motion_module(mmad, channels: int, block_type: str, block_idx: int, module_idx: int, ops) -> nn.Module:
    return mmad.VanillaTemporalModule(
        in_channels=channels, block_type=block_type, block_idx=block_idx, module_idx=module_idx,
        attention_block_types=("Temporal_Self", "Temporal_Self"), temporal_pe=True,
        temporal_pe_max_len=MOTION_PE_LENGTH, ops=ops)


def _insert_index(block: nn.Module, spatial_transformer: type, res_block: type) -> int | None:
    """ADE's rule: after the last spatial transformer, else after the first ResBlock, else none."""
    types = [type(layer) for layer in block]
    if spatial_transformer in types:
        return len(types) - types[::-1].index(spatial_transformer)
    return types.index(res_block) + 1 if res_block in types else None


def inject_motion_modules(unet, ops, dtype=None, device=None) -> None:
    """Put one VanillaTemporalModule into each down, mid and up block of `unet`, ADE's way. block_idx is
    the UNet level as ADE counts it: from the top for down blocks, from the bottom for up blocks."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    mmad = ade_motion_module_ad()
    groups = ((unet.input_blocks, mmad.BlockType.DOWN), ([unet.middle_block], mmad.BlockType.MID),
              (unet.output_blocks, mmad.BlockType.UP))
    for blocks, block_type in groups:
        level, modules_at_level = 0, 0
        for block in blocks:
            at = _insert_index(block, SpatialTransformer, ResBlock)
            if at is not None:
                channels = next(layer for layer in block if isinstance(layer, ResBlock)).out_channels
                module = _motion_module(mmad, channels, block_type, level, modules_at_level, ops)
                block.insert(at, module.to(dtype=dtype, device=device))
                modules_at_level += 1
            if any(isinstance(layer, (Downsample, Upsample)) for layer in block):
                level, modules_at_level = level + 1, 0


def forward_motion_module(layer, x, emb, context, transformer_options, *args, **kwargs):
    """forward_timestep_embed patch: how ComfyUI's UNet calls a motion module (the same call as ADE's)."""
    return layer(x, context, transformer_options=transformer_options)


def set_video_length(unet, video_length: int) -> None:
    mmad = ade_motion_module_ad()
    for module in unet.modules():
        if isinstance(module, mmad.VanillaTemporalModule):
            module.set_video_length(video_length, video_length)


def motion_transformer_options(batch_conds: int = 1) -> dict:
    mmad = ade_motion_module_ad()
    return {"patches": {"forward_timestep_embed_patch": [(mmad.VanillaTemporalModule, forward_motion_module)]},
            "cond_or_uncond": list(range(batch_conds))}


def training_ops():
    """comfy.ops with weight initialisation left on (ComfyUI's inference ops skip it)."""
    import comfy.ops

    base = comfy.ops.disable_weight_init

    class TrainingOps(base):
        pass

    for name in ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"):
        parent = getattr(base, name)
        torch_parent = getattr(nn, name)
        setattr(TrainingOps, name, type(name, (parent,), {"reset_parameters": torch_parent.reset_parameters}))
    return TrainingOps


def build_training_unet(seed: int):
    """A freshly initialised TinyVideo UNet with its motion modules (for tools/train_tinyvideo.py)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    ops = training_ops()
    unet = UNetModel(**UNET_CONFIG, num_heads=-1, num_head_channels=HEAD_CHANNELS, operations=ops)
    inject_motion_modules(unet, ops)
    return unet


def model_sampling():
    """SD1.5's discrete schedule with v-prediction, as ComfyUI builds it for this model."""
    import comfy.model_base

    return comfy.model_base.model_sampling(_model_config_class()({}), comfy.model_base.ModelType.V_PREDICTION)


def _model_config_class():
    import comfy.latent_formats
    import comfy.supported_models_base

    class TinyVideoLatent(comfy.latent_formats.LatentFormat):
        latent_channels = 4
        scale_factor = 1.0
        # latent previews show the video's own colours
        latent_rgb_factors = [[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0, 0, 0]]
        latent_rgb_factors_bias = [0.5, 0.5, 0.5]

    class TinyVideoConfig(comfy.supported_models_base.BASE):
        unet_config = dict(UNET_CONFIG)
        unet_extra_config = {"num_heads": -1, "num_head_channels": HEAD_CHANNELS}
        latent_format = TinyVideoLatent
        memory_usage_factor = 1.0
        supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]

        def model_type(self, state_dict, prefix=""):
            import comfy.model_base

            return comfy.model_base.ModelType.V_PREDICTION

    return TinyVideoConfig


def split_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    unet = {k[len("diffusion_model."):]: v for k, v in state_dict.items() if k.startswith("diffusion_model.")}
    prompt = {k[len("prompt."):]: v for k, v in state_dict.items() if k.startswith("prompt.")}
    if not unet or not prompt:
        raise TinyVideoError("not a TinyVideo checkpoint (needs diffusion_model.* and prompt.* tensors)")
    return unet, prompt


def join_state_dict(network: nn.Module, prompt: PromptEncoder) -> dict[str, Tensor]:
    """A checkpoint's tensors (TinyVideo's and TinyWan's layout): the network under diffusion_model.*, the
    prompt encoder under prompt.* (split_state_dict's inverse)."""
    state = {f"diffusion_model.{k}": v for k, v in network.state_dict().items()}
    state.update({f"prompt.{k}": v for k, v in prompt.state_dict().items()})
    return state


def save_file_fp16(path: Path, network: nn.Module, prompt: PromptEncoder, metadata: dict) -> None:
    """The checkpoint as the pack ships it: fp16 tensors, each metadata value as JSON."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in join_state_dict(network, prompt).items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})


def choose_dtypes(model_config, parameters: int):
    """ComfyUI's model management picks the load device and the weight / compute dtypes for a model of
    `parameters` parameters, and sets them on `model_config`; returns the (load device, weight dtype, manual
    cast dtype)."""
    import comfy.model_management as mm

    load_device = mm.get_torch_device()
    dtypes = model_config.supported_inference_dtypes
    unet_dtype = mm.unet_dtype(model_params=parameters, supported_dtypes=dtypes)
    manual_cast_dtype = mm.unet_manual_cast(unet_dtype, load_device, dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)
    return load_device, unet_dtype, manual_cast_dtype


def save_checkpoint(path: Path, unet: nn.Module, prompt: PromptEncoder, metadata: dict) -> None:
    save_file_fp16(path, unet, prompt, metadata)


PROMPT_ATTACHMENT = "streamline_tinyvideo_prompt"


def _prompt_encoder(prompt_sd: dict[str, Tensor]) -> PromptEncoder:
    encoder = PromptEncoder()
    encoder.load_state_dict({k: v.float() for k, v in prompt_sd.items()})
    return encoder.eval().requires_grad_(False)


def prompt_encoder_of(model) -> PromptEncoder:
    """The prompt encoder loaded with a TinyVideo MODEL (a ModelPatcher attachment)."""
    encoder = model.get_attachment(PROMPT_ATTACHMENT) if hasattr(model, "get_attachment") else None
    if encoder is None:
        raise TinyVideoError("this MODEL is not TinyVideo: connect the output of Load TinyVideo")
    return encoder


def load_model_patcher(path: Path = WEIGHTS_PATH, state_dict: dict[str, Tensor] | None = None):
    """TinyVideo as a ComfyUI MODEL (ModelPatcher): dtype and devices chosen by ComfyUI's model management."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    import comfy.patcher_extension
    from safetensors.torch import load_file

    if state_dict is None:
        if not Path(path).is_file():
            raise TinyVideoError(f"TinyVideo weights not found at {path}")
        state_dict = load_file(str(path))
    unet_sd, prompt_sd = split_state_dict(state_dict)
    config = _model_config_class()(dict(UNET_CONFIG))
    load_device, unet_dtype, manual_cast_dtype = choose_dtypes(config, sum(v.numel() for v in unet_sd.values()))
    base = config.get_model({}, "")
    ops = comfy.ops.pick_operations(unet_dtype, manual_cast_dtype)
    inject_motion_modules(base.diffusion_model, ops, dtype=unet_dtype)
    base.diffusion_model.load_state_dict({k: v.to(unet_dtype) for k, v in unet_sd.items()}, strict=True)
    base = base.to(mm.unet_offload_device())
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=mm.unet_offload_device())
    mmad = ade_motion_module_ad()
    patcher.set_model_forward_timestep_embed_patch((mmad.VanillaTemporalModule, forward_motion_module))
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "tinyvideo",
                                 video_length_wrapper)
    patcher.set_attachments(PROMPT_ATTACHMENT, _prompt_encoder(prompt_sd))
    return patcher


def video_length_wrapper(executor, x: Tensor, timesteps=None, context=None, y=None, control=None,
                         transformer_options=None, **kwargs):
    """Tell the motion modules how many frames each video in the batch has: the batch holds one video
    per cond entry (cond and uncond batched: two)."""
    transformer_options = {} if transformer_options is None else transformer_options
    conds = len(transformer_options.get("cond_or_uncond", [0])) or 1
    if x.shape[0] % conds:
        raise TinyVideoError(f"batch of {x.shape[0]} does not split into {conds} videos")
    video_length = x.shape[0] // conds
    if video_length > MOTION_PE_LENGTH:
        raise TinyVideoError(f"TinyVideo's motion modules encode at most {MOTION_PE_LENGTH} frames, got "
                             f"{video_length}")
    set_video_length(executor.class_obj, video_length)
    return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())



def untrained_state_dict(seed: int = 0) -> dict[str, Tensor]:
    """The checkpoint training starts from (same architecture, fresh initialisation): the yardstick the
    trained weights are compared with."""
    return join_state_dict(build_training_unet(seed), PromptEncoder())


def v_target(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """What a v-prediction model outputs for x0 noised to x0 + sigma * noise (sigma: (batch,))."""
    sigma = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (noise - sigma * x0) / (sigma * sigma + 1).sqrt()


@torch.no_grad()
def denoising_loss(model, videos: Tensor, words: Tensor, sigmas: Tensor, seed: int = 0) -> float:
    """Mean squared error of the noise a TinyVideo MODEL infers (from its denoised output, whatever its
    parameterisation) on `videos` (n, frames, 4, h, w), each video noised at each of `sigmas`."""
    base = model.model
    unet, sampling = base.diffusion_model, base.model_sampling
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    n, frames = videos.shape[:2]
    set_video_length(unet, frames)
    context = prompt_encoder_of(model)(words).repeat_interleave(frames, dim=0)
    g = torch.Generator().manual_seed(seed)
    x0 = videos.flatten(0, 1)
    losses = []
    for sigma_value in sigmas.tolist():
        sigma = torch.full((n * frames,), sigma_value)
        noise = torch.randn(x0.shape, generator=g)
        x = x0 + noise * sigma_value
        out = unet(sampling.calculate_input(sigma, x).to(device, dtype), sampling.timestep(sigma).float().to(device),
                   context=context.to(device, dtype), transformer_options=motion_transformer_options())
        denoised = sampling.calculate_denoised(sigma, out.float().cpu(), x)
        losses.append(torch.nn.functional.mse_loss((x - denoised) / sigma_value, noise).item())
    return sum(losses) / len(losses)
