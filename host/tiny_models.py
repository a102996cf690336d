"""Tiny random models of each family, built from the host's own classes, for the self-checks of the
host verdict (host/fingerprints.py): small enough that a check runs well under a second on a CPU,
with every layer kind the family's sliced forward mirrors (ResBlocks, spatial transformers, down/upsampling,
SVD's video layers, Wan's i2v cross-attention)."""
from __future__ import annotations

import torch
import torch.nn as nn

DTYPE = torch.float64


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """ComfyUI builds layers without initialising them (the weights come from a file): fill every parameter
    and buffer with small random values, norms' scales near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=g, dtype=torch.float64) * 0.2
            if "norm" in name and name.endswith("weight"):
                values = values + 1.0
            tensor.copy_(values.to(tensor.dtype))
    return module.eval()


def unet(video: bool = False, seed: int = 0) -> nn.Module:
    """A two-level UNetModel: ResBlocks, linear-projection transformers, a Downsample and an Upsample;
    with `video`, SVD's VideoResBlock / SpatialVideoTransformer layers and its ADM input."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1],
                  channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_middle=1,
                  transformer_depth_output=[1, 1, 1, 1], context_dim=8, num_head_channels=8,
                  use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False, dtype=DTYPE,
                  device="cpu", operations=comfy.ops.disable_weight_init)
    if video:
        config.update(adm_in_channels=12, num_classes="sequential", use_temporal_resblock=True,
                      use_temporal_attention=True, extra_ff_mix_layer=True, use_spatial_context=True,
                      merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
                      disable_temporal_crossattention=False)
    return randomize(UNetModel(**config), seed)


def wan(i2v: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A two-block WanModel (t2v, or i2v with CLIP-image tokens), 2 heads of 8 channels. float32: ComfyUI
    0.33's RoPE kernel (comfy-kitchen) takes no float64."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    model = WanModel(model_type="i2v" if i2v else "t2v", patch_size=(1, 2, 2), text_len=8, in_dim=4, dim=16,
                     ffn_dim=32, freq_dim=16, text_dim=8, out_dim=4, num_heads=2, num_layers=2, cross_attn_norm=True,
                     in_dim_ref_conv=None, image_model=None, dtype=dtype, device="cpu",
                     operations=comfy.ops.disable_weight_init)
    return randomize(model, seed)


def minimax(seed: int = 0) -> nn.Module:
    """A three-block MiniMaxH3Model (ComfyUI 0.33's), 2 heads of 16 channels, RoPE on 12 of them, float32 (the
    host's in-place RoPE kernel takes no float64 and no weights that need gradients)."""
    import comfy.ops
    from comfy.ldm.minimax.model import MiniMaxH3Model

    model = MiniMaxH3Model(hidden_size=32, num_layers=3, token_refiner_num_layers=1, num_attention_heads=2,
                           attention_head_dim=16, ffn_hidden_size=48, text_dim=8, timestep_input_dim=16,
                           time_embed_hidden_size=32, time_embed_dim=16, rope_inv_freq_len=2,
                           dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    return randomize(model, seed).requires_grad_(False)


def inputs(shape: tuple[int, ...], seed: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def ltxv(audio: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> nn.Module:
    """A two-block LTXVModel, or with `audio` LTX-2's LTXAVModel (audio stream, audio<->video attention, tiny
    text connectors), 2 heads of 8 video channels (audio: 2 of 4). float32: the host's RoPE kernel (comfy-kitchen)
    takes no float64. config: further constructor arguments (cross_attention_adaln, apply_gated_attention)."""
    import comfy.ops

    base = dict(in_channels=8, cross_attention_dim=16, attention_head_dim=8, num_attention_heads=2,
                caption_channels=8, num_layers=2, dtype=dtype, device="cpu", operations=comfy.ops.disable_weight_init)
    if not audio:
        from comfy.ldm.lightricks.model import LTXVModel

        return randomize(LTXVModel(**{**base, **config}), seed)
    from comfy.ldm.lightricks.av_model import LTXAVModel

    av = dict(audio_in_channels=128, audio_cross_attention_dim=8, audio_attention_head_dim=4,
              audio_num_attention_heads=2, connector_attention_head_dim=4, connector_num_attention_heads=2,
              connector_num_layers=1)
    return randomize(LTXAVModel(**{**base, **av, **config}), seed)


def ltxv_inputs(model: nn.Module, audio: bool = False, batch: int = 2, seed: int = 1,
                frames: int = 3, height: int = 2, width: int = 3, audio_frames: int = 5) -> dict:
    """A call of ltxv(): {"args": (x, timestep, context, attention_mask), "kwargs": {...}} (video: 18 tokens)."""
    dtype = next(model.parameters()).dtype
    video = inputs((batch, model.in_channels, frames, height, width), seed, dtype)
    x = [video, inputs((batch, 8, audio_frames, 16), seed + 1, dtype)] if audio else video
    timestep = torch.tensor([0.3, 0.7][:batch] + [0.5] * max(0, batch - 2), dtype=dtype)
    context = inputs((batch, 6, model.caption_channels * (2 if audio else 1)), seed + 2, dtype)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[-1, -2:] = 0  # the last prompt is shorter: a text mask that is not all ones
    return {"args": (x, timestep, context, mask), "kwargs": {"frame_rate": 25}}
