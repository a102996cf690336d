"""Tiny random-weight models of the video families ComfyUI 0.33 loads that the pack runs unchanged.

CogVideoX (T2V, I2V, Fun inpaint), Kandinsky 5 (video), Cosmos 1 (GeneralDIT: T2V, I2V), Cosmos Predict2
(MiniTrainDIT: its T2I / video-to-world model and I2V), Mochi (genmo AsymmDiTJoint) and SeedVR2 (NaDiT), each
built from the host's real class and loaded through ComfyUI's loader (testing/model_families.py `load`), which
detects the family from the keys. Where the key reader fixes sizes no tiny model has (Mochi: 48 blocks 3072 wide;
Cosmos 1: 28 or 36 blocks 4096 or 5120 wide; SeedVR2: 32 or 36 blocks 2560 or 3072 wide), `Family.detected`
gives the tiny sizes, merged over what detection read (model_families.load): the family, the supported_models
class and the model_base class are still the ones detection picks from the keys.

    patcher = load(VIDEO_FAMILIES["CogVideoX_T2V"])
"""
from __future__ import annotations

import torch

from .model_families import TOKENS, Family, _ops

NEEDS_033 = "comfy.supported_models:"  # each of these is ComfyUI 0.33's; 0.3.64 has some (host_lacks says which)


def _cogvideox(in_channels: int) -> torch.nn.Module:
    from comfy.ldm.cogvideo.model import CogVideoXTransformer3DModel

    # detection: heads = width // 64, head dim 64; RoPE when the file has no learned positions
    return CogVideoXTransformer3DModel(num_attention_heads=1, attention_head_dim=64, in_channels=in_channels,
                                       time_embed_dim=32, text_embed_dim=4096, num_layers=2,
                                       use_rotary_positional_embeddings=True, dtype=torch.float32, device="cpu",
                                       operations=_ops())


def _kandinsky5() -> torch.nn.Module:
    from comfy.ldm.kandinsky5.model import Kandinsky5

    # detection reads widths and block counts; a width other than 1792/2560/4096 keeps head dim 64 (16+24+24);
    # visual_embed_dim 132 = (16 noise + 16 image + 1 mask channels) x the 1x2x2 patch (the video models)
    return Kandinsky5(model_dim=128, ff_dim=256, time_dim=32, visual_embed_dim=132, num_text_blocks=1,
                      num_visual_blocks=2, dtype=torch.float32, device="cpu", operations=_ops())


# detection: 28 blocks x 32 heads at width 4096 (7B) or 36 x 40 (5120, 14B); any other width takes the 14B
# branch, whose per-block positions (GeneralDIT's "sincos" default) the class rejects: the 7B branch's here
COSMOS1_TINY = {"num_blocks": 2, "num_heads": 2, "extra_per_block_abs_pos_emb_type": "learnable",
                "rope_h_extrapolation_ratio": 1.0, "rope_w_extrapolation_ratio": 1.0, "rope_t_extrapolation_ratio": 2.0}


def _cosmos1(in_channels: int) -> torch.nn.Module:
    from comfy.ldm.cosmos.model import GeneralDIT

    # as detection configures Cosmos 1, with COSMOS1_TINY
    return GeneralDIT(max_img_h=240, max_img_w=240, max_frames=128, in_channels=in_channels, out_channels=16,
                      patch_spatial=2, patch_temporal=1, concat_padding_mask=True, model_channels=128,
                      block_config="FA-CA-MLP", pos_emb_cls="rope3d", pos_emb_learnable=False,
                      pos_emb_interpolation="crop", block_x_format="THWBD", affline_emb_norm=True,
                      use_adaln_lora=True, adaln_lora_dim=256, extra_per_block_abs_pos_emb=True, **COSMOS1_TINY,
                      dtype=torch.float32, device="cpu", operations=_ops())


def _cosmos_predict2(in_channels: int) -> torch.nn.Module:
    from comfy.ldm.cosmos.predict2 import MiniTrainDIT

    # detection reads the width and block count; at a width other than 2048/5120 the class's 16 heads stay
    ratios = (dict(rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0) if in_channels == 16 else
              dict(rope_h_extrapolation_ratio=3.0, rope_w_extrapolation_ratio=3.0))
    return MiniTrainDIT(max_img_h=240, max_img_w=240, max_frames=128, in_channels=in_channels, out_channels=16,
                        patch_spatial=2, patch_temporal=1, concat_padding_mask=True, model_channels=256,
                        num_blocks=2, crossattn_emb_channels=1024, pos_emb_cls="rope3d", pos_emb_learnable=True,
                        pos_emb_interpolation="crop", min_fps=1, max_fps=30, use_adaln_lora=True,
                        adaln_lora_dim=256, extra_per_block_abs_pos_emb=False, **ratios, dtype=torch.float32,
                        device="cpu", operations=_ops())


