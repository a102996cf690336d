"""Random-weight models with real shapes, built through ComfyUI's and AnimateDiff-Evolved's own classes.

No weights can be downloaded on our machines, so tests and benchmarks use SD1.5-shaped UNets and
mm_sd_v15_v2-shaped motion modules with random weights. Weights are drawn with fan-in scaling so
activations stay O(1) through the network and every motion module changes its input (a real motion
module starts from zero-initialised output projections; random ones make slicing errors visible).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .weights import ade_module, pooled_state_dict, randomize_

SD15_MOTION_CHANNELS = {"down": (320, 640, 1280, 1280), "up": (1280, 1280, 640, 320), "mid": 1280}
_PE_KEY = "temporal_transformer.transformer_blocks.0.attention_blocks.{}.pos_encoder.pe"


# SD1.5's layout at a fifth of its width (model_channels 64; motion modules 64/128/256/256 wide): every level,
# skip, ResBlock, transformer (8 heads, CLIP-L's 768-wide context) and motion module SD1.5 and mm_sd_v15_v2
# have, with 1/24 of the weights and ~16x faster on one CPU thread (0.3 s against 4.4 s for a CFG-batched
# 4-frame 8x8 call). Tests of the pack's mechanics (slicing, offload, rehash, planning against the meter) use
# it; the real width stays where the width itself is the point (ComfyUI's and ADE's loaders and detection,
# real-size predictions) and in the STREAMLINE_FULL_MATRIX runs.
NARROW = 64
SD15_WIDTH = 320


def sd15_unet(dtype=torch.float32, device="cpu", seed: int = 0, width: int = SD15_WIDTH):
    """ComfyUI's UNetModel with the SD1.5 configuration (at model_channels `width`), random weights."""
    return randomize_(_sd15_unet_module(dtype, device, width), seed).eval()


def _sd15_unet_module(dtype=torch.float32, device="cpu", width: int = SD15_WIDTH):
    """ComfyUI's UNetModel with the SD1.5 configuration, its weights not initialised."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=width, num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4], use_spatial_transformer=True, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=768,
        num_heads=8, num_head_channels=-1, legacy=False, use_linear_in_transformer=False,
        dtype=dtype, device=device, operations=comfy.ops.disable_weight_init,
    )


def random_conds(seed: int = 1) -> tuple[list, list]:
    """Positive and negative conditioning in ComfyUI's format: random CLIP-L-shaped embeddings (77 x 768)."""
    g = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]
    return positive, negative


def mm_sd15_v2_state_dict(pe_len: int = 32, seed: int = 1, width: int = SD15_WIDTH,
                          pooled: bool = False) -> dict[str, torch.Tensor]:
    """A complete mm_sd_v15_v2-format state dict (the keys ADE's loader reads; for a UNet of model_channels
    `width`: loaders_read_width), random weights (pooled: weights.pooled_state_dict's, in fp16, for a file
    whose exact values no test reads)."""
    mm = _build_motion_model(pe_len, width)
    if pooled:
        return pooled_state_dict(mm, seed)
    return {k: v.contiguous() for k, v in randomize_(mm, seed).state_dict().items()}


def _pe_stub(pe_len: int) -> dict[str, torch.Tensor]:
    sd = {}
    for kind, count in (("down_blocks", 2), ("up_blocks", 3)):
        for i in range(4):
            for m in range(count):
                for a in range(2):
                    sd[f"{kind}.{i}.motion_modules.{m}.{_PE_KEY.format(a)}"] = torch.zeros(1, pe_len, 320)
    for a in range(2):
        sd["mid_block.motion_modules.0." + _PE_KEY.format(a)] = torch.zeros(1, pe_len, 1280)
    return sd


def _build_motion_model(pe_len: int, width: int = SD15_WIDTH):
    import comfy.ops

    mmad = ade_module("motion_module_ad")
    info = mmad.AnimateDiffInfo(sd_type="SD1.5", mm_format="AnimateDiff", mm_version="v2", mm_name="synthetic")
    mm = mmad.AnimateDiffModel(_pe_stub(pe_len), info, init_kwargs={"ops": comfy.ops.disable_weight_init})
    return narrow_motion_model_(mm, width) if width != SD15_WIDTH else mm


