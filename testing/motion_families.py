"""Random-weight motion models of every family AnimateDiff-Evolved loads, in each family's own file format.

ADE tells the families apart by the keys and shapes of the file (animatediff/motion_module_ad.py,
normalize_ad_state_dict):
- SD1.5 or SDXL: the number of down blocks (4 or 3);
- format: AnimateDiff; HotshotXL (`temporal_attentions.N.` and `pos_encoder.positional_encoding` keys);
  AnimateLCM (no `pos_encoder` key at all: its position encoding was never saved); PIA (`conv_in.*`);
- version: v2 with a `mid_block.`, else v3 for SD1.5 with a 32-frame position encoding, else v1.
So the families are (file, what ADE reads it as, whether ADE samples it in its GroupNorm hack mode):

| family           | real file               | mid block | pe frames | extra keys     | ADE: format / version / sd_type | hack |
|------------------|-------------------------|-----------|-----------|----------------|---------------------------------|------|
| v1               | mm_sd_v15.ckpt          | no        | 24        |                | AnimateDiff / v1 / SD1.5        | yes  |
| v2               | mm_sd_v15_v2.ckpt       | yes       | 32        |                | AnimateDiff / v2 / SD1.5        | (*)  |
| v3               | v3_sd15_mm.ckpt         | no        | 32        |                | AnimateDiff / v3 / SD1.5        | no   |
| AnimateLCM       | AnimateLCM_sd15_t2v     | yes       | (none)    |                | AnimateLCM / v2 / SD1.5         | no   |
| AnimateLCM-I2V   | AnimateLCM_sd15_i2v     | yes       | (none)    | img_encoder.*  | AnimateLCM / v2 / SD1.5         | no   |
| PIA              | pia.ckpt                | no        | 32        | conv_in.*      | PIA / v3 / SD1.5                | yes  |
| HotshotXL        | hsxl_temporal_layers    | no        | 24        | (Hotshot keys) | HotshotXL / v1 / SDXL           | yes  |
| AnimateDiff-SDXL | mm_sdxl_v10_beta.ckpt   | no        | 32        |                | AnimateDiff / v1 / SDXL         | yes  |

(*) only through the legacy loader with apply_v2_models_properly off. AnimateLCM's position encoding is a
buffer its trainers never saved; ADE assumes 64 frames. CameraCtrl is not a motion model but a second file
loaded onto one (ADE_LoadAnimateDiffModelWithCameraCtrl): a camera pose encoder (`encoder_*` keys) and
`qkv_merge` projections for the motion modules' attention (cameractrl_state_dict).

ADE builds motion modules from a fixed channel table (320, 640, 1280[, 1280]; mid 1280), not from the
file's shapes, and loads the file into them: a motion model of other widths is refused (size mismatch).
The families are built for a UNet of model_channels `width` (SD1.5's and SDXL's own 320, or narrower for the
pack's mechanics: testing.synthetic.NARROW), and read with testing.synthetic.loaders_read_width(width),
which makes ComfyUI's detection and ADE's loader read that width and changes nothing else of them; every
part a family's file has (motion modules, PIA's conv_in, AnimateLCM-I2V's image encoder, CameraCtrl's pose
encoder and qkv_merge projections) is at the UNet's levels. The SDXL families go with the smallest SDXL layout
ComfyUI detects (Segmind Vega's: spatial transformers of depth 1 and 2 at the two deeper levels instead of
SDXL's 2 and 10), which ComfyUI loads as an SDXL model and ADE accepts as SDXL. Tests keep latents tiny.

All SD1.5 families share one set of random motion-module weights (each file takes the keys its family
has), as do the SDXL ones: the families differ in structure, and drawing 450M weights takes seconds.
Weights are drawn straight into fp16 files (ADE casts to the UNet's dtype when it loads them); the UNets
are drawn in place after ComfyUI's loader built them, so a UNet exists once in memory.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn

from .synthetic import SD15_WIDTH, loaders_read_width, narrow_motion_model_, sd15_channels
from .weights import ade_module

SD15, SDXL = "SD1.5", "SDXL"
GEN2, GEN1, LEGACY = "gen2", "gen1", "legacy"
LOADERS = (GEN2, GEN1, LEGACY)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    layout: str  # SD15 | SDXL: the UNet it goes with (and ADE's sd_type)
    mm_format: str  # what ADE detects (AnimateDiffFormat)
    mm_version: str  # what ADE detects (AnimateDiffVersion)
    mid_block: bool
    pe_frames: int | None  # None: no position-encoding keys in the file (AnimateLCM)
    hack: bool  # ADE samples it in GroupNorm hack mode (v2: only with the legacy loader, "properly" off)
    extra: str | None = None  # "pia" (conv_in), "i2v" (img_encoder), "hotshot" (Hotshot key names)

    def groupnorm_hack(self, loader: str, apply_v2_properly: bool = True) -> bool:
        """Whether ADE runs this family, loaded this way, with GroupNorm statistics over all frames
        (animatediff/sampling.py, FunctionInjectionHolder.inject_functions)."""
        if self.mm_version == "v2" and self.mm_format == "AnimateDiff":
            return loader == LEGACY and not apply_v2_properly
        return self.hack

    @property
    def file_name(self) -> str:
        return f"streamline-random-{self.name}.safetensors"


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("v1", SD15, "AnimateDiff", "v1", mid_block=False, pe_frames=24, hack=True),
    Family("v2", SD15, "AnimateDiff", "v2", mid_block=True, pe_frames=32, hack=False),
    Family("v3", SD15, "AnimateDiff", "v3", mid_block=False, pe_frames=32, hack=False),
    Family("AnimateLCM", SD15, "AnimateLCM", "v2", mid_block=True, pe_frames=None, hack=False),
    Family("AnimateLCM-I2V", SD15, "AnimateLCM", "v2", mid_block=True, pe_frames=None, hack=False, extra="i2v"),
    Family("PIA", SD15, "PIA", "v3", mid_block=False, pe_frames=32, hack=True, extra="pia"),
    Family("HotshotXL", SDXL, "HotshotXL", "v1", mid_block=False, pe_frames=24, hack=True, extra="hotshot"),
    Family("AnimateDiff-SDXL", SDXL, "AnimateDiff", "v1", mid_block=False, pe_frames=32, hack=True),
)}

_MAX_PE = 32  # the template's position encoding; families with fewer frames take its first rows


# -- random weights -------------------------------------------------------------------------------------


def _draw_(tensor: torch.Tensor, name: str, g: torch.Generator) -> torch.Tensor:
    """testing.weights.randomize_'s law for one parameter, in place: fan-in-scaled weights, norm scales
    near 1, small biases."""
    if tensor.ndim >= 2:
        return tensor.normal_(0.0, 1.0 / math.sqrt(math.prod(tensor.shape[1:])), generator=g)
    return tensor.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=g)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """testing.weights.randomize_, drawn in place: at SD1.5 size this halves the time every host test pays."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            _draw_(p, name, g)
    return module


