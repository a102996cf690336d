"""Tiny random-weight models of the families ComfyUI loads, through ComfyUI's own loader.

Each family is built by instantiating the host's real diffusion-model class (UNetModel, WanModel,
LTXVModel, Flux) with a tiny configuration, taking its state dict under the key prefix the family's
files use, and loading that through `comfy.sd.load_diffusion_model_state_dict`, which detects the family
from the keys and shapes (comfy/model_detection.py). What detection fixes stays as the family has it
(SDXL's 320 channels and 2/10 transformer blocks, Flux's 3072-wide double block, 128 channels per Wan
head); everything else is as small as detection allows, so a sampling step takes well under a second
on one CPU thread. Conditioning is random, in ComfyUI's CONDITIONING format, with the extras each
family's `extra_conds` reads (comfy/model_base.py).

    patcher = load(FAMILIES["WAN21_T2V"])      # a MODEL, as a loader node outputs it
    positive, negative = FAMILIES["WAN21_T2V"].conds()
"""
from __future__ import annotations

import functools
import importlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from .weights import randomize_

UNET_PREFIX = "model.diffusion_model."  # checkpoints of UNet models; DiT families ship bare diffusion-model files
TOKENS = 8  # cross-attention tokens of the random prompts


@dataclass(frozen=True)
class Family:
    name: str  # type(patcher.model.model_config).__name__ after loading
    build: Callable[[], torch.nn.Module]  # the host's diffusion-model class, tiny, weights not initialised
    prefix: str  # key prefix of the family's model files
    latent_shape: tuple[int, ...]  # EmptyLatent-style latent for one clip or image
    context_dim: int
    cond_extras: Callable[[torch.Generator, bool], dict]  # (generator, positive) -> the cond dict's extras
    sliced: bool  # Streamline Model Patch and Memory Budget slice this family (UNets, SVD, Wan); others run unchanged
    cfg: float = 5.0
    rehash_split: bool | None = None  # Step Rehash splits its calls (None: as `sliced`)
    # the "transformer" entry of the model file's "config" metadata, which detection merges over what it reads
    # from the keys (comfy/model_detection.py): the one way a file names a variant its keys cannot tell apart
    transformer_config: dict | None = field(default=None, compare=False)
    needs: tuple[str, ...] = ()  # "module:attribute" the host must have (variants newer hosts added); see host_lacks
    random_latent: bool = False  # latent(): random, not zeros (image-to-image flow models start from the input)
    # sizes merged over what detection reads from the keys, where its key reader fixes sizes no tiny model has
    # (Mochi's 48 blocks 3072 wide): the family, its supported_models and model_base classes stay detection's
    detected: dict | None = field(default=None, compare=False)
    # max|sliced - plain| / max|plain| of a sampled clip, where sampling amplifies the forward's float32 reordering
    # (None: the tests' 1e-5). SV3D: one forward differs by 2.3e-6 (SVD's: 2.9e-6, the same layers), its two sampled
    # steps on random weights by 3.4e-5 to 7.4e-5; a dropped or misapplied operation differs by 1e-3 and more
    sampled_tolerance: float | None = None

    @property
    def rehashes(self) -> bool:
        return self.sliced if self.rehash_split is None else self.rehash_split

    def conds(self, seed: int = 1) -> tuple[list, list]:
        """Positive and negative CONDITIONING: [[cross-attention tokens (1, TOKENS, context_dim), extras]]."""
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, TOKENS, self.context_dim, generator=g), self.cond_extras(g, True)]],
                [[torch.randn(1, TOKENS, self.context_dim, generator=g), self.cond_extras(g, False)]])

    def latent(self) -> dict:
        if self.random_latent:
            return {"samples": torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(3))}
        return {"samples": torch.zeros(self.latent_shape)}


def _ops():
    import comfy.ops

    return comfy.ops.disable_weight_init  # what ComfyUI builds with: no init, the weights come from the file


def _unet(**config) -> torch.nn.Module:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, use_spatial_transformer=True,
                legacy=False, dtype=torch.float32, device="cpu", operations=_ops())
    return UNetModel(**{**base, **config})


def _sd15() -> torch.nn.Module:
    # two levels, one ResBlock + transformer each: SD15 detection needs 320 channels and 768-d context
    return _unet(num_res_blocks=[1, 1], channel_mult=[1, 1], transformer_depth=[1, 1], transformer_depth_middle=1,
                 transformer_depth_output=[1, 1, 1, 1], context_dim=768, num_heads=8, num_head_channels=-1,
                 use_linear_in_transformer=False)


def _sdxl() -> torch.nn.Module:
    # SDXL detection: 320 channels, transformer depth [0, 0, 2, 2, 10, 10], 2048-d context, 2816-d ADM;
    # the widths (channel_mult) and the output side are free
    return _unet(num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_middle=1, transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], context_dim=2048,
                 num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential")


def _svd() -> torch.nn.Module:
    # SVD detection: 8 input channels, 320 channels, transformer depth [1]*6 + [0, 0], time_stack layers,
    # 1024-d context, 768-d ADM (fps, motion bucket, augmentation); attention in the output blocks of the
    # two upper levels only (lighter than svd_reduced)
    return _unet(**_svd_config([1, 1, 1, 1], transformer_depth_output=[1] * 6 + [0] * 6))


