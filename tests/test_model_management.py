"""The pack under ComfyUI 0.33's model management, as far as a CPU can show it:

- the memory estimate plans for the device the run computes on (the patcher's load_device), not the device
  the weights sit on (the CPU before loading, under lowvram, and always under DynamicVRAM);
- "auto" reads free memory as ComfyUI's sampler does (the patcher's get_free_memory: under DynamicVRAM it
  counts the weight memory it can evict), in the estimate, in the run and in the node's preview;
- an out-of-memory error is retried as wide as ComfyUI's is_oom (an accelerator error that says "out of
  memory" too), out of the except block; any other error goes through untouched; Wan calls are retried with
  half the tokens per slice; host memory running out during skip offload is retried with offload off.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import pytest
import torch

pytestmark = pytest.mark.host

LOGGER = "ComfyUI-Streamline"
GiB = 2**30


@functools.lru_cache(maxsize=1)
def sd15():
    from comfyui_streamline.testing.model_families import FAMILIES, load

    return load(FAMILIES["SD15"])


@pytest.fixture
def free_memory_seen(monkeypatch):
    """Every (device, patcher) the pack asks free memory of; 6 GiB each time."""
    from comfyui_streamline.techniques import budget as memory_budget

    seen = []

    def free(device, patcher=None):
        seen.append((torch.device(device), patcher))
        return 6 * GiB

    monkeypatch.setattr(memory_budget, "free_memory", free)
    return seen


def test_the_estimate_plans_for_the_load_device_not_the_weights(free_memory_seen):
    from comfyui_streamline.nodes.memory_budget import MemoryBudget

    model = sd15().clone()
    model.load_device = torch.device("cuda", 3)  # the weights stay on the CPU, as under DynamicVRAM
    assert next(model.model.diffusion_model.parameters()).device.type == "cpu"
    patched = MemoryBudget.execute(model, budget_gb=0.0, width=64, height=64, frames=4).result[0]
    free_memory_seen.clear()
    estimate = patched.object_patches["memory_required"]
    assert estimate([4, 4, 8, 8]) > 0
    assert [device for device, _ in free_memory_seen] == [torch.device("cuda", 3)]
    assert free_memory_seen[0][1] is patched  # the patcher's view of free memory


def test_auto_reads_the_patchers_free_memory():
    from comfyui_streamline.techniques.budget import SAFETY_BYTES, BudgetPlanner, free_step

    class Patcher:  # ComfyUI 0.33: torch's free memory plus the weights DynamicVRAM can evict
        def get_free_memory(self, device):
            return 10 * GiB

    planner = BudgetPlanner(0).for_run(Patcher())
    assert planner.budget(torch.device("cpu"), 0) == (free_step(10 * GiB - SAFETY_BYTES), 0)
    assert BudgetPlanner(0).budget(torch.device("cpu"), 0, Patcher())[0] == free_step(10 * GiB - SAFETY_BYTES)


def test_a_run_plans_with_its_patchers_free_memory(free_memory_seen):
    import nodes

    from comfyui_streamline.nodes.memory_budget import MemoryBudget
    from comfyui_streamline.testing.model_families import FAMILIES

    patched = MemoryBudget.execute(sd15(), budget_gb=0.0, width=64, height=64, frames=2).result[0]
    positive, negative = FAMILIES["SD15"].conds()
    free_memory_seen.clear()
    nodes.common_ksampler(patched, 1, 1, 5.0, "euler", "normal", positive, negative,
                          {"samples": torch.zeros(2, 4, 8, 8)})
    patchers = {id(p) for _, p in free_memory_seen if p is not None}
    assert free_memory_seen and patchers, "the run's planner asked no patcher"
    assert all(p is not None for _, p in free_memory_seen)


def accelerator_oom() -> BaseException:
    """An out-of-memory error that is not torch.OutOfMemoryError (a failed cuBLAS workspace, say)."""
    error = getattr(torch, "AcceleratorError", RuntimeError)
    try:
        return error("CUDA error: out of memory")
    except TypeError:  # its constructor wants more
        return RuntimeError("CUDA error: out of memory")


def unet_inputs(batch: int = 4):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, 77, 768, generator=g))


def run_unet(transformer_options: dict):
    import comfy.patcher_extension

    from comfyui_streamline.techniques.slicing import streamline_wrapper

    unet = sd15().model.diffusion_model
    x, t, c = unet_inputs()
    executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
        unet._forward, unet, [streamline_wrapper])
    with torch.no_grad():
        return executor.execute(x, t, c, None, None, transformer_options)


def test_an_accelerator_out_of_memory_is_retried_with_finer_slices(monkeypatch, caplog):
    import comfy.model_management

    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.unet import forward as streamlined_unet
    from comfyui_streamline.host.options import STREAMLINE_KEY as STATE_KEY
    from comfyui_streamline.techniques.slicing import StreamlineState

    if not hasattr(comfy.model_management, "is_oom"):
        pytest.skip("this ComfyUI has no is_oom (0.3.64 counts torch's OutOfMemoryError alone)")
    real, seen = streamlined_unet.run_frame_chunked, []

    def oom_above_two(group, total, chunk):
        seen.append(chunk)
        if chunk > 2:
            raise accelerator_oom()
        return real(group, total, chunk)

    reference = run_unet({})
    monkeypatch.setattr(streamlined_unet, "run_frame_chunked", oom_above_two)
    state = StreamlineState(SliceConfig(4, 64, scale_with_level=False))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = run_unet({STATE_KEY: state})
    assert ((out - reference).abs().max() / reference.abs().max()).item() <= 1e-5
    assert state.config.frame_chunk == 2
    assert sum("out of memory" in r.getMessage() for r in caplog.records) == 1


def test_any_other_error_goes_through_untouched(monkeypatch):
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.unet import forward as streamlined_unet
    from comfyui_streamline.host.options import STREAMLINE_KEY as STATE_KEY
    from comfyui_streamline.techniques.slicing import StreamlineState

    def broken(group, total, chunk):
        raise ValueError("not a memory problem")

    monkeypatch.setattr(streamlined_unet, "run_frame_chunked", broken)
    state = StreamlineState(SliceConfig(4, 64, scale_with_level=False))
    with pytest.raises(ValueError, match="not a memory problem"):
        run_unet({STATE_KEY: state})
    assert state.config.frame_chunk == 4


class HostlessPool:
    """An offload pool on a host whose memory has run out: every buffer fails as torch's CPU allocator does."""

    def __init__(self):
        self.asked = 0

    def take(self, device, shape, dtype):
        self.asked += 1
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1048576 bytes. Error code 12 (Cannot allocate memory)")

    def give_back(self, host):
        raise AssertionError("nothing was lent")