# -- motion-model files ---------------------------------------------------------------------------------


def random_state_dict(build, seed: int, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """The state dict of the module `build()` makes, with randomize_'s law, drawn one tensor at a time into
    `dtype` (the module itself is built on the meta device, so no full-precision copy ever exists).
    Position encodings are ADE's own (PositionalEncoding); any other buffer is an error."""
    mmad = ade_module("motion_module_ad")
    with torch.device("meta"):
        module = build()
    parameters = dict(module.named_parameters())
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, meta in module.state_dict(keep_vars=True).items():
        if name.endswith("pos_encoder.pe"):
            value = mmad.PositionalEncoding(meta.shape[2], max_len=meta.shape[1]).pe
        elif name in parameters:
            value = _draw_(torch.empty(meta.shape), name, g)
        else:
            raise ValueError(f"no law for buffer {name}")
        sd[name] = value.to(dtype)
    return sd


def _template(layout: str, seed: int, width: int = SD15_WIDTH) -> dict[str, torch.Tensor]:
    """ADE's AnimateDiffModel for `layout` with every part any family of that layout has (SD1.5: the
    mid block), at a UNet of model_channels `width`, random weights, as a state dict in ADE's key names (fp16)."""
    import comfy.ops

    mmad = ade_module("motion_module_ad")
    blocks = (("down_blocks", 4, 2), ("up_blocks", 4, 3)) if layout == SD15 else (("down_blocks", 3, 2), ("up_blocks", 3, 3))
    pe_key = "temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"
    stub = {f"{kind}.{i}.motion_modules.{m}.{pe_key}": torch.zeros(1, _MAX_PE, 1)
            for kind, levels, per in blocks for i in range(levels) for m in range(per)}
    if layout == SD15:
        stub[f"mid_block.motion_modules.0.{pe_key}"] = torch.zeros(1, _MAX_PE, 1)
    info = mmad.AnimateDiffInfo(sd_type=layout, mm_format="AnimateDiff", mm_version="v2" if layout == SD15 else "v1",
                                mm_name="template")
    def build():
        model = mmad.AnimateDiffModel(stub, info, init_kwargs={"ops": comfy.ops.disable_weight_init})
        return narrow_motion_model_(model, width) if width != SD15_WIDTH else model

    return random_state_dict(build, seed)


def _img_encoder(seed: int, width: int = SD15_WIDTH) -> dict[str, torch.Tensor]:
    """AnimateLCM-I2V's image encoder, as ADE builds it (AnimateDiffModel.init_img_encoder), for a UNet of
    model_channels `width`."""
    import comfy.ops

    adapter = ade_module("adapter_animatelcm_i2v")
    encoder = random_state_dict(lambda: adapter.AdapterEmbed(cin=4, channels=sd15_channels(width), nums_rb=2, ksize=1,
                                                             sk=True, use_conv=False, ops=comfy.ops.disable_weight_init), seed)
    return {f"img_encoder.{k}": v for k, v in encoder.items()}


CAMERACTRL_FILE = "streamline-random-CameraCtrl.safetensors"


def cameractrl_state_dict(seed: int = 3, width: int = SD15_WIDTH) -> dict[str, torch.Tensor]:
    """A CameraCtrl file for an SD1.5 (v3) motion model of a UNet of model_channels `width`, as
    ADE_LoadAnimateDiffModelWithCameraCtrl reads it: the camera pose encoder (`encoder_*` keys, ADE's
    CameraPoseEncoder, which ADE builds at the motion model's layer_channels) and a `qkv_merge` projection on
    the first temporal attention of every down- and up-block motion module."""
    import comfy.ops

    adapter = ade_module("adapter_cameractrl")
    levels_channels = sd15_channels(width)
    sd = random_state_dict(lambda: adapter.CameraPoseEncoder(channels=list(levels_channels), nums_rb=2,
                                                              ops=comfy.ops.disable_weight_init), seed)
    g = torch.Generator().manual_seed(seed + 1)
    for kind, levels, per in (("down_blocks", 4, 2), ("up_blocks", 4, 3)):
        for i in range(levels):
            channels = levels_channels[i if kind == "down_blocks" else 3 - i]
            for m in range(per):
                key = (f"{kind}.{i}.motion_modules.{m}.temporal_transformer.transformer_blocks.0.attention_blocks.0"
                       ".processor.qkv_merge")
                weight = torch.randn(channels, channels, generator=g) / math.sqrt(channels)
                sd[f"{key}.weight"] = weight.to(torch.float16)
                sd[f"{key}.bias"] = (0.1 * torch.randn(channels, generator=g)).to(torch.float16)
    return sd


def _hotshot_key(key: str) -> str:
    """ADE key -> Hotshot-XL's (the inverse of motion_module_ad.convert_hotshot_state_dict)."""
    parts = key.split(".")
    if len(parts) > 4 and parts[2] == "motion_modules" and parts[4] == "temporal_transformer":
        key = ".".join(parts[:2] + ["temporal_attentions", parts[3]] + parts[5:])
    return key.replace("pos_encoder.pe", "pos_encoder.positional_encoding")


def family_state_dict(family: Family, template: dict[str, torch.Tensor], seed: int = 0,
                      width: int = SD15_WIDTH) -> dict[str, torch.Tensor]:
    """The motion-model file of `family`, in its own key format, from the layout's template (built for a UNet of
    model_channels `width`)."""
    sd = {}
    for key, value in template.items():
        if key.startswith("mid_block.") and not family.mid_block:
            continue
        if key.endswith("pos_encoder.pe"):
            if family.pe_frames is None:
                continue
            value = value[:, : family.pe_frames].contiguous()
        sd[key] = value
    if family.extra == "hotshot":
        sd = {_hotshot_key(k): v for k, v in sd.items()}
    elif family.extra == "pia":
        g = torch.Generator().manual_seed(seed + 7)
        sd["conv_in.weight"] = (torch.randn(width, 9, 3, 3, generator=g) / math.sqrt(9 * 9)).to(torch.float16)
        sd["conv_in.bias"] = (0.1 * torch.randn(width, generator=g)).to(torch.float16)
    elif family.extra == "i2v":
        sd.update(_img_encoder(seed + 11, width))
    return sd


def reduced_width_state_dict(channels: tuple[int, ...], pe_frames: int = 32) -> dict[str, torch.Tensor]:
    """A v3-format SD1.5 motion model for a UNet whose levels have `channels` (e.g. 32, 64, 128, 128), built
    from ADE's MotionModule class; ADE refuses to load it (its channel table is fixed)."""
    import comfy.ops

    mmad = ade_module("motion_module_ad")

    def level(c: int, block_type: str, idx: int):
        return mmad.MotionModule(c, temporal_pe=True, temporal_pe_max_len=pe_frames, block_type=block_type, block_idx=idx,
                                 ops=comfy.ops.disable_weight_init)

    def build() -> nn.Module:
        model = nn.Module()
        model.down_blocks = nn.ModuleList(level(c, mmad.BlockType.DOWN, i) for i, c in enumerate(channels))
        model.up_blocks = nn.ModuleList(level(c, mmad.BlockType.UP, i) for i, c in enumerate(reversed(channels)))
        return model

    return random_state_dict(build, seed=0)


class MotionFiles:
    """The family files, in one folder registered as ADE's "animatediff_models" folder, for UNets of
    model_channels `width`. A layout's files are written together the first time one of them is asked for (its
    template is then dropped)."""

    def __init__(self, folder: Path, seed: int = 1, width: int = SD15_WIDTH):
        import folder_paths

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.width = width
        self._folder_key = ade_module("utils_model").Folders.ANIMATEDIFF_MODELS
        folder_paths.add_model_folder_path(self._folder_key, str(self.folder))

    def write(self, family: Family) -> str:
        """The name of `family`'s file, as a loader node takes it (written with its layout's others if new)."""
        from safetensors.torch import save_file

        if not (self.folder / family.file_name).exists():
            template = _template(family.layout, self.seed, self.width)
            for member in FAMILIES.values():
                if member.layout == family.layout:
                    save_file(family_state_dict(member, template, self.seed, self.width),
                              str(self.folder / member.file_name))
            del template
        return family.file_name

    def write_cameractrl(self) -> str:
        """The name of the CameraCtrl file (for SD1.5 motion models), written if new."""
        from safetensors.torch import save_file

        if not (self.folder / CAMERACTRL_FILE).exists():
            save_file(cameractrl_state_dict(self.seed + 2, self.width), str(self.folder / CAMERACTRL_FILE))
        return CAMERACTRL_FILE

    def close(self) -> None:
        """Unregister the folder and delete the files (all of them: about 5 GB at SD1.5's width)."""
        import folder_paths

        paths = folder_paths.folder_names_and_paths[self._folder_key][0]
        if str(self.folder) in paths:
            paths.remove(str(self.folder))
        for name in [f.file_name for f in FAMILIES.values()] + [CAMERACTRL_FILE]:
            (self.folder / name).unlink(missing_ok=True)


# -- UNets ----------------------------------------------------------------------------------------------

# The smallest SDXL layout ComfyUI detects (comfy/supported_models.py Segmind_Vega; loaded as model_base.SDXL):
# SDXL's channels and levels, spatial transformers of depth 1 and 2 at levels 1 and 2 (SDXL: 2 and 10).
SDXL_SMALL_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
    use_spatial_transformer=True, transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=1,
    transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], context_dim=2048, num_heads=-1, num_head_channels=64,
    legacy=False, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
)
SD15_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4], use_spatial_transformer=True, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=768,
    num_heads=8, num_head_channels=-1, legacy=False, use_linear_in_transformer=False,
)  # testing.synthetic.sd15_unet's
CONTEXT_DIM = {SD15: 768, SDXL: 2048}
EXPECTED_CONFIG = {SD15: "SD15", SDXL: "Segmind_Vega"}  # ComfyUI's detected model config