def sd15_channels(width: int = SD15_WIDTH) -> tuple[int, ...]:
    """The channels of SD1.5's four levels for model_channels `width` (channel_mult 1, 2, 4, 4)."""
    return tuple(width * m for m in (1, 2, 4, 4))


def narrow_motion_model_(mm: nn.Module, width: int) -> nn.Module:
    """ADE's AnimateDiffModel `mm` (built at its fixed channel table: SD1.5's four levels or SDXL's three) with
    the same motion modules at the levels of a UNet of model_channels `width`, and AnimateLCM-I2V's image encoder,
    if it has one, rebuilt at those levels by ADE's own init_img_encoder (CameraCtrl's encoder and PIA's conv_in
    ADE builds from layer_channels and the file's shapes)."""
    mmad = ade_module("motion_module_ad")
    channels = sd15_channels(width)[: len(mm.layer_channels)]

    def level(c: int, block_type, index: int):
        return mmad.MotionModule(c, temporal_pe=mm.has_position_encoding, temporal_pe_max_len=mm.encoding_max_len,
                                 block_type=block_type, block_idx=index, attention_block_types=mm.attn_block_types,
                                 ops=mm.ops)

    if mm.down_blocks is not None:
        mm.down_blocks = nn.ModuleList(level(c, mmad.BlockType.DOWN, i) for i, c in enumerate(channels))
    if mm.up_blocks is not None:
        mm.up_blocks = nn.ModuleList(level(c, mmad.BlockType.UP, i) for i, c in enumerate(reversed(channels)))
    if mm.mid_block is not None:  # v2 and AnimateLCM have one, v1, v3 and PIA none
        mm.mid_block = level(channels[-1], mmad.BlockType.MID, 0)
    mm.layer_channels, mm.middle_channel = channels, channels[-1]
    if getattr(mm, "img_encoder", None) is not None:
        mm.init_img_encoder()
    return mm


@contextmanager
def loaders_read_width(width: int):
    """ComfyUI's and AnimateDiff-Evolved's own loaders, reading SD1.5-layout (and Segmind Vega's SDXL-layout)
    files of model_channels `width`: ComfyUI's detection matches SD15's (Segmind_Vega's) entry at that width (its
    table names 320) and ADE builds its AnimateDiffModel's motion modules at the UNet's levels (its tables are
    SD1.5's and SDXL's). Everything else of the two loaders runs as it is; at SD1.5's own width nothing is
    changed."""
    if width == SD15_WIDTH:
        yield
        return
    import comfy.supported_models

    injection = ade_module("model_injection")
    models = comfy.supported_models
    ade_model, sd15_config, vega_config = injection.AnimateDiffModel, models.SD15.unet_config, models.Segmind_Vega.unet_config

    class NarrowAnimateDiffModel(ade_model):
        def __init__(self, mm_state_dict, mm_info, init_kwargs=None):
            super().__init__(mm_state_dict, mm_info, init_kwargs or {})
            narrow_motion_model_(self, width)

    models.SD15.unet_config = {**sd15_config, "model_channels": width}
    models.Segmind_Vega.unet_config = {**vega_config, "model_channels": width}
    injection.AnimateDiffModel = NarrowAnimateDiffModel
    try:
        yield
    finally:
        models.SD15.unet_config, models.Segmind_Vega.unet_config = sd15_config, vega_config
        injection.AnimateDiffModel = ade_model


def load_sd15(width: int = SD15_WIDTH, seed: int = 0):
    """The SD1.5-layout UNet (model_channels `width`) through ComfyUI's diffusion-model loader and detection."""
    import comfy.sd

    state_dict = sd15_unet(seed=seed, width=width).state_dict()
    with loaders_read_width(width):
        patcher = comfy.sd.load_diffusion_model_state_dict(state_dict)
    assert patcher is not None and type(patcher.model.model_config).__name__ == "SD15"
    return patcher