def test_host_memory_running_out_during_offload_is_retried_with_offload_off(monkeypatch, caplog):
    from comfyui_streamline.core import offload
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.host.options import STREAMLINE_KEY as STATE_KEY
    from comfyui_streamline.techniques.slicing import StreamlineState

    reference = run_unet({})
    pool = HostlessPool()
    monkeypatch.setattr(offload, "pool_for", lambda device: pool)
    state = StreamlineState(SliceConfig(2, 64, scale_with_level=False, offload_skips=True, offload_features=True))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = run_unet({STATE_KEY: state})
        again = run_unet({STATE_KEY: state})  # the rest of the run: offload stays off, no second attempt
    assert ((out - reference).abs().max() / reference.abs().max()).item() <= 1e-5
    assert torch.equal(out, again)
    assert pool.asked == 1
    assert (state.config.offload_skips, state.config.offload_features) == (False, False)
    assert (state.config.frame_chunk, state.config.spatial_chunk) == (2, 64)  # the slices are kept
    lines = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(lines) == 1 and "host memory during offload" in lines[0] and "DefaultCPUAllocator" in lines[0]


def test_only_a_failed_host_allocation_counts_as_host_memory():
    import errno

    from comfyui_streamline.core import offload

    assert offload.host_allocation_failed(MemoryError())
    assert offload.host_allocation_failed(OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert offload.host_allocation_failed(RuntimeError("DefaultCPUAllocator: can't allocate memory: 8 bytes"))
    assert not offload.host_allocation_failed(RuntimeError("CUDA error: an illegal memory access"))
    assert not offload.host_allocation_failed(OSError(errno.EACCES, "Permission denied"))

    class Broken(HostlessPool):
        def take(self, device, shape, dtype):
            raise RuntimeError("some other fault")

    transfers = offload.Transfers(torch.device("cpu"), pool=Broken())
    with pytest.raises(RuntimeError, match="some other fault"):
        transfers.host_buffer(torch.zeros(4))
    transfers = offload.Transfers(torch.device("cpu"), pool=HostlessPool())
    with pytest.raises(offload.HostMemoryError, match="0.0 MiB offload buffer"):
        transfers.host_buffer(torch.zeros(4))


def test_wan_calls_are_retried_with_half_the_tokens_per_slice(monkeypatch, caplog):
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.techniques.slicing import apply_streamline
    from comfyui_streamline.families.wan import patch
    from comfyui_streamline.testing.model_families import WAN_VARIANTS, load, wan

    model = load(dataclasses.replace(WAN_VARIANTS["WAN21_T2V"], build=functools.partial(wan, num_layers=2)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 10, 12, generator=g)  # 90 tokens
    sigma, context = torch.tensor([0.7, 0.7]), torch.randn(2, 8, 4096, generator=g)

    def call(m):
        to = {**m.model_options["transformer_options"], "wrappers": m.wrappers}
        with torch.no_grad():
            return m.model.apply_model(x, sigma, c_crossattn=context, transformer_options=to)

    reference = call(model)
    real, seen = patch.sliced_block_forward, []

    def oom_above_twenty(block, h, *args):
        seen.append(args[-1])
        if args[-1] > 20:
            raise torch.OutOfMemoryError("injected")
        return real(block, h, *args)

    monkeypatch.setattr(patch, "sliced_block_forward", oom_above_twenty)
    patched = apply_streamline(model, SliceConfig(token_chunk=64))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = call(patched)
    assert torch.equal(out, reference)
    assert seen == [64, 32, 16, 16]  # block 0 fails twice, then both blocks run at 16
    assert sum("out of memory" in r.getMessage() for r in caplog.records) == 2


def test_multigpu_device_clones_keep_the_patch_and_plan_for_their_device(free_memory_seen):
    """ComfyUI 0.33's MultiGPU CFG split deep-clones the model per device (ModelPatcher.deepclone_multigpu, then
    its ON_DEEPCLONE_MULTIGPU callbacks): the clone keeps the patch, and its estimate plans for its own device."""
    import comfy.patcher_extension

    from comfyui_streamline.techniques.budget import MemoryEstimate
    from comfyui_streamline.nodes.memory_budget import MemoryBudget
    from comfyui_streamline.host.options import STREAMLINE_KEY as STATE_KEY

    multigpu = getattr(comfy.patcher_extension.CallbacksMP, "ON_DEEPCLONE_MULTIGPU", None)
    if multigpu is None:
        pytest.skip("this ComfyUI has no MultiGPU deep clones (0.3.64)")
    patched = MemoryBudget.execute(sd15(), budget_gb=0.0, width=64, height=64, frames=4).result[0]
    clone = patched.clone()  # what deepclone_multigpu does before its callbacks, with the device's own model
    clone.load_device = torch.device("cuda", 1)
    for callback in patched.get_all_callbacks(multigpu):
        callback(patched, clone)
    estimate = clone.object_patches["memory_required"]
    assert isinstance(estimate, MemoryEstimate) and estimate is not patched.object_patches["memory_required"]
    assert estimate.base_model is clone.model and estimate.patcher() is clone
    assert STATE_KEY in clone.model_options["transformer_options"]  # the patch survives the clone
    free_memory_seen.clear()
    estimate([4, 4, 8, 8])
    assert [device for device, _ in free_memory_seen] == [torch.device("cuda", 1)]