def _sv3d(adm_in_channels: int):
    # SV3D_u / SV3D_p detection: SVD's layout with an ADM of 256 (augmentation) or 1280 (+ elevation, azimuth)
    def build() -> torch.nn.Module:
        config = {**_svd_config([1, 1, 1, 1], transformer_depth_output=[1] * 6 + [0] * 6),
                  "adm_in_channels": adm_in_channels}
        return _unet(**config)
    return build


def _svd_config(channel_mult: list[int], transformer_depth_output: list[int] | None = None) -> dict:
    """SVD's UNet config at `channel_mult`; transformer_depth_output (ComfyUI pops it from the end: the last
    entry is the deepest output block) defaults to SVD's own, attention at the three upper levels."""
    return dict(in_channels=8, num_res_blocks=[2, 2, 2, 2], channel_mult=channel_mult,
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                transformer_depth_output=transformer_depth_output or [1] * 9 + [0] * 3, context_dim=1024,
                num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=768, num_classes="sequential",
                use_temporal_resblock=True, use_temporal_attention=True, extra_ff_mix_layer=True,
                use_spatial_context=True, merge_strategy="learned_with_images", merge_factor=0.0,
                video_kernel_size=[3, 1, 1], disable_temporal_crossattention=False)


def svd_layout(model_channels: int = 320, dtype: torch.dtype = torch.float32, device="cpu") -> torch.nn.Module:
    """SVD's real layout: channel multipliers 1/2/4/4 (at 320 channels SVD's own widths, ~1.5G parameters,
    6 GB in fp32: more than ComfyUI's loader fits in a small machine's memory; at 64, 64/128/256/256 channels,
    built directly, not through the loader, whose SVD detection needs 320)."""
    return _unet(**_svd_config([1, 2, 4, 4]), model_channels=model_channels, dtype=dtype, device=device)


def svd_reduced() -> torch.nn.Module:
    """SVD's layout (4 levels, 2 VideoResBlocks + SpatialVideoTransformers per level, as detection needs)
    at 320 channels on every level: the fast one (~0.2G parameters)."""
    return _unet(**_svd_config([1, 1, 1, 1]))


def _wan21_t2v() -> torch.nn.Module:
    from comfy.ldm.wan.model import WanModel

    # detection: heads = dim // 128; the text embedding reads 4096-d T5 features
    return WanModel(model_type="t2v", dim=128, ffn_dim=256, num_heads=1, num_layers=1, in_dim=16, out_dim=16,
                    cross_attn_norm=True, dtype=torch.float32, device="cpu", operations=_ops())


def wan(model_type: str = "t2v", in_dim: int = 16, out_dim: int = 16, dim: int = 128, ffn_dim: int = 256,
        num_layers: int = 1) -> torch.nn.Module:
    """A tiny WanModel as detection reads it (heads = dim // 128, 4096-d text features, 1280-d CLIP image
    features for i2v): WAN21_T2V (t2v, in/out 16), WAN21_I2V (i2v, in 36: noise + 4 mask + 16 image
    channels), WAN22_T2V (the 5B TI2V: t2v, in/out 48). ffn_dim and num_layers are free."""
    from comfy.ldm.wan.model import WanModel

    return WanModel(model_type=model_type, dim=dim, ffn_dim=ffn_dim, num_heads=dim // 128, num_layers=num_layers,
                    in_dim=in_dim, out_dim=out_dim, cross_attn_norm=True, dtype=torch.float32, device="cpu",
                    operations=_ops())


def ltxv(num_layers: int = 1, **config) -> torch.nn.Module:
    """A tiny LTXVModel as detection reads it: 32 heads, head dim = attn2 width // 32; cross-attention reads the
    projected caption (inner width). config: what a model file's metadata adds (cross_attention_adaln)."""
    from comfy.ldm.lightricks.model import LTXVModel

    return LTXVModel(**{**dict(in_channels=128, cross_attention_dim=128, attention_head_dim=4, num_attention_heads=32,
                               caption_channels=4096, num_layers=num_layers, dtype=torch.float32, device="cpu",
                               operations=_ops()), **config})


def _ltxv() -> torch.nn.Module:
    return ltxv()


# LTX-2 (LTXAVModel): detection reads the video width from attn2 (32 heads) and the layer count; the rest comes
# from the model file's "config" metadata, as LTX-2's files carry it (audio stream 32 heads of 2, text
# connectors of 2 heads of 4, 8-d captions: its processed context is 2 x 8 wide)
LTXAV_CONFIG = dict(audio_cross_attention_dim=64, audio_attention_head_dim=2, audio_num_attention_heads=32,
                    caption_channels=8, connector_attention_head_dim=4, connector_num_attention_heads=2,
                    connector_num_layers=1)


def ltxav(num_layers: int = 1, **config) -> torch.nn.Module:
    """A tiny LTXAVModel (LTX-2: video and audio streams, audio<->video cross-attention)."""
    from comfy.ldm.lightricks.av_model import LTXAVModel

    return LTXAVModel(**{**dict(in_channels=128, audio_in_channels=128, cross_attention_dim=128, attention_head_dim=4,
                                num_attention_heads=32, num_layers=num_layers, dtype=torch.float32, device="cpu",
                                operations=_ops()), **LTXAV_CONFIG, **config})