# detection: 48 blocks, 3072 wide, 24 heads; the block asserts a 12288-wide MLP (3072 x 4)
MOCHI_TINY = {"depth": 2, "hidden_size_x": 128, "hidden_size_y": 64, "num_heads": 2, "mlp_ratio_x": 96.0}


def _mochi() -> torch.nn.Module:
    from comfy.ldm.genmo.joint_model.asymm_models_joint import AsymmDiTJoint

    # detection's fixed Mochi preview config at MOCHI_TINY's sizes
    return AsymmDiTJoint(patch_size=2, mlp_ratio_y=4.0, learn_sigma=False, in_channels=12,
                         qk_norm=True, qkv_bias=False, out_bias=True, attn_drop=0.0, patch_embed_bias=True,
                         posenc_preserve_area=True, timestep_mlp_bias=True, attend_to_padding=False,
                         timestep_scale=1000.0, use_t5=True, t5_feat_dim=4096, t5_token_length=256,
                         rope_theta=10000.0, **MOCHI_TINY, dtype=torch.float32, device="cpu", operations=_ops())


# detection of SeedVR2 3B needs its 32nd block's key; every block at width 128 (one 128-wide head)
SEEDVR2_TINY = {"vid_dim": 128, "heads": 1}


def _seedvr2() -> torch.nn.Module:
    from comfy.ldm.seedvr.model import NaDiT

    return NaDiT(norm_eps=1e-5, num_layers=32, mlp_type="swiglu", vid_out_norm=True, **SEEDVR2_TINY,
                 dtype=torch.float32, device="cpu", operations=_ops())


def _text(g: torch.Generator, width: int) -> torch.Tensor:
    return torch.randn(1, TOKENS, width, generator=g)


def _no_extras(g: torch.Generator, positive: bool) -> dict:
    return {}


def _cogvideox_i2v_extras(g: torch.Generator, positive: bool) -> dict:
    """As the CogVideoX image-to-video nodes give it: the start image's latent (16 channels)."""
    return {"concat_latent_image": torch.randn(1, 16, 1, 4, 4, generator=g)}


def _kandinsky5_extras(g: torch.Generator, positive: bool) -> dict:
    """Kandinsky 5's text encoder gives Qwen hidden states (the cross-attention tokens) and CLIP's pooled output."""
    return {"pooled_output": torch.randn(1, 768, generator=g)}


def _cosmos_extras(g: torch.Generator, positive: bool) -> dict:
    return {"frame_rate": 24}


def _mochi_extras(g: torch.Generator, positive: bool) -> dict:
    """Mochi's T5 conditioning carries its attention mask (every token real here)."""
    return {"attention_mask": torch.ones(1, TOKENS, dtype=torch.long)}


def _seedvr2_extras(g: torch.Generator, positive: bool) -> dict:
    """As SeedVR2Conditioning gives it: the low-quality video's latent and a mask channel (17 channels)."""
    return {"condition": torch.randn(1, 17, 2, 4, 4, generator=torch.Generator().manual_seed(4))}


def _needs(model_class: str, supported: str) -> tuple[str, ...]:
    return (model_class, NEEDS_033 + supported)


