from comfy_api.latest import ComfyExtension, io

from .memory_budget import MemoryBudget
from .model_patch import StreamlineModelPatch
from .step_rehash import StepRehashModelPatch, StepRehashSampler
from .tinyvideo import NODES as TINYVIDEO_NODES


class StreamlineExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [StreamlineModelPatch, MemoryBudget, StepRehashSampler, StepRehashModelPatch, *TINYVIDEO_NODES]