def _flux() -> torch.nn.Module:
    import dataclasses

    from comfy.ldm.flux.model import Flux, FluxParams

    # detection fixes the width (3072, 24 heads) and the 4096-d T5 context; one double block, no single ones.
    # ComfyUI 0.33's FluxParams has txt_ids_dims (Flux.1: none), which 0.3.64's lacks.
    newer = {"txt_ids_dims": []} if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)} else {}
    return Flux(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                num_heads=24, depth=1, depth_single_blocks=0, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                qkv_bias=True, guidance_embed=True, dtype=torch.float32, device="cpu", operations=_ops(), **newer)


def _no_extras(g: torch.Generator, positive: bool) -> dict:
    return {}


def _sdxl_extras(g: torch.Generator, positive: bool) -> dict:
    return {"pooled_output": torch.randn(1, 1280, generator=g), "width": 64, "height": 64}


def _svd_extras(g: torch.Generator, positive: bool) -> dict:
    """As SVD_img2vid_Conditioning gives them (its negative: a zero image)."""
    image = torch.randn(1, 4, 8, 8, generator=g)
    return {"concat_latent_image": image if positive else torch.zeros_like(image), "fps": 6, "motion_bucket_id": 127,
            "augmentation_level": 0.0}


def _sv3d_extras(g: torch.Generator, positive: bool) -> dict:
    """As SV3D_Conditioning gives them: the image latent, an augmentation level, the orbit's elevation and azimuth."""
    image = torch.randn(1, 4, 8, 8, generator=g)
    return {"concat_latent_image": image if positive else torch.zeros_like(image), "augmentation_level": 0.0,
            "elevation": 10.0, "azimuth": 30.0}


def _ltxv_extras(g: torch.Generator, positive: bool) -> dict:
    return {"attention_mask": torch.ones(1, TOKENS, dtype=torch.long), "frame_rate": 25}


def _flux_extras(g: torch.Generator, positive: bool) -> dict:
    return {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}


FAMILIES = {f.name: f for f in (
    Family("SD15", _sd15, UNET_PREFIX, (2, 4, 8, 8), 768, _no_extras, sliced=True),
    Family("SDXL", _sdxl, UNET_PREFIX, (2, 4, 8, 8), 2048, _sdxl_extras, sliced=True),
    Family("SVD_img2vid", _svd, UNET_PREFIX, (2, 4, 8, 8), 1024, _svd_extras, sliced=True, cfg=2.5),
    Family("SV3D_u", _sv3d(256), UNET_PREFIX, (2, 4, 8, 8), 1024, _sv3d_extras, sliced=True, cfg=2.5,
           sampled_tolerance=1e-4),
    Family("SV3D_p", _sv3d(1280), UNET_PREFIX, (2, 4, 8, 8), 1024, _sv3d_extras, sliced=True, cfg=2.5,
           sampled_tolerance=1e-4),
    Family("WAN21_T2V", _wan21_t2v, "", (1, 16, 2, 4, 4), 4096, _no_extras, sliced=True, rehash_split=True),
    Family("LTXV", _ltxv, "", (1, 128, 2, 2, 2), 4096, _ltxv_extras, sliced=True),
    Family("Flux", _flux, "", (1, 16, 4, 4), 4096, _flux_extras, sliced=False, cfg=1.0),
)}


def state_dict(family: Family, seed: int = 0) -> dict[str, torch.Tensor]:
    """The family's diffusion-model weights, random, under its file's key prefix."""
    module = randomize_(family.build(), seed)
    return {family.prefix + k: v for k, v in module.state_dict().items()}


def host_name() -> str:
    """The ComfyUI host as tests name it: its version and folder."""
    from pathlib import Path

    import comfy.model_patcher  # `comfy` itself is a namespace package: no __file__

    root = Path(comfy.model_patcher.__file__).resolve().parents[1]
    try:
        version = importlib.import_module("comfyui_version").__version__
    except (ImportError, AttributeError):
        version = "(version unknown)"
    return f"ComfyUI {version} at {root}"


def host_lacks(family: Family) -> str | None:
    """Why this host cannot load `family` (None: it can): the first of its `needs` the host does not have."""
    for need in family.needs:
        module, _, attribute = need.partition(":")
        try:
            found = hasattr(importlib.import_module(module), attribute)
        except ImportError:
            found = False
        if not found:
            return (f"{host_name()} has no {module}.{attribute}: {family.name} is a model of a newer host "
                    "(ComfyUI 0.33.0 loads it)")
    return None


@contextmanager
def _detected_sizes(sizes: dict | None):
    """ComfyUI's detection with `sizes` merged over the config it reads from the keys (None: as it is)."""
    import comfy.model_detection as detection

    real = detection.detect_unet_config
    if sizes is not None:
        detection.detect_unet_config = lambda *args, **kwargs: {**real(*args, **kwargs), **sizes}
    try:
        yield
    finally:
        detection.detect_unet_config = real


def load(family: Family, seed: int = 0):
    """A MODEL (ModelPatcher) of `family` through ComfyUI's diffusion-model loader, fp32."""
    import comfy.sd

    lacking = host_lacks(family)
    if lacking is not None:
        raise RuntimeError(lacking)
    options = {"model_options": {"dtype": torch.float32}}
    if family.transformer_config is not None:
        options["metadata"] = {"config": json.dumps({"transformer": family.transformer_config})}
    with _detected_sizes(family.detected):
        patcher = comfy.sd.load_diffusion_model_state_dict(state_dict(family, seed), **options)
    detected = type(patcher.model.model_config).__name__ if patcher is not None else None
    if detected != family.name:
        raise RuntimeError(f"ComfyUI detected {detected} from the tiny {family.name} weights")
    return patcher