def sd15_motion_model(pe_len: int = 32, dtype=torch.float32, device="cpu", seed: int = 1, width: int = SD15_WIDTH):
    """ADE's AnimateDiffModel shaped like mm_sd_v15_v2 (for a UNet of model_channels `width`), random weights
    (pe_len > 32 for long clips)."""
    mm = _build_motion_model(pe_len, width)
    return randomize_(mm, seed).to(device=device, dtype=dtype).eval()


def sd15_with_motion(width: int = NARROW, frames: int = 4, pe_len: int = 32, seed: int = 0):
    """The SD1.5 UNet (at `width`) with ADE's motion modules injected and set to `frames` per video."""
    unet, motion = sd15_unet(seed=seed, width=width), sd15_motion_model(pe_len=pe_len, seed=seed + 1, width=width)
    inject(unet, motion)
    motion.set_video_length(frames, frames)
    return unet


def inject(unet, mm) -> None:
    """Put ADE's motion modules into the UNet the way ADE does at the start of sampling."""
    mm._inject(unet.input_blocks, mm.down_blocks)
    mm._inject(unet.output_blocks, mm.up_blocks)
    mm._inject([unet.middle_block], [mm.mid_block])


def ade_transformer_options(batch_conds: int) -> dict:
    """transformer_options as ADE sets them for a UNet call (the motion-module dispatch patch)."""
    mi = ade_module("model_injection")
    mmad = ade_module("motion_module_ad")
    return {
        "patches": {"forward_timestep_embed_patch": [(mmad.VanillaTemporalModule, mi.forward_timestep_embed_patch_ade)]},
        "sigmas": torch.tensor([1.0]),
        "cond_or_uncond": list(range(batch_conds)),
    }


def ade_video_norm_options(transformer_options: dict, frames: int) -> dict:
    """`transformer_options` for a UNet call in AnimateDiff-Evolved's GroupNorm-over-videos mode (v1
    motion models, PIA): ADE's own DIFFUSION_MODEL wrapper, which swaps torch's GroupNorm.forward for
    ADE's whole-video one during the call, and the ad_params ADE publishes (clip length `frames`)."""
    import comfy.patcher_extension

    injection = ade_module("model_injection")
    sampling = ade_module("sampling")
    params = injection.InjectionParams(apply_v2_properly=False)
    params.full_length = frames
    holder = sampling.FunctionInjectionHolder()
    holder.orig_groupnorm_forward = torch.nn.GroupNorm.forward
    import comfy.ops

    holder.orig_groupnorm_forward_comfy_cast_weights = comfy.ops.disable_weight_init.GroupNorm.forward_comfy_cast_weights
    holder.inject_groupnorm_forward = sampling.groupnorm_mm_factory(params)
    holder.inject_groupnorm_forward_comfy_cast_weights = sampling.groupnorm_mm_factory(params, manual_cast=True)
    model_options = {"transformer_options": transformer_options}
    sampling.create_diffusion_model_groupnormed_wrapper(model_options, sampling.GroupnormInjectHelper(holder))
    transformer_options["ad_params"] = {"full_length": frames, "context_length": None, "sub_idxs": None}
    return transformer_options


