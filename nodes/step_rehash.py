"""Step Rehash's two nodes (MODEL patch, sampler). The technique is techniques/rehash.py's."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..core.rehash import MODES, REUSE_MODES, RehashConfig
from ..host.options import REHASH_KEY as STATE_KEY
from ..techniques.rehash import apply_rehash
from .model_patch import node_id_of


def rehash_inputs() -> list:
    return [
        io.Combo.Input("rehash_mode", options=list(MODES), default="fixed",
                       tooltip="off: every step in full. fixed: warm-up, tail and every interval-th step in full. "
                       "adaptive: full when the deep feature's change since the last full step, predicted from the "
                       "shallow feature's change, reaches threshold. "
                       "keystep: the paper's key-step search; the first run calibrates (all steps full) and "
                       "saves the key steps for this model/sampler/steps."),
        io.Int.Input("interval", default=2, min=1, max=100, tooltip="fixed: every interval-th step is computed in full."),
        io.Int.Input("warmup_steps", default=2, min=0, max=1000, tooltip="fixed: the first steps, always full."),
        io.Int.Input("tail_steps", default=1, min=0, max=1000, tooltip="fixed: the last steps, always full."),
        io.Float.Input("threshold", default=0.15, min=0.0, max=10.0, step=0.005,
                       tooltip="adaptive: predicted relative L1 change of the deep feature that triggers a full step "
                       "(lower: more full steps, closer to full sampling)."),
        io.Int.Input("full_steps", default=13, min=1, max=1000, tooltip="keystep: how many steps are computed in full."),
        io.Int.Input("cache_block", default=-1, min=-1, max=64,
                     tooltip="Output block whose output (after its temporal layer) is cached. -1: the second-to-last "
                     "(a rehash step runs only the first input block and the last output block). Larger = cheaper "
                     "rehash steps, more reuse. Wan: the blocks at each end that run on every step (-1: one; "
                     "smaller = cheaper rehash steps); the residual of the blocks between is reused."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Rehash only after this fraction of the schedule."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Rehash only before this fraction of the schedule."),
        io.Combo.Input("reuse", options=list(REUSE_MODES), default="extrapolate", optional=True,
                       tooltip="What a rehash step takes. extrapolate: the line through the deep features of the "
                       "last two full steps, followed to this step's noise level (same speed, much closer to full "
                       "sampling). hold: the last full step's feature as is (the paper, DeepCache)."),
    ]


def rehash_config(rehash_mode: str, interval: int, warmup_steps: int, tail_steps: int, threshold: float,
                  full_steps: int, cache_block: int, start_percent: float, end_percent: float,
                  reuse: str = "extrapolate") -> RehashConfig:
    return RehashConfig(mode=rehash_mode, split_point=cache_block, interval=interval, warmup=warmup_steps,
                        tail=tail_steps, threshold=threshold, full_steps=full_steps,
                        start_percent=start_percent, end_percent=end_percent, reuse=reuse)


class StepRehashModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamlineStepRehash",
            display_name="Step Rehash (Model Patch)",
            category="Streamline",
            description="Step Rehash as a MODEL patch, for SamplerCustomAdvanced, ADE's samplers or any "
            "KSampler: on chosen steps only the shallow UNet path runs and the cached deep feature is reused.",
            inputs=[io.Model.Input("model", tooltip="The model to patch (e.g. Streamline Model Patch's or ADE's output).")]
            + rehash_inputs(),
            outputs=[io.Model.Output(tooltip="The model with Step Rehash (a clone).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, **settings) -> io.NodeOutput:
        return io.NodeOutput(apply_rehash(model, rehash_config(**settings), node_id=node_id_of(cls)))


class StepRehashSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="StreamlineStepRehashSampler",
            display_name="Step Rehash Sampler",
            category="Streamline",
            description="KSampler with Step Rehash: reuses deep UNet features across adjacent steps and "
            "reports how many steps were computed in full and the speedup.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (e.g. Streamline Model Patch's or ADE's output)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The noise seed, as KSampler's."),
                io.Int.Input("steps", default=25, min=1, max=10000,
                             tooltip="Denoising steps; Step Rehash computes some of them in full and rehashes the rest."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, as KSampler's."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="As KSampler's."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="As KSampler's."),
                io.Conditioning.Input("positive", tooltip="What the video should show."),
                io.Conditioning.Input("negative", tooltip="What it should not show."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (frames in the batch)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the schedule to run, as KSampler's."),
            ] + rehash_inputs(),
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                **settings) -> io.NodeOutput:
        import nodes

        patched = apply_rehash(model, rehash_config(**settings))
        (latent,) = nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                          latent_image, denoise=denoise)
        report = patched.model_options["transformer_options"][STATE_KEY].last.report
        text = report.text() if report is not None else "Step Rehash: no sampling ran"
        return io.NodeOutput(latent, ui=ui.PreviewText(text))