def load_svd_reduced(seed: int = 0):
    """SVD_img2vid at SVD's layout and 320 channels on every level (svd_reduced), through ComfyUI's loader, fp32."""
    from dataclasses import replace

    return load(replace(FAMILIES["SVD_img2vid"], build=svd_reduced), seed)


CLIP_IMAGE_TOKENS = 257  # CLIP vision penultimate hidden states, as WAN21 i2v's clip_fea


class _ClipVisionOutput:
    """What CLIPVisionEncode outputs, as far as WAN21.extra_conds reads it."""

    def __init__(self, penultimate_hidden_states: torch.Tensor):
        self.penultimate_hidden_states = penultimate_hidden_states


def _wan_i2v_extras(g: torch.Generator, positive: bool) -> dict:
    """As WanImageToVideo gives them: the start image's latent (16 channels) and its CLIP vision output."""
    return {"concat_latent_image": torch.randn(1, 16, 2, 4, 4, generator=g),
            "clip_vision_output": _ClipVisionOutput(torch.randn(1, CLIP_IMAGE_TOKENS, 1280, generator=g))}


# Wan variants for the Wan slicing tests (tests/test_wan_exact.py); build them at other sizes with
# dataclasses.replace(variant, build=functools.partial(wan, ...)).
WAN_VARIANTS = {f.name: f for f in (
    FAMILIES["WAN21_T2V"],
    Family("WAN21_I2V", lambda: wan("i2v", in_dim=36), "", (1, 16, 2, 4, 4), 4096, _wan_i2v_extras, sliced=False),
    Family("WAN22_T2V", lambda: wan("t2v", in_dim=48, out_dim=48), "", (1, 48, 2, 4, 4), 4096, _no_extras,
           sliced=False),
)}


# -- Wan subclasses with their own forward_orig (comfy/ldm/wan/model.py, model_animate.py) ------------------
# Built from the real classes at dim 128 (one head: detection reads heads = dim // 128); everything the
# detection does not read from the weights stays at the class default, as ComfyUI rebuilds it so.

def _wan_kwargs(dim: int = 128, ffn_dim: int = 256, num_layers: int = 4, in_dim: int = 16, out_dim: int = 16) -> dict:
    return dict(dim=dim, ffn_dim=ffn_dim, num_heads=dim // 128, num_layers=num_layers, in_dim=in_dim, out_dim=out_dim,
                cross_attn_norm=True, dtype=torch.float32, device="cpu", operations=_ops())


def wan_vace(num_layers: int = 4, vace_layers: int = 2, **sizes) -> torch.nn.Module:
    """VaceWanModel (WAN21_Vace): VACE hints added to x after blocks 0, n/v, 2n/v, ...; its vace_context
    has 96 channels (32 of VACE frames + 64 of mask, as WAN21_Vace.extra_conds builds them)."""
    from comfy.ldm.wan.model import VaceWanModel

    return VaceWanModel(vace_layers=vace_layers, vace_in_dim=96, **_wan_kwargs(num_layers=num_layers, **sizes))


def wan_camera(num_layers: int = 4, **sizes) -> torch.nn.Module:
    """CameraWanModel (WAN21_Camera: i2v blocks, 32 input channels, a camera adapter on the patch embedding)."""
    from comfy.ldm.wan.model import CameraWanModel

    return CameraWanModel(model_type="camera", **_wan_kwargs(num_layers=num_layers, in_dim=32, **sizes))


def wan_s2v(num_layers: int = 4, **sizes) -> torch.nn.Module:
    """WanModel_S2V (WAN22_S2V): audio injected into x after blocks 0, 4, 8, ...; its block hook passes no
    transformer_options."""
    from comfy.ldm.wan.model import WanModel_S2V

    return WanModel_S2V(**_wan_kwargs(num_layers=num_layers, **sizes))


def wan_humo(num_layers: int = 4, **sizes) -> torch.nn.Module:
    """HumoWanModel (WAN21_HuMo, the 1.7B layout: 16 input channels): WanAttentionBlockAudio blocks."""
    from comfy.ldm.wan.model import HumoWanModel

    return HumoWanModel(**_wan_kwargs(num_layers=num_layers, **sizes))


def wan_animate(num_layers: int = 5, **sizes) -> torch.nn.Module:
    """AnimateWanModel (WAN22_Animate: i2v blocks, 36 input channels): pose latents added to the patch
    embedding, the face adapter's output added to x after blocks 0, 5, 10, ... (num_layers // 5 of them)."""
    from comfy.ldm.wan.model_animate import AnimateWanModel

    return AnimateWanModel(**_wan_kwargs(num_layers=num_layers, in_dim=36, **sizes))


S2V_AUDIO_LAYERS, S2V_AUDIO_DIM = 25, 1024  # wav2vec hidden states, as WanSoundImageToVideo hands them
HUMO_AUDIO = (8, 5, 1280)  # per latent frame: window x whisper layers x channels (AudioProjModel's input)
ANIMATE_FACE_SIZE = 512  # the face crops the motion encoder reads (its last 4x4 conv needs 512x512)




def _vace_extras(g: torch.Generator, positive: bool) -> dict:
    """As WanVaceToVideo gives them: VACE frames (32 channels: inactive + reactive latents), mask, strength."""
    return {"vace_frames": [torch.randn(1, 32, 2, 4, 4, generator=g)], "vace_mask": [torch.ones(1, 64, 2, 4, 4)],
            "vace_strength": [0.8]}