def ade_model_patcher(models_dir, pe_len: int = 32, seed: int = 0, context_length: int | None = None,
                      context_overlap: int = 4, width: int = SD15_WIDTH):
    """A MODEL as a user's graph has it after AnimateDiff-Evolved's nodes: the random SD1.5 UNet
    through ComfyUI's diffusion-model loader, a random mm_sd_v15_v2 file read by ADE's loader from
    `models_dir`, applied with ADE's Gen2 nodes (and, with context_length, its context windows); both at
    model_channels `width` (loaders_read_width)."""
    from pathlib import Path

    import folder_paths
    from safetensors.torch import save_file

    nodes = ade_module("nodes").NODE_CLASS_MAPPINGS
    utils_model = ade_module("utils_model")

    def run(name, **inputs):
        cls = nodes[name]
        return getattr(cls(), cls.FUNCTION)(**inputs)[0]

    base = load_sd15(width, seed)
    name = f"streamline-random-mm_sd_v15_v2-pe{pe_len}-w{width}.safetensors"
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    save_file(mm_sd15_v2_state_dict(pe_len=pe_len, seed=seed + 1, width=width), str(Path(models_dir) / name))
    folder_paths.add_model_folder_path(utils_model.Folders.ANIMATEDIFF_MODELS, str(models_dir))
    with loaders_read_width(width):
        motion = run("ADE_LoadAnimateDiffModel", model_name=name)
    m_models = run("ADE_ApplyAnimateDiffModelSimple", motion_model=motion)
    extra = {}
    if context_length:
        extra["context_options"] = run("ADE_StandardStaticContextOptions", context_length=context_length,
                                       context_overlap=context_overlap)
    return run("ADE_UseEvolvedSampling", model=base, beta_schedule=utils_model.BetaSchedules.AUTOSELECT,
               m_models=m_models, **extra)


SD15_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                     "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def sd15_checkpoint_state_dict(seed: int = 0, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """A complete SD1.5-format checkpoint (UNet, VAE, CLIP-L text encoder) with random weights at
    randomize_'s scale (weights.pooled_state_dict: the exact values matter to no test; the VAE's and the text
    encoder's outputs stay finite), as CheckpointLoaderSimple reads it."""
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip

    sd = {}
    for index, (prefix, build) in enumerate((
        ("model.diffusion_model.", _sd15_unet_module),
        ("first_stage_model.", lambda: comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=SD15_VAE_DDCONFIG, embed_dim=4)),
        ("cond_stage_model.", lambda: comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)),
    )):
        sd.update((prefix + key, value) for key, value in pooled_state_dict(build(), seed + index, dtype).items())
    return sd


def with_streamline(transformer_options: dict, config=None, state=None) -> dict:
    """`transformer_options` routed through the pack's DIFFUSION_MODEL wrapper, the way a MODEL patched by
    Streamline Model Patch routes them (`state`: one patched model across calls; else a new one for `config`)."""
    import comfy.patcher_extension

    from comfyui_streamline.host.options import STREAMLINE_KEY as STATE_KEY
    from comfyui_streamline.techniques.slicing import StreamlineState, streamline_wrapper

    transformer_options[STATE_KEY] = state if state is not None else StreamlineState(config)
    wrappers = transformer_options.setdefault("wrappers", {}).setdefault(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
    wrappers["streamline"] = [streamline_wrapper]
    return transformer_options


def video_call_peak_bytes(unet, frames: int, side: int, transformer_options: dict, chunks=None,
                          context: tuple[int, int] = (77, 768)) -> int:
    """The live-tensor peak (core/memtrace.py) of one call of a UNet with motion modules (set to `frames`) at
    `frames` x side x side (latent), cond and uncond batched, `context` (tokens, dim) per sample: ComfyUI's
    forward, or sliced with SliceConfig(*chunks)."""
    from comfyui_streamline.core.memtrace import LiveTensorMeter
    from comfyui_streamline.core.slicing import SliceConfig

    batch = 2 * frames
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, *context, generator=g)
    if chunks:
        with_streamline(transformer_options, SliceConfig(*chunks))
    with torch.inference_mode(), LiveTensorMeter() as meter:
        unet(x, torch.full((batch,), 500.0), c, transformer_options=transformer_options)
    return meter.peak_bytes


def sd15_video_call_peak_bytes(unet, motion, frames: int, side: int, chunks=None) -> int:
    """video_call_peak_bytes of an SD1.5 UNet with `motion` (mm_sd_v15_v2) injected."""
    motion.set_video_length(frames, frames)
    return video_call_peak_bytes(unet, frames, side, ade_transformer_options(2), chunks)


