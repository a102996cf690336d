"""Step Rehash on Wan (families/wan/rehash.py through techniques/rehash.py), through ComfyUI's real sampling path.

A tiny random-weight Wan 2.1 t2v of 4 blocks (testing/model_families.py) loaded by ComfyUI's loader, CPU fp32:
with cache_block -1 blocks 0 and 3 are shallow, 1 and 2 deep. Fidelity is not judged (random weights);
these tests check the mechanics: exactness where nothing is reused, which blocks a rehash step runs, the
reused residual, the caches per cond and per context window, key steps, the report, Streamline slicing.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch

pytestmark = pytest.mark.host

BLOCKS = 4
STEPS = 6  # fixed schedule (warm-up 1, interval 2, tail 1): full 0, 1, 3, 5; rehashed 2, 4
FULL, REHASHED = [0, 1, 3, 5], [2, 4]
LATENT = (1, 16, 3, 4, 4)
SEED, CFG = 7, 5.0
STREAMLINE_LOGGER = "ComfyUI-Streamline"


def settings(mode="fixed", interval=2, warmup_steps=1, tail_steps=1, threshold=0.15, full_steps=3,
             cache_block=-1, reuse="extrapolate"):
    return dict(rehash_mode=mode, interval=interval, warmup_steps=warmup_steps, tail_steps=tail_steps,
                threshold=threshold, full_steps=full_steps, cache_block=cache_block, start_percent=0.0,
                end_percent=1.0, reuse=reuse)


def patch(model, keystep_store=None, **kw):
    from comfyui_streamline.techniques.rehash import apply_rehash
    from comfyui_streamline.nodes.step_rehash import rehash_config

    return apply_rehash(model, rehash_config(**settings(**kw)), keystep_store=keystep_store)


def report_of(model):
    from comfyui_streamline.host.options import REHASH_KEY as STATE_KEY

    return model.model_options["transformer_options"][STATE_KEY].last.report


def streamline(model):
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    return StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0]


@functools.lru_cache(maxsize=None)
def wan_model():
    from comfyui_streamline.testing.model_families import FAMILIES, load, wan

    return load(dataclasses.replace(FAMILIES["WAN21_T2V"], build=functools.partial(wan, num_layers=BLOCKS)))


def sample(model, latent_shape=LATENT, steps=STEPS) -> torch.Tensor:
    import nodes
    from comfyui_streamline.testing.model_families import FAMILIES

    positive, negative = FAMILIES["WAN21_T2V"].conds()
    latent = {"samples": torch.zeros(latent_shape)}
    with torch.inference_mode():
        (out,) = nodes.common_ksampler(model, SEED, steps, CFG, "euler", "normal", positive, negative, latent)
    return out["samples"].clone()


@functools.lru_cache(maxsize=None)
def plain() -> torch.Tensor:
    return sample(wan_model())


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@contextmanager
def block_calls(model):
    """[(step, block index, input, output)] of every WanAttentionBlock the forward runs."""
    blocks = model.model.diffusion_model.blocks
    calls, handles = [], []
    for index, block in enumerate(blocks):
        def hook(module, args, kwargs, out, index=index):
            to = kwargs.get("transformer_options", {})
            step = int((to["sample_sigmas"] == to["sigmas"].max()).nonzero()[0, 0])
            calls.append((step, index, args[0].clone(), out.clone()))
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@contextmanager
def cache_spy(monkeypatch):
    """What each call stores and reuses: [(keys, sigma, deep feature)] and [(keys, sigma, reused)]."""
    from comfyui_streamline.techniques import rehash as step_rehash

    stored, reused = [], []
    original_store, original_reuse = step_rehash.RehashCallState.store, step_rehash.RehashCallState.reuse

    def store(self, deep):
        stored.append((list(self.keys), self.sigma, deep.clone()))
        return original_store(self, deep)

    def reuse(self, shallow):
        out = original_reuse(self, shallow)
        if out is not None:
            reused.append((list(self.keys), self.sigma, out.clone()))
        return out

    monkeypatch.setattr(step_rehash.RehashCallState, "store", store)
    monkeypatch.setattr(step_rehash.RehashCallState, "reuse", reuse)
    yield stored, reused


def streamline_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == STREAMLINE_LOGGER and r.levelno >= logging.WARNING]


def test_off_and_all_full_are_bit_identical_to_plain(caplog):
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    model = wan_model()
    assert torch.equal(sample(patch(model, mode="off")), plain())
    all_full = patch(model, warmup_steps=STEPS)
    assert torch.equal(sample(all_full), plain())
    assert report_of(all_full).full == STEPS and report_of(all_full).rehashed == 0
    assert not streamline_warnings(caplog)


def test_all_full_with_streamline_slicing_is_streamlines_output():
    model = wan_model()
    sliced = sample(streamline(model))
    assert relative(sliced, plain()) <= 1e-5
    for both in (patch(streamline(model), warmup_steps=STEPS), streamline(patch(model, warmup_steps=STEPS))):
        out = sample(both)
        assert relative(out, sliced) <= 1e-6, relative(out, sliced)


def test_rehash_steps_run_only_the_shallow_blocks():
    model = patch(wan_model())
    with block_calls(wan_model()) as calls:
        out = sample(model)
    per_step = defaultdict(list)
    for step, index, _, _ in calls:
        per_step[step].append(index)
    for step in FULL:
        assert per_step[step] == list(range(BLOCKS)), (step, per_step[step])  # cond/uncond batched: one call
    for step in REHASHED:
        assert per_step[step] == [0, BLOCKS - 1], (step, per_step[step])
    report = report_of(model)
    assert (report.steps, report.full, report.rehashed) == (STEPS, len(FULL), len(REHASHED))
    assert (report.calls_full, report.calls_rehashed) == (len(FULL), len(REHASHED))
    assert "2 rehashed" in report.text()
    assert torch.isfinite(out).all() and not torch.equal(out, plain())


@pytest.mark.parametrize("reuse", ["extrapolate", "hold"])
def test_the_reused_residual_is_reused_feature_of_the_stored_history(monkeypatch, reuse):
    from comfyui_streamline.core.rehash import reused_feature

    model = patch(wan_model(), reuse=reuse)
    with cache_spy(monkeypatch) as (stored, reused), block_calls(wan_model()) as calls:
        sample(model)
    by_step = defaultdict(dict)
    for step, index, x_in, x_out in calls:
        by_step[step][index] = (x_in, x_out)
    assert len(stored) == len(FULL) and len(reused) == len(REHASHED)
    for (keys, sigma, deep), step in zip(stored, FULL):  # the deep feature: what blocks 1..2 add
        assert torch.equal(deep, by_step[step][2][1] - by_step[step][1][0])
    for (keys, sigma, cached), step in zip(reused, REHASHED):
        history = [(s, d) for k, s, d in stored if s > sigma][-(2 if reuse == "extrapolate" else 1):]
        expected = torch.cat([reused_feature([(s, part) for s, part in
                                              [(s, d.chunk(2)[i]) for s, d in history]], sigma, reuse)
                              for i in range(2)])
        assert torch.allclose(cached, expected, rtol=0, atol=1e-6)
        # the last block gets x leaving block 0 plus the reused residual
        assert torch.allclose(by_step[step][BLOCKS - 1][0], by_step[step][0][1] + cached, rtol=0, atol=1e-6)


def test_caches_per_cond_batched_and_not(monkeypatch):
    model = patch(wan_model())
    with cache_spy(monkeypatch) as (stored, reused):
        batched = sample(model)
    assert {len(keys) for keys, _, _ in stored} == {2}
    uuids = {key[0] for keys, _, _ in stored for key in keys}
    assert len(uuids) == 2 and None not in uuids
    stored.clear(), reused.clear()
    monkeypatch.setattr(wan_model().model, "memory_required", lambda *a, **k: float("inf"))
    unbatched = sample(model)
    assert {len(keys) for keys, _, _ in stored} == {1} and len(stored) == 2 * len(FULL)
    assert {len(keys) for keys, _, _ in reused} == {1} and len(reused) == 2 * len(REHASHED)
    for keys, sigma, cached in reused:  # each cond reuses its own residual
        mine = [d for k, s, d in stored if k == keys and s > sigma][-2:]
        theirs = [d for k, s, d in stored if k != keys and s > sigma][-2:]
        assert not torch.equal(mine[-1], theirs[-1])
    assert relative(unbatched, batched) <= 1e-5


def test_caches_per_wan_context_window(monkeypatch, caplog):
    from comfy.context_windows import ContextFuseMethods, ContextSchedules
    from comfy_extras.nodes_context_windows import WanContextWindowsManualNode

    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    latent = (1, 16, 5, 4, 4)  # 5 latent frames; windows of 3 (9 video frames) overlapping by 1
    import inspect

    newer = {"freenoise": False} if "freenoise" in inspect.signature(WanContextWindowsManualNode.execute).parameters else {}
    windowed = WanContextWindowsManualNode.execute(wan_model(), context_length=9, context_overlap=4,
                                                   context_schedule=ContextSchedules.STATIC_STANDARD,
                                                   context_stride=1, closed_loop=False,
                                                   fuse_method=ContextFuseMethods.PYRAMID, **newer).result[0]
    windowed_plain = sample(windowed, latent)
    assert torch.equal(sample(patch(windowed, warmup_steps=STEPS), latent), windowed_plain)
    with cache_spy(monkeypatch) as (stored, reused):
        out = sample(patch(windowed), latent)
    windows = {key[1][1] for keys, _, _ in stored for key in keys}
    assert len(windows) >= 2 and all(len(w) == 3 for w in windows), windows
    assert {key[1][1] for keys, _, _ in reused for key in keys} == windows
    # ComfyUI 0.33's causal_window_fix (on by default) runs a window that does not start at frame 0 with the
    # frame before it prepended (stripped after the forward): one more latent frame of tokens
    anchor = getattr(windowed.model_options["context_handler"], "causal_window_fix", False)
    for keys, sigma, cached in reused:
        window = keys[0][1][1]
        frames = len(window) + (1 if anchor and min(window) > 0 else 0)
        assert cached.shape[1] == frames * 2 * 2  # the window's tokens: its frames x 2 x 2 patches
    assert torch.isfinite(out).all() and not streamline_warnings(caplog)


def test_keystep_calibrates_saves_and_then_uses_the_key_steps(tmp_path):
    store = tmp_path / "keysteps.json"
    model = patch(wan_model(), mode="keystep", full_steps=3, keystep_store=store)
    assert torch.equal(sample(model), plain())  # calibration: every step full
    assert store.exists() and report_of(model).full == STEPS
    sample(model)
    report = report_of(model)
    assert (report.full, report.rehashed) == (3, STEPS - 3)


def test_adaptive_measures_x_entering_the_first_deep_block(monkeypatch):
    from comfyui_streamline.techniques import rehash as step_rehash

    shallow_seen = []
    original = step_rehash.RehashCallState.reuse

    def reuse(self, shallow):
        shallow_seen.append((self.step, shallow.clone()))
        return original(self, shallow)

    monkeypatch.setattr(step_rehash.RehashCallState, "reuse", reuse)
    model = patch(wan_model(), mode="adaptive", threshold=10.0)  # rehash whenever it can
    with block_calls(wan_model()) as calls:
        sample(model)
    leaving_block_0 = {step: x_out for step, index, _, x_out in calls if index == 0}
    assert [step for step, _ in shallow_seen] == list(range(STEPS))
    for step, shallow in shallow_seen:
        assert torch.equal(shallow, leaving_block_0[step])
    report = report_of(model)
    assert (report.full, report.rehashed) == (2, STEPS - 2)  # full until two full calls give a change rate


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_streamline_slicing_and_step_rehash_compose(monkeypatch, mode):
    from comfyui_streamline.families.wan import block, patch as wan_patch

    chunks = []
    original = block.sliced_block_forward

    def spy(blk, x, *args):
        chunks.append((x.shape[1], args[-1]))
        return original(blk, x, *args)

    monkeypatch.setattr(wan_patch, "sliced_block_forward", spy)
    threshold = 10.0 if mode == "adaptive" else 0.15
    alone = patch(wan_model(), mode=mode, threshold=threshold)
    unsliced = sample(alone)
    assert not chunks
    for both in (patch(streamline(wan_model()), mode=mode, threshold=threshold),
                 streamline(patch(wan_model(), mode=mode, threshold=threshold))):
        out = sample(both)
        assert any(chunk < tokens for tokens, chunk in chunks), chunks
        assert relative(out, unsliced) <= 1e-5, relative(out, unsliced)
        assert report_of(both).rehashed == report_of(alone).rehashed > 0
        chunks.clear()


def test_cache_block_out_of_range_runs_in_full_and_says_so(caplog):
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    model = patch(wan_model(), cache_block=2)  # 2 at each end of 4 blocks: nothing deep
    assert torch.equal(sample(model), plain())
    warnings = streamline_warnings(caplog)
    assert len(warnings) == 1 and "cache_block 2" in warnings[0], warnings


def test_shallow_blocks():
    from comfyui_streamline.core.rehash import RehashConfigError
    from comfyui_streamline.families.dit.rehash import shallow_blocks

    assert [shallow_blocks(-1, n, "Wan") for n in (1, 2, 3, 40)] == [0, 0, 1, 1]
    assert shallow_blocks(0, 1, "Wan") == 0 and shallow_blocks(19, 40, "Wan") == 19
    for c, n in ((1, 2), (20, 40), (-2, 40)):
        with pytest.raises(RehashConfigError, match="for a Wan model with"):
            shallow_blocks(c, n, "Wan")


def test_a_deep_block_another_node_replaces_keeps_every_step_full(caplog):
    calls = []

    def theirs(args, extra):
        calls.append(args["img"].shape)
        return extra["original_block"](args)

    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    other = wan_model().clone()
    other.set_model_patch_replace(theirs, "dit", "double_block", 1)
    expected = sample(other)
    calls.clear()
    model = patch(other)
    assert torch.equal(sample(model), expected) and len(calls) == STEPS  # their block ran on every step
    assert report_of(model).rehashed == 0
    assert any("Wan blocks [1] run through another node's block replacement" in w
               for w in streamline_warnings(caplog))


def test_memory_budget_counts_the_deep_blocks_input_step_rehash_keeps(caplog):
    """Under Step Rehash a full Wan call keeps the deep blocks' input, one (batch, tokens, dim) tensor:
    Memory Budget plans with it held, from the first call on (before any cache exists)."""
    from comfyui_streamline.families.wan import laws as wan_laws
    from comfyui_streamline.nodes.memory_budget import MemoryBudget

    caplog.set_level(logging.INFO, logger=STREAMLINE_LOGGER)
    budget_gb = 0.25
    budgeted = MemoryBudget.execute(wan_model(), budget_gb, 64, 64, 3).result[0]
    sample(patch(budgeted), steps=2)
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Streamline Memory Budget (") and " for (" in r.getMessage()]
    assert plans and all("held by Step Rehash's cache" in m for m in plans), plans
    batch = 2  # cond and uncond batched
    split = wan_laws.wan_rehash_split_bytes(wan_model().model.diffusion_model, (batch, *LATENT[1:]), 4)
    assert split == batch * 3 * 2 * 2 * wan_model().model.diffusion_model.dim * 4  # 3 frames of 2x2 tokens, fp32
    caplog.clear()
    sample(budgeted, steps=2)  # without Step Rehash nothing is held
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Streamline Memory Budget (") and " for (" in r.getMessage()]
    assert plans and not any("held" in m for m in plans), plans