def _camera_extras(g: torch.Generator, positive: bool) -> dict:
    """As WanCameraImageToVideo gives them: the start image's latent, camera conditions (24 channels at 8x
    the latent's size) and the CLIP vision output. 16x16 latents, as _fun_control_extras says why."""
    return {"concat_latent_image": torch.randn(1, 16, 2, 16, 16, generator=g),
            "camera_conditions": torch.randn(1, 24, 2, 128, 128, generator=g),
            "clip_vision_output": _ClipVisionOutput(torch.randn(1, CLIP_IMAGE_TOKENS, 1280, generator=g))}


def _s2v_extras(g: torch.Generator, positive: bool) -> dict:
    """As WanSoundImageToVideo gives them: audio features, 4 per latent frame (zero on the negative)."""
    audio = torch.randn(1, S2V_AUDIO_LAYERS, S2V_AUDIO_DIM, 4 * 2, generator=g)
    return {"audio_embed": audio if positive else torch.zeros_like(audio)}


def _humo_extras(g: torch.Generator, positive: bool) -> dict:
    """As WanHuMoImageToVideo gives them: audio features per latent frame (zero on the negative)."""
    audio = torch.randn(1, 2, *HUMO_AUDIO, generator=g)
    return {"audio_embed": audio if positive else torch.zeros_like(audio)}


def _animate_extras(g: torch.Generator, positive: bool) -> dict:
    """As WanAnimateToVideo gives them: pose latents, face crops (pixels in [-1, 1]) and the CLIP vision output."""
    return {"pose_video_latent": torch.randn(1, 16, 1, 4, 4, generator=g),
            "face_video_pixels": torch.rand(1, 3, 1, ANIMATE_FACE_SIZE, ANIMATE_FACE_SIZE, generator=g) * 2 - 1,
            "clip_vision_output": _ClipVisionOutput(torch.randn(1, CLIP_IMAGE_TOKENS, 1280, generator=g))}


# -- Wan variants ComfyUI 0.33.0 loads (comfy/supported_models.py, model_base.py, ldm/wan/) -------------------
# Each through its own detection path. Three are picked from the file's "config" metadata, not from its keys
# (CausalAR, FlowRVS, Animate2: their keys are those of a plain t2v / i2v Wan); the rest from the keys.
# FunControl2V and Camera 2.2 load on ComfyUI 0.3.64 as well; the others need 0.33 (`needs`).

def wan_causal_ar(num_layers: int = 4, **sizes) -> torch.nn.Module:
    """CausalWanModel (WAN21_CausalAR_T2V, picked by the metadata's causal_ar): WanModel's weights and
    WanModel's forward_orig, with CausalWanAttentionBlock blocks (their own forward: KV-cached
    self-attention). Sampled through KSampler (no ar_state) it runs WanModel's forward."""
    from comfy.ldm.wan.ar_model import CausalWanModel

    return CausalWanModel(model_type="t2v", **_wan_kwargs(num_layers=num_layers, **sizes))


def wan_fun_control(num_layers: int = 4, **sizes) -> torch.nn.Module:
    """WAN21_FunControl2V: a plain i2v WanModel (CLIP-image embedding) with 48 input channels (noise + 16
    control-video + 16 start-image channels, no mask); model_base.WAN21 without image_to_video."""
    return wan("i2v", in_dim=48, num_layers=num_layers, **sizes)


def wan_camera22(num_layers: int = 4, **sizes) -> torch.nn.Module:
    """CameraWanModel as Wan 2.2 Fun Camera (WAN22_Camera, model_type camera_2.2): t2v blocks, no CLIP-image
    embedding, 36 input channels; model_base.WAN21_Camera, as WAN21_Camera."""
    from comfy.ldm.wan.model import CameraWanModel

    return CameraWanModel(model_type="camera_2.2", **_wan_kwargs(num_layers=num_layers, in_dim=36, **sizes))


def wan_flow_rvs(num_layers: int = 4, **sizes) -> torch.nn.Module:
    """WAN21_FlowRVS (picked by the metadata's model_type flow_rvs): a plain t2v WanModel under
    ModelType.IMG_TO_IMG_FLOW (sampling starts from the input video's latent, not from noise)."""
    return wan("t2v", num_layers=num_layers, **sizes)


def wan_scail(num_layers: int = 4, **sizes) -> torch.nn.Module:
    """SCAILWanModel (WAN21_SCAIL): i2v blocks, 20 input channels (noise + 4 mask), pose tokens from
    patch_embedding_pose appended to x, the reference latent as a leading frame."""
    from comfy.ldm.wan.model import SCAILWanModel

    return SCAILWanModel(**_wan_kwargs(num_layers=num_layers, in_dim=20, **sizes))


def wan_scail2(num_layers: int = 4, **sizes) -> torch.nn.Module:
    """SCAIL2WanModel (WAN21_SCAIL2): SCAIL plus patch_embedding_mask (28-channel identity masks added to the
    patch embeddings of the video and of the pose tokens)."""
    from comfy.ldm.wan.model import SCAIL2WanModel

    return SCAIL2WanModel(**_wan_kwargs(num_layers=num_layers, in_dim=20, **sizes))