def svd_vae() -> nn.Module:
    """SVD's video VAE (an image Encoder and a temporal VideoDecoder), as comfy.sd.VAE builds it for a
    checkpoint with SVD's VAE keys; weights not initialised."""
    import logging

    import comfy.sd

    # the key comfy.sd.VAE recognises SVD's VAE by; everything else comes from its own configuration. Its
    # warning that all other weights are missing is expected (they are drawn afterwards): kept out of the log.
    disabled = logging.root.manager.disable
    logging.disable(max(disabled, logging.WARNING))
    try:
        vae = comfy.sd.VAE(sd={"decoder.mid.block_1.mix_factor": torch.zeros(1)})
    finally:
        logging.disable(disabled)
    return vae.first_stage_model.float()


def clip_vision_h() -> nn.Module:
    """The CLIP ViT-H/14 image encoder SVD conditions on, ComfyUI's class at its own clip_vision_config_h.json
    (32 layers at width 1280: what detection by key names asks for); weights not initialised."""
    from pathlib import Path

    import comfy.clip_vision

    config = Path(comfy.clip_vision.__file__).with_name("clip_vision_config_h.json")
    return comfy.clip_vision.ClipVisionModel(str(config)).model


_OPEN_CLIP_NAMES = {  # ComfyUI's (transformers) CLIP vision key -> open_clip's, as SVD checkpoints store them
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight", "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight", "vision_model.post_layernorm.bias": "ln_post.bias",
}
_OPEN_CLIP_LAYER_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                          "self_attn.out_proj": "attn.out_proj"}


def to_open_clip_visual(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP vision state dict in ComfyUI's layout, in open_clip's `visual.` layout (unprefixed): the
    inverse of what comfy.clip_vision.convert_to_transformers does on loading (q/k/v joined into in_proj,
    the projection transposed)."""
    out, qkv = {}, {}
    for key, value in sd.items():
        if key in _OPEN_CLIP_NAMES:
            out[_OPEN_CLIP_NAMES[key]] = value
        elif key == "visual_projection.weight":
            out["proj"] = value.t().contiguous()  # (width, projection_dim)
        else:
            layer, name = key.removeprefix("vision_model.encoder.layers.").split(".", 1)
            stem, kind = name.rsplit(".", 1)  # e.g. ("self_attn.q_proj", "weight")
            if stem in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, kind), {})[stem.removeprefix("self_attn.")[0]] = value  # q, k or v
            else:
                out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER_NAMES[stem]}.{kind}"] = value
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def write_svd_checkpoint(path, seed: int = 0, dtype=torch.float16, unet=None) -> dict[str, int]:
    """Write a complete single-file SVD img2vid checkpoint with random weights to `path` (safetensors, fp16),
    as ImageOnlyCheckpointLoader reads it: the UNet at SVD's layout with 320 channels on every level
    (model_families.svd_reduced, detected as SVD_img2vid) under model.diffusion_model., the CLIP ViT-H
    image encoder in open_clip's layout under SVD's CLIP vision prefix, SVD's video VAE under
    first_stage_model.. Weights are drawn with fan-in scaling, so every part's output stays finite.
    unet: the UNet builder (default svd_reduced; model_families.svd_layout for SVD's own widths, ~1.5G
    parameters). Returns the parameter count of each part."""
    import comfy.supported_models
    from safetensors.torch import save_file

    from .model_families import UNET_PREFIX, svd_reduced

    parts = (
        (UNET_PREFIX, unet or svd_reduced, lambda sd: sd),
        ("first_stage_model.", svd_vae, lambda sd: sd),
        (comfy.supported_models.SVD_img2vid.clip_vision_prefix, clip_vision_h, to_open_clip_visual),
    )
    sd, counts = {}, {}
    for i, (prefix, build, layout) in enumerate(parts):
        module = randomize_(build(), seed + i)
        part = {k: v.to(dtype).contiguous() for k, v in module.state_dict().items()}
        del module  # one part in full precision at a time
        counts[prefix] = sum(v.numel() for v in part.values())
        sd.update({prefix + k: v for k, v in layout(part).items()})
    save_file(sd, str(path))
    return counts