_COGVIDEOX = "comfy.ldm.cogvideo.model:CogVideoXTransformer3DModel"
VIDEO_FAMILIES = {f.name: f for f in (
    Family("CogVideoX_T2V", lambda: _cogvideox(16), "", (1, 16, 2, 4, 4), 4096, _no_extras, sliced=False,
           needs=_needs(_COGVIDEOX, "CogVideoX_T2V")),
    Family("CogVideoX_I2V", lambda: _cogvideox(32), "", (1, 16, 2, 4, 4), 4096, _cogvideox_i2v_extras,
           sliced=False, needs=_needs(_COGVIDEOX, "CogVideoX_I2V")),
    Family("CogVideoX_Inpaint", lambda: _cogvideox(48), "", (1, 16, 2, 4, 4), 4096, _cogvideox_i2v_extras,
           sliced=False, needs=_needs(_COGVIDEOX, "CogVideoX_Inpaint")),
    Family("Kandinsky5", _kandinsky5, "", (1, 16, 2, 4, 4), 3584, _kandinsky5_extras, sliced=False,
           needs=_needs("comfy.ldm.kandinsky5.model:Kandinsky5", "Kandinsky5")),
    Family("CosmosT2V", lambda: _cosmos1(16), "", (1, 16, 2, 4, 4), 1024, _cosmos_extras, sliced=False,
           detected=COSMOS1_TINY),
    Family("CosmosI2V", lambda: _cosmos1(17), "", (1, 16, 2, 4, 4), 1024, _cosmos_extras, sliced=False,
           detected=COSMOS1_TINY),
    Family("CosmosT2IPredict2", lambda: _cosmos_predict2(16), "", (1, 16, 2, 4, 4), 1024, _cosmos_extras,
           sliced=False),
    Family("CosmosI2VPredict2", lambda: _cosmos_predict2(17), "", (1, 16, 2, 4, 4), 1024, _cosmos_extras,
           sliced=False),
    Family("GenmoMochi", _mochi, "", (1, 12, 2, 4, 4), 4096, _mochi_extras, sliced=False, detected=MOCHI_TINY),
    Family("SeedVR2", _seedvr2, "", (1, 16, 2, 4, 4), 5120, _seedvr2_extras, sliced=False, detected=SEEDVR2_TINY,
           needs=_needs("comfy.ldm.seedvr.model:NaDiT", "SeedVR2")),
)}


# -- MiniMax H3 (comfy/ldm/minimax/model.py), the pack's MiniMax family -------------------------------------
MINIMAX_TEXT_DIM = 48  # Qwen3-VL hidden states (5120 on H3); detection reads it from condition_proj
MINIMAX_AUDIO_T = 6  # audio latent frames of the tiny clip (2 stereo rows each)


def minimax(num_layers: int = 4, hidden: int = 64, heads: int = 2, head_dim: int = 32, ffn: int = 96,
            rope_len: int = 4) -> torch.nn.Module:
    """A tiny MiniMaxH3Model as detection reads it (every size from the keys): packed text, audio and video
    tokens, one DiTBlock stack. rope_len inverse frequencies per axis: RoPE on 6 x rope_len of each head's
    dims (H3: 16, on 96 of 128)."""
    from comfy.ldm.minimax.model import MiniMaxH3Model

    model = MiniMaxH3Model(hidden_size=hidden, num_layers=num_layers, token_refiner_num_layers=1,
                           num_attention_heads=heads, attention_head_dim=head_dim, ffn_hidden_size=ffn,
                           text_dim=MINIMAX_TEXT_DIM, timestep_input_dim=32, time_embed_hidden_size=hidden,
                           time_embed_dim=32, rope_inv_freq_len=rope_len, dtype=torch.float32, device="cpu",
                           operations=_ops())
    # the checkpoint's buffer (the model leaves it empty): RoPE's usual 10000^(-i/n) frequencies
    model.rope.inv_freq.copy_(10000.0 ** (-torch.arange(rope_len, dtype=torch.float32) / rope_len))
    return model


def minimax_latent(frames: int = 2, h: int = 4, w: int = 6, audio_t: int = MINIMAX_AUDIO_T) -> dict:
    """An empty AV latent as EmptyMiniMaxH3LatentAV gives it: NestedTensor(video (1, 24, T, H, W), audio
    (1, 32, 2, audio_t))."""
    import comfy.nested_tensor

    return {"samples": comfy.nested_tensor.NestedTensor((torch.zeros(1, 24, frames, h, w),
                                                         torch.zeros(1, 32, 2, audio_t)))}


def _minimax_extras(g: torch.Generator, positive: bool) -> dict:
    return {}


# the 4-block tiny H3 (the positive/negative text: TOKENS Qwen states of MINIMAX_TEXT_DIM); its latent is
# minimax_latent(), not Family.latent()
MINIMAX = Family("MiniMaxH3", minimax, "", (1, 24, 2, 4, 6), MINIMAX_TEXT_DIM, _minimax_extras, sliced=True,
                 needs=("comfy.ldm.minimax.model:MiniMaxH3Model", NEEDS_033 + "MiniMaxH3"))
