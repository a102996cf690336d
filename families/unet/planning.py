"""The UNet's planning (SD1.5 / SD2 / SDXL, with AnimateDiff-Evolved's motion modules): the UNet as its forward
will run (the motion modules ADE injects when sampling starts, where it injects them), a call's workload, and the
plan core/budget.py's laws make for it."""
from __future__ import annotations

from torch import Tensor

from ...core.budget import Block, Layer, Plan, UNetShape, Workload, plan
from ...core.plan_search import BudgetError, format_bytes
from ...host.attention import attention_laws
from ..unet_common.layer_roles import is_ade_motion_module
from .structure import _heads, unet_shape

CLIP_TOKENS = 77  # the preview's prompt length: one CLIP chunk (SD1.5, SDXL)


def workload_for(x: Tensor, context: Tensor | None, video_length: int | None = None, video_norm: bool = False) -> Workload:
    """video_norm: the call runs in ADE's GroupNorm-over-videos mode (families/unet/video_norm.py)."""
    batch = x.shape[0]
    return Workload(batch=batch, video_length=video_length or max(1, batch // 2), height=x.shape[-2], width=x.shape[-1],
                    context_tokens=context.shape[1] if context is not None and context.ndim == 3 else CLIP_TOKENS,
                    dtype_bytes=x.element_size(), video_norm=video_norm)


def make_plan(shape: UNetShape, work: Workload, budget: int, held: int, set_budget: int,
              offload: bool = False) -> Plan:
    """The plan for a forward of `work`: the one function the run and the node's preview both use.
    offload: skip offload may be planned (offload_available)."""
    try:
        return plan(shape, work, max(budget, 0), attention_laws(), offload=offload)
    except BudgetError as e:
        if not held:
            raise
        raise BudgetError(f"{e}, after {format_bytes(held)} held by Step Rehash's cache (budget "
                          f"{format_bytes(set_budget)})") from None


def _video_length(unet) -> int | None:
    for module in unet.modules():
        if type(module).__name__ == "VanillaTemporalModule":
            length = getattr(getattr(module, "temporal_transformer", None), "video_length", None)
            if isinstance(length, int) and length > 0:
                return length
    return None


def ade_motion_models(model) -> list:
    """AnimateDiff-Evolved's motion models attached to a MODEL (it injects them when sampling starts)."""
    patchers = getattr(model, "additional_models", {}).get("ADE", [])
    return [p.model for p in patchers if hasattr(getattr(p, "model", None), "down_blocks")]


def _inject(blocks: tuple[Block, ...], motion_blocks: list) -> tuple[Block, ...]:
    """ADE's injection rule (AnimateDiffModel._inject) on described blocks: one motion module per UNet
    block in order, after its last spatial transformer, else after its first ResBlock, else none."""
    modules = [m for block in motion_blocks if block is not None for m in block.motion_modules]
    out = []
    for block in blocks:
        kinds = [layer.kind for layer in block.layers]
        at = len(kinds) - kinds[::-1].index("attn") if "attn" in kinds else \
            kinds.index("res") + 1 if "res" in kinds else None
        layers = list(block.layers)
        if at is not None and modules:
            channels = layers[at - 1].channels_out
            layers.insert(at, Layer("motion", channels, channels, _heads(modules.pop(0))))
        out.append(Block(tuple(layers), block.skip_channels))
    return tuple(out)


def planned_shape(unet, motion_models: list) -> UNetShape:
    """The UNet as its forward will run: as it is, or, while AnimateDiff-Evolved's motion models
    (`ade_motion_models`) are not injected yet, with them where ADE will put them."""
    shape = unet_shape(unet)
    if any(is_ade_motion_module(m) for m in unet.modules()):
        return shape
    for mm in motion_models:
        inputs = _inject(shape.input_blocks, list(mm.down_blocks or []))
        middle = _inject((shape.middle,), [mm.mid_block])[0]
        outputs = _inject(shape.output_blocks, list(mm.up_blocks or []))
        shape = UNetShape(shape.model_channels, inputs, middle, outputs, shape.out_channels)
    return shape


def frames_per_call(model, clip_frames: int) -> int:
    """Frames one UNet call sees: the clip, or AnimateDiff-Evolved's context window when the clip is longer."""
    params = model.get_attachment("ADE_params") if hasattr(model, "get_attachment") else None
    contexts = getattr(getattr(params, "context_options", None), "contexts", None) or []
    length = getattr(contexts[0], "context_length", None) if contexts else None
    return min(clip_frames, length) if isinstance(length, int) and length > 0 else clip_frames


def prompt_tokens(model) -> int:
    """Cross-attention tokens of the model's prompts, for the preview: TinyVideo's word slots, else one
    CLIP chunk."""
    from ...tinyvideo import model as tinyvideo

    get = getattr(model, "get_attachment", None)
    return len(tinyvideo.SLOTS) if get is not None and get(tinyvideo.PROMPT_ATTACHMENT) is not None else CLIP_TOKENS