def wan_dancer(num_layers: int = 4, **sizes) -> torch.nn.Module:
    """WanDancerModel (WAN22_WanDancer): i2v blocks, 36 input channels, a music encoder whose output an
    AudioInjector_WAN adds to x after blocks 0, 4, 8, ... (class default), patch_embedding_global and
    head_global for fps other than 30, a second CLIP-image embedding (img_emb_refimage)."""
    from comfy.ldm.wan.model_wandancer import WanDancerModel

    return WanDancerModel(**_wan_kwargs(num_layers=num_layers, in_dim=36, **sizes))


def wan_animate2(num_layers: int = 4, **sizes) -> torch.nn.Module:
    """WanAnimate2Model (WAN_Animate2, picked by the metadata's model_type animate2; an i2v checkpoint, 36
    input channels): WanAnimate2Block blocks, a pose branch run in lockstep that hands each block K/V."""
    from comfy.ldm.wan.model_animate2 import WanAnimate2Model

    return WanAnimate2Model(**_wan_kwargs(num_layers=num_layers, in_dim=36, **sizes))


DANCER_MUSIC_FEATURES = 35  # per audio frame: onset envelope, 20 MFCC, 12 chroma, peak, beat (WanDancerEncodeAudio)


def _clip_vision(g: torch.Generator) -> _ClipVisionOutput:
    return _ClipVisionOutput(torch.randn(1, CLIP_IMAGE_TOKENS, 1280, generator=g))


def _start_mask(frames: int, h: int, w: int) -> torch.Tensor:
    """concat_mask as the image-to-video nodes give it, (1, 4, frames, h, w): 0 on the known first frame."""
    mask = torch.ones(1, 4, frames, h, w)
    mask[:, :, :1] = 0.0
    return mask


def _fun_control_extras(g: torch.Generator, positive: bool) -> dict:
    """As WanFunControlToVideo gives them: 32 channels (control-video latent, start-image latent); the CLIP
    vision output. 16x16 latents (128 tokens): at fewer, the 257 CLIP-image tokens' work outweighs the
    tokens' and no token slicing lowers the Wan laws' peak, so Memory Budget would not slice."""
    return {"concat_latent_image": torch.randn(1, 32, 2, 16, 16, generator=g), "clip_vision_output": _clip_vision(g)}


def _camera22_extras(g: torch.Generator, positive: bool) -> dict:
    """As WanCameraImageToVideo gives them to a 2.2 model: start-image latent and mask, camera conditions."""
    return {"concat_latent_image": torch.randn(1, 16, 2, 4, 4, generator=g), "concat_mask": _start_mask(2, 4, 4),
            "camera_conditions": torch.randn(1, 24, 2, 32, 32, generator=g)}


def _scail_extras(g: torch.Generator, positive: bool) -> dict:
    """As WanSCAILToVideo gives them: the pose video's latent at half the size, a reference latent, the CLIP
    vision output (extra_conds adds the 4 mask channels to both latents)."""
    return {"pose_video_latent": torch.randn(1, 16, 2, 2, 2, generator=g),
            "reference_latents": [torch.randn(1, 16, 1, 4, 4, generator=g)], "clip_vision_output": _clip_vision(g)}


def _scail2_extras(g: torch.Generator, positive: bool) -> dict:
    """SCAIL's, plus the 28-channel identity masks WanSCAILToVideo gives SCAIL-2 (binary per colour, area
    averaged): the pose video's (its latent's size) and the reference's (one frame, then zeros over the
    video), and ref_mask_flag (animation mode)."""
    driving = (torch.rand(1, 2, 28, 2, 2, generator=g) > 0.5).float()
    ref_mask = torch.zeros(1, 1 + 2, 28, 4, 4)
    ref_mask[:, :1] = (torch.rand(1, 1, 28, 4, 4, generator=g) > 0.5).float()
    return {**_scail_extras(g, positive), "driving_mask_28ch": driving, "ref_mask_28ch": ref_mask,
            "ref_mask_flag": True}


def _dancer_extras(g: torch.Generator, positive: bool) -> dict:
    """As WanDancerVideo gives them: start-image latent and mask, the CLIP vision outputs of the first frame
    and of the reference image, and WanDancerEncodeAudio's music features (the same on both), fps and
    injection scale; fps 15 runs the model's global (non-30 fps) embedding and head."""
    music = torch.randn(1, 12, DANCER_MUSIC_FEATURES, generator=torch.Generator().manual_seed(5))
    return {"concat_latent_image": torch.randn(1, 16, 2, 8, 8, generator=g), "concat_mask": _start_mask(2, 8, 8),
            "clip_vision_output": _clip_vision(g), "clip_vision_output_ref": _clip_vision(g),
            "audio_embed": music, "fps": 15.0, "audio_inject_scale": 1.0}


def _animate2_extras(g: torch.Generator, positive: bool) -> dict:
    """As WanAnimate2ToVideo gives them: the reference image's latent frame then the video's (mask: the
    reference known), the pose video's latent (one frame less: the reference slot has none), the CLIP
    vision outputs and the pose branch's prompt (the same on both, as the node sets them)."""
    same = torch.Generator().manual_seed(6)
    mask = torch.ones(1, 1, 2, 4, 4)
    mask[:, :, :1] = 0.0
    return {"concat_latent_image": torch.randn(1, 16, 2, 4, 4, generator=g), "concat_mask": mask,
            "clip_vision_output": _clip_vision(g),
            "pose_video_latent": torch.randn(1, 16, 1, 4, 4, generator=same),
            "clip_vision_output_pose": _ClipVisionOutput(torch.randn(1, CLIP_IMAGE_TOKENS, 1280, generator=same)),
            "cross_attn_pose": torch.randn(1, TOKENS, 4096, generator=same)}


