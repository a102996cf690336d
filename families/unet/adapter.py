"""The UNet families' adapters: ComfyUI's UNetModel as SD1.5 / SD2 / SDXL build it, with AnimateDiff-Evolved's
motion modules or without (this family; what SVD's video UNet answers alike: unet_common/adapter.py)."""
from __future__ import annotations

import functools

from ...core import offload as core_offload
from ...core.budget import Plan, Workload, plan, plan_traffic, predict_peak_bytes
from ...core.slicing import SliceConfig
from ...host.attention import attention_laws
from ..unet_common.adapter import UNetLike
from ..unet_common.layer_roles import is_svd_unet
from . import forward as unet_forward  # read at call time: the tests replace its functions
from . import video_norm
from .forward import streamlined_unet_forward
from .planning import (
    _video_length, ade_motion_models, frames_per_call, make_plan, planned_shape, prompt_tokens, workload_for,
)
from .structure import unet_shape


class UNetFamily(UNetLike):
    name = "UNet"

    def claims(self, diffusion_model) -> bool:
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        return isinstance(diffusion_model, UNetModel) and not is_svd_unet(diffusion_model)

    # -- Memory Budget ----------------------------------------------------------------------------------------

    def video_length(self, unet) -> int | None:
        return _video_length(unet)

    def attached_models(self, patcher) -> list:
        return ade_motion_models(patcher)

    def plan(self, unet, x, context, budget, held, set_budget, video_norm, video_length, offload) -> Plan:
        return make_plan(unet_shape(unet), workload_for(x, context, _video_length(unet), video_norm),
                         budget, held, set_budget, offload())

    def peaks(self, unet, x, context, config, video_norm, video_length=None) -> tuple[int, int]:
        shape, laws = unet_shape(unet), attention_laws()
        work = workload_for(x, context, _video_length(unet), video_norm)
        return predict_peak_bytes(shape, work, config, laws), predict_peak_bytes(shape, work, None, laws)

    def settled_plan(self, unet, x, context, config, video_norm, video_length) -> Plan:
        work = workload_for(x, context, _video_length(unet), video_norm)
        shape, laws = unet_shape(unet), attention_laws()
        return Plan(config, predict_peak_bytes(shape, work, config, laws), predict_peak_bytes(shape, work, None, laws),
                    plan_traffic(shape, work, config))

    def estimate(self, base_model, input_shape, dtype_bytes, config, planned_budget, motion_models, offload) -> int:
        unet = base_model.diffusion_model
        shape = planned_shape(unet, motion_models)
        work = Workload(batch=input_shape[0], video_length=max(1, input_shape[0] // 2), height=input_shape[-2],
                        width=input_shape[-1], dtype_bytes=dtype_bytes)
        if planned_budget is not None:  # the plan the run will make, offload included where it pays
            try:
                config = plan(shape, work, planned_budget(), attention_laws(), offload=offload()).config
            except ValueError:
                config = SliceConfig(1, 1, offload_skips=offload(), offload_features=offload())
        return predict_peak_bytes(shape, work, config, attention_laws())

    def preview(self, model, planned, budget, budget_text, width, height, clip_frames, dtype_bytes, offload,
                cond_batching) -> str:
        from ...core.plan_search import BudgetError

        per_call = frames_per_call(model, clip_frames)
        shape = planned_shape(model.model.diffusion_model, ade_motion_models(model))
        offload_skips = offload()

        def plan_for(conds: int) -> Plan:
            work = Workload(batch=conds * per_call, video_length=per_call, height=height // 8, width=width // 8,
                            context_tokens=prompt_tokens(model), dtype_bytes=dtype_bytes)
            return make_plan(shape, work, planned, 0, budget, offload_skips)

        try:
            chosen = plan_for(2)
        except BudgetError as e:
            return f"budget {budget_text}: {e}"
        windows = f" in context windows of {per_call} frames" if per_call < clip_frames else ""
        return (f"budget {budget_text}, {width}x{height}x{clip_frames}{windows} with CFG: {chosen.text()}; "
                f"{cond_batching(model.load_device, chosen, plan_for, model)}")

    # -- Streamline Model Patch -------------------------------------------------------------------------------

    def verdict_sliced(self) -> bool:
        return unet_forward.unet_verdict().sliced

    def call_mode(self, unet, x, kwargs, transformer_options) -> tuple[bool, int | None]:
        try:
            return video_norm.video_frames(transformer_options, x.shape[0]) is not None, None
        except video_norm.VideoNormUnknown:  # the forward runs unsliced (and says so)
            return False, None

    def sliced_forward(self, unet, config, log, x):
        transfers = core_offload.Transfers(x.device) if config.offload_skips else None
        return functools.partial(unet_forward.streamlined_unet_forward, unet, config, log, transfers=transfers), transfers

    # -- Step Rehash ------------------------------------------------------------------------------------------

    def unsliced_forward(self):
        return streamlined_unet_forward


UNET = UNetFamily()