def base_model(layout: str, seed: int = 0, width: int = SD15_WIDTH):
    """A MODEL as Load Diffusion Model gives it: a UNet of `layout` of model_channels `width` (read with
    loaders_read_width) through ComfyUI's diffusion-model loader (which detects its configuration from the
    state dict's keys and shapes), random weights. The loader is given a state dict of the right shapes that
    holds no memory (one zero, expanded), and the loaded UNet's weights are then drawn in place: one copy of
    the weights in memory instead of three."""
    import comfy.ops
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = {**(SD15_CONFIG if layout == SD15 else SDXL_SMALL_CONFIG), "model_channels": width}
    shapes = UNetModel(**config, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init).state_dict()
    zero = torch.zeros((), dtype=torch.float32)
    with loaders_read_width(width):
        patcher = comfy.sd.load_diffusion_model_state_dict({k: zero.expand(v.shape) for k, v in shapes.items()})
    detected = type(patcher.model.model_config).__name__ if patcher is not None else None
    if detected != EXPECTED_CONFIG[layout]:
        raise RuntimeError(f"ComfyUI detected {detected} for the random {layout} UNet, not {EXPECTED_CONFIG[layout]}")
    randomize_(patcher.model.diffusion_model, seed)
    return patcher


def conditioning(layout: str, tokens: int = 77, seed: int = 0) -> list:
    """CONDITIONING as a text encoder of `layout` gives it (SDXL: with its pooled output)."""
    g = torch.Generator().manual_seed(seed)
    extras = {"pooled_output": torch.randn(1, 1280, generator=g)} if layout == SDXL else {}
    return [[torch.randn(1, tokens, CONTEXT_DIM[layout], generator=g), extras]]


