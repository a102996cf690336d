"""Streamline Model Patch: the node. The patch itself is techniques/slicing.py's apply_streamline."""
from __future__ import annotations

from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from ..core.slicing import SliceConfig
from ..techniques.slicing import apply_streamline


class StreamlineModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamlineModelPatch",
            display_name="Streamline Model Patch",
            category="Streamline",
            description="Exact Feature Slicer + Operator Grouping (Streamlined Inference): the UNet and the "
            "AnimateDiff motion modules run in slices, so peak memory drops while the output stays the same. "
            "SVD's video UNet and Wan's DiT blocks are sliced too; other model families run unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch, e.g. the output of AnimateDiff-Evolved's nodes."),
                io.Int.Input("frame_chunk", default=0, min=0, max=4096, step=1,
                             tooltip="Samples (batch x frames, CFG counts twice) per slice for per-frame layers "
                             "at full resolution; deeper levels use larger slices. 0 = automatic (slices of about 64K tokens, "
                             "large enough to keep a GPU busy; for a given memory budget use Streamline Memory Budget)."),
                io.Int.Input("spatial_chunk", default=0, min=0, max=1 << 20, step=64,
                             tooltip="Pixel positions per slice inside motion modules at full resolution. "
                             "0 = automatic (about 64K tokens per slice: 2048 positions of a 32-sample batch)."),
                io.Boolean.Input("scale_with_level", default=True, optional=True,
                                 tooltip="Grow slices at deeper (smaller) UNet levels so each slice holds about "
                                 "as many values as at full resolution. Off: the same sizes at every level."),
                io.Boolean.Input("offload_skips", default=False, optional=True,
                                 tooltip="Keep the UNet's skip tensors in host memory between the input block that "
                                 "makes them and the output block that reads them (CUDA: pinned memory, copies on a "
                                 "side stream, overlapped with the compute). Less device memory, the same output; "
                                 "the run's report says how many bytes moved. On the CPU it saves nothing."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model (a clone; the input model is unchanged).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model: ModelPatcher, frame_chunk: int, spatial_chunk: int, scale_with_level: bool = True,
                offload_skips: bool = False) -> io.NodeOutput:
        config = SliceConfig(frame_chunk=frame_chunk, spatial_chunk=spatial_chunk, scale_with_level=scale_with_level,
                             offload_skips=offload_skips)
        return io.NodeOutput(apply_streamline(model, config, node_id=node_id_of(cls)))


def node_id_of(node_class) -> str | None:
    """The executing node's UNIQUE_ID (None when the node is called outside a prompt, e.g. in a script)."""
    hidden = getattr(node_class, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None