def _needs(model_class: str, supported: str) -> tuple[str, ...]:
    return (model_class, f"comfy.supported_models:{supported}")


# The Wan variants ComfyUI builds beyond plain t2v / i2v (tests/test_wan_variants.py): the WanModel subclasses
# with their own forward_orig, and the model_base variants over a class already here (FunControl2V, FlowRVS:
# WanModel; Camera 2.2: CameraWanModel), each through its own detection path. What the pack does with each is
# families/wan/patch.py WAN_SUBCLASSES; `sliced` / `rehash_split` are what it does today (the test's table of
# expectations is the authority).
WAN_SUBCLASS_VARIANTS = {f.name: f for f in (
    Family("WAN21_Vace", wan_vace, "", (1, 16, 2, 4, 4), 4096, _vace_extras, sliced=True, rehash_split=False),
    Family("WAN21_Camera", wan_camera, "", (1, 16, 2, 16, 16), 4096, _camera_extras, sliced=True, rehash_split=True),
    Family("WAN22_S2V", wan_s2v, "", (1, 16, 2, 4, 4), 4096, _s2v_extras, sliced=False, rehash_split=False),
    Family("WAN21_HuMo", wan_humo, "", (1, 16, 2, 4, 4), 4096, _humo_extras, sliced=False, rehash_split=False),
    Family("WAN22_Animate", wan_animate, "", (1, 16, 2, 4, 4), 4096, _animate_extras, sliced=True,
           rehash_split=False),
    # ComfyUI 0.33.0's
    Family("WAN21_CausalAR_T2V", wan_causal_ar, "", (1, 16, 2, 4, 4), 4096, _no_extras, sliced=False,
           transformer_config={"causal_ar": True},
           needs=_needs("comfy.ldm.wan.ar_model:CausalWanModel", "WAN21_CausalAR_T2V")),
    Family("WAN21_FunControl2V", wan_fun_control, "", (1, 16, 2, 16, 16), 4096, _fun_control_extras, sliced=True),
    Family("WAN22_Camera", wan_camera22, "", (1, 16, 2, 4, 4), 4096, _camera22_extras, sliced=True),
    Family("WAN21_FlowRVS", wan_flow_rvs, "", (1, 16, 2, 4, 4), 4096, _no_extras, sliced=True,
           transformer_config={"model_type": "flow_rvs"}, random_latent=True,
           needs=_needs("comfy.model_base:WAN21_FlowRVS", "WAN21_FlowRVS")),
    Family("WAN21_SCAIL", wan_scail, "", (1, 16, 2, 4, 4), 4096, _scail_extras, sliced=False,
           needs=_needs("comfy.ldm.wan.model:SCAILWanModel", "WAN21_SCAIL")),
    Family("WAN21_SCAIL2", wan_scail2, "", (1, 16, 2, 4, 4), 4096, _scail2_extras, sliced=False,
           needs=_needs("comfy.ldm.wan.model:SCAIL2WanModel", "WAN21_SCAIL2")),
    Family("WAN22_WanDancer", wan_dancer, "", (1, 16, 2, 8, 8), 4096, _dancer_extras, sliced=False,
           needs=_needs("comfy.ldm.wan.model_wandancer:WanDancerModel", "WAN22_WanDancer")),
    Family("WAN_Animate2", wan_animate2, "", (1, 16, 2, 4, 4), 4096, _animate2_extras, sliced=False,
           transformer_config={"model_type": "animate2"},
           needs=_needs("comfy.ldm.wan.model_animate2:WanAnimate2Model", "WAN_Animate2")),
)}
WAN_VARIANTS.update(WAN_SUBCLASS_VARIANTS)


# -- HunyuanVideo (comfy/ldm/hunyuan_video/model.py; detection: comfy/model_detection.py, supported_models.py) ------
# Detection reads heads = hidden // 128 and axes (16, 56, 56) for 3-d patches; the text refiner's input width, the
# block counts and the variant's extra modules come from the keys. 1.0: a CLIP-L pooled vector (vector_in, 768) and a
# guidance embedding; its I2V (33 input channels: noise, the image latent, a mask) has the same blocks. 1.5: no
# vector_in, a SigLIP vision projection (vision_in, 1152) and cond-type embeddings, 65 input channels (noise, image,
# mask) and 32 out. ComfyUI 0.3.64 has no 1.5 (its HunyuanVideo lacks vision_in).

def hunyuan_video(version: str = "1.0", in_channels: int | None = None, hidden: int = 256, depth: int = 2,
                  single: int = 2) -> torch.nn.Module:
    """A tiny HunyuanVideo as detection reads it (2 heads of 128 at hidden 256), fp32, weights not initialised."""
    import dataclasses

    from comfy.ldm.hunyuan_video.model import HunyuanVideo, HunyuanVideoParams

    v15 = version == "1.5"
    params = dict(in_channels=in_channels or (65 if v15 else 16), out_channels=32 if v15 else 16,
                  vec_in_dim=None if v15 else 768, context_in_dim=HUNYUAN_CONTEXT[version], hidden_size=hidden,
                  mlp_ratio=4.0, num_heads=hidden // 128, depth=depth, depth_single_blocks=single,
                  axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=not v15,
                  byt5=False, meanflow=False, use_cond_type_embedding=v15, vision_in_dim=1152 if v15 else None,
                  meanflow_sum=v15)
    fields = {f.name for f in dataclasses.fields(HunyuanVideoParams)}
    return HunyuanVideo(dtype=torch.float32, device="cpu", operations=_ops(),
                        **{k: v for k, v in params.items() if k in fields})