# -- loading through ADE's nodes ------------------------------------------------------------------------


def run_node(name: str, **inputs):
    """One of ADE's (V1) nodes, called the way ComfyUI's executor calls it."""
    cls = ade_module("nodes").NODE_CLASS_MAPPINGS[name]
    return getattr(cls(), cls.FUNCTION)(**inputs)


def apply_motion_model(base, file_name: str, loader: str, apply_v2_properly: bool = True, context_options=None,
                       m_models=None):
    """`base` with the motion model `file_name`, through one of ADE's loaders:
    gen2 (ADE_LoadAnimateDiffModel -> ADE_ApplyAnimateDiffModelSimple -> ADE_UseEvolvedSampling; `m_models`
    replaces the first two, e.g. for the PIA or AnimateLCM-I2V apply nodes), gen1 (ADE_AnimateDiffLoaderGen1)
    or the deprecated legacy loader (ADE_AnimateDiffLoaderWithContext, with apply_v2_models_properly)."""
    autoselect = ade_module("utils_model").BetaSchedules.AUTOSELECT
    extra = {"context_options": context_options} if context_options is not None else {}
    if loader == GEN2:
        if m_models is None:
            (motion,) = run_node("ADE_LoadAnimateDiffModel", model_name=file_name)
            (m_models,) = run_node("ADE_ApplyAnimateDiffModelSimple", motion_model=motion)
        (model,) = run_node("ADE_UseEvolvedSampling", model=base, beta_schedule=autoselect, m_models=m_models, **extra)
    elif loader == GEN1:
        (model,) = run_node("ADE_AnimateDiffLoaderGen1", model=base, model_name=file_name, beta_schedule=autoselect, **extra)
    elif loader == LEGACY:
        (model,) = run_node("ADE_AnimateDiffLoaderWithContext", model=base, model_name=file_name, beta_schedule=autoselect,
                            apply_v2_models_properly=apply_v2_properly, **extra)
    else:
        raise ValueError(f"unknown loader {loader!r}")
    return model


def motion_models_of(model) -> list:
    """The motion models (ADE's MotionModelPatcher) an ADE-prepared MODEL carries."""
    helper = ade_module("model_injection").ModelPatcherHelper(model)
    return list(helper.get_motion_models())
