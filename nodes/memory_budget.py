"""Streamline Memory Budget: the node. The planner and the memory estimate are techniques/budget.py's."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..core.plan_search import format_bytes
from ..core.slicing import SliceConfig
from ..host.log import logger
from ..techniques.budget import BudgetPlanner, preview_plan
from ..techniques.slicing import apply_streamline
from .model_patch import node_id_of


class MemoryBudget(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamlineMemoryBudget",
            display_name="Streamline Memory Budget",
            category="Streamline",
            description="Streamline Model Patch with slices chosen to fit a memory budget: the largest (fastest) "
            "slices whose predicted peak activation fits, planned at run time for the actual latent. Models it "
            "cannot plan for (families other than SD/SDXL UNets with AnimateDiff, SVD and Wan) run unchanged, with "
            "ComfyUI's own memory estimate.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch, e.g. the output of AnimateDiff-Evolved's nodes."),
                io.Float.Input("budget_gb", display_name="budget (GiB)", default=0.0, min=0.0, max=1024.0, step=0.05,
                               round=0.01,
                               tooltip="Activation memory budget in GiB (1 GiB = 2^30 bytes; weights not included). "
                               "0 = auto: the memory free on the device when sampling runs, minus 256 MiB."),
                io.Int.Input("width", default=512, min=64, max=8192, step=8, tooltip="For the plan shown on the node."),
                io.Int.Input("height", default=512, min=64, max=8192, step=8, tooltip="For the plan shown on the node."),
                io.Int.Input("frames", default=16, min=1, max=4096, tooltip="For the plan shown on the node."),
            ],
            outputs=[io.Model.Output(tooltip="The model with budget-planned slicing (a clone)."),
                     io.String.Output("plan", display_name="plan",
                                      tooltip="The plan for width x height x frames, as shown on the node.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, budget_gb: float, width: int, height: int, frames: int) -> io.NodeOutput:
        budget = int(budget_gb * 2**30)
        source = f"Streamline Memory Budget ({format_bytes(budget) if budget else 'auto'})"
        patched = apply_streamline(model, SliceConfig(), planner=BudgetPlanner(budget), source=source,
                                   node_id=node_id_of(cls))
        text = preview_plan(model, budget, width, height, frames)
        logger.info(f"Streamline Memory Budget: {text}")
        return io.NodeOutput(patched, text, ui=ui.PreviewText(text))