HUNYUAN_CONTEXT = {"1.0": 4096, "1.5": 3584}  # Llava-Llama-3 8B / Qwen2.5-VL 7B hidden states
SIGLIP_TOKENS = 729  # SigLIP (so400m, 384 px) image tokens, as HunyuanVideo 1.5's clip_fea


class _VisionOutput:
    """What CLIPVisionEncode outputs, as far as HunyuanVideo15.extra_conds reads it."""

    def __init__(self, last_hidden_state: torch.Tensor):
        self.last_hidden_state = last_hidden_state


def _hunyuan_extras(g: torch.Generator, positive: bool) -> dict:
    """As the HunyuanVideo text encoder gives them: the CLIP-L pooled vector (its tokens are cropped to the prompt:
    no attention mask; forward_orig's (1, 1, L) mask takes one row for the whole batch); guidance as the
    FluxGuidance node sets it."""
    return {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 6.0}


def _hunyuan15_extras(g: torch.Generator, positive: bool) -> dict:
    """As HunyuanVideo15ImageToVideo gives them: the start image's latent and its vision output (and the text
    encoder's pooled output, which encode_adm reads and 1.5, without vector_in, ignores)."""
    return {"pooled_output": torch.randn(1, 768, generator=g),
            "concat_latent_image": torch.randn(1, 32, 2, 4, 4, generator=g),
            "clip_vision_output": _VisionOutput(torch.randn(1, 16, 1152, generator=g))}


def _hunyuan15_sr_extras(g: torch.Generator, positive: bool) -> dict:
    """1.5's super-resolution pass without its low-resolution latent (concat_cond then builds the 66 zero channels
    itself): the vision output and the pooled vector."""
    return {"pooled_output": torch.randn(1, 768, generator=g),
            "clip_vision_output": _VisionOutput(torch.randn(1, 16, 1152, generator=g))}


HUNYUAN_VARIANTS = {f.name: f for f in (
    Family("HunyuanVideo", hunyuan_video, "", (1, 16, 2, 4, 4), HUNYUAN_CONTEXT["1.0"], _hunyuan_extras,
           sliced=True, cfg=1.0),
    Family("HunyuanVideoI2V", functools.partial(hunyuan_video, in_channels=33), "", (1, 16, 2, 4, 4),
           HUNYUAN_CONTEXT["1.0"], _hunyuan_extras, sliced=True, cfg=1.0),
    Family("HunyuanVideo15", functools.partial(hunyuan_video, "1.5"), "", (1, 32, 2, 4, 4), HUNYUAN_CONTEXT["1.5"],
           _hunyuan15_extras, sliced=True, needs=("comfy.supported_models:HunyuanVideo15",)),
    # SkyReels I2V (32 input channels: the latent and its image) and 1.5's distilled super-resolution (98: the latent,
    # a mask, the low-resolution latent, a mask): the same blocks, told apart by detection from the input width
    Family("HunyuanVideoSkyreelsI2V", functools.partial(hunyuan_video, in_channels=32), "", (1, 16, 2, 4, 4),
           HUNYUAN_CONTEXT["1.0"], _hunyuan_extras, sliced=True, cfg=1.0),
    Family("HunyuanVideo15_SR_Distilled", functools.partial(hunyuan_video, "1.5", in_channels=98), "",
           (1, 32, 2, 4, 4), HUNYUAN_CONTEXT["1.5"], _hunyuan15_sr_extras, sliced=True, cfg=1.0,
           needs=("comfy.supported_models:HunyuanVideo15_SR_Distilled",)),
)}
# LTX variants for the LTX slicing tests (tests/test_ltxv.py); LTXAV: LTX-2, whose latent is [video, audio]
# (ltxav_latent) and whose host may lack it (ComfyUI 0.3.64)
LTX_VARIANTS = {f.name: f for f in (
    FAMILIES["LTXV"],
    Family("LTXAV", ltxav, "", (1, 128, 2, 2, 2), 2 * LTXAV_CONFIG["caption_channels"], _ltxv_extras, sliced=True,
           transformer_config=LTXAV_CONFIG, needs=("comfy.ldm.lightricks.av_model:LTXAVModel",)),
)}


def ltxav_latent(video_shape: tuple[int, ...], audio_frames: int, seed: int | None = None) -> dict:
    """LTX-2's LATENT as LTXVConcatAVLatent gives it: a NestedTensor of the video latent and the audio latent
    (batch, 8 channels, audio_frames, 16 frequency bins); zeros, or random with `seed`."""
    import comfy.nested_tensor

    shapes = (video_shape, (video_shape[0], 8, audio_frames, 16))
    if seed is None:
        parts = [torch.zeros(shape) for shape in shapes]
    else:
        g = torch.Generator().manual_seed(seed)
        parts = [torch.randn(shape, generator=g) for shape in shapes]
    return {"samples": comfy.nested_tensor.NestedTensor(parts)}
