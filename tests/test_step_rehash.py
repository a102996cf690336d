"""Step Rehash through ComfyUI's real sampling path with AnimateDiff-Evolved (random SD1.5-shaped
weights, CPU fp32, 8x8 latents). Fidelity is not judged here (random weights); these tests check
the mechanics: which steps skip the deep path, exactness where nothing is reused, the cache life
cycle, isolation between runs, CFG batching, context windows, composition with Streamline.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch

from test_sampling_exact import (  # noqa: F401  (fixtures)
    CTX_FRAMES, FRAMES, LATENT, NEGATIVE, POSITIVE, ade_context_model, ade_model, ade_nodes, base_model,
    motion_model, probe,
)

pytestmark = pytest.mark.host

STEPS = 6
SEED = 77
CFG = 5.0


def settings(mode="fixed", interval=2, warmup_steps=1, tail_steps=1, threshold=0.15, full_steps=3,
             cache_block=-1, start_percent=0.0, end_percent=1.0):
    return dict(rehash_mode=mode, interval=interval, warmup_steps=warmup_steps, tail_steps=tail_steps,
                threshold=threshold, full_steps=full_steps, cache_block=cache_block,
                start_percent=start_percent, end_percent=end_percent)


def patch(model, keystep_store=None, **kw):
    from comfyui_streamline.techniques.rehash import apply_rehash
    from comfyui_streamline.nodes.step_rehash import rehash_config

    return apply_rehash(model, rehash_config(**settings(**kw)), keystep_store=keystep_store)


def state_of(model):
    from comfyui_streamline.host.options import REHASH_KEY as STATE_KEY

    return model.model_options["transformer_options"][STATE_KEY]


@contextmanager
def deep_call_counter(unet):
    """Counts, per sampling step, UNet calls and calls into the deep path (the middle block)."""
    calls = defaultdict(lambda: {"unet": 0, "deep": 0})
    current = {}

    def pre(module, args, kwargs):
        to = kwargs.get("transformer_options", {})
        sigma = float(to["sigmas"].max())
        sigmas = to["sample_sigmas"]
        current["step"] = int((sigmas >= sigma * (1 - 1e-6)).nonzero()[-1])
        calls[current["step"]]["unet"] += 1

    def deep(module, args, out):
        calls[current["step"]]["deep"] += 1

    hooks = [unet.register_forward_pre_hook(pre, with_kwargs=True), unet.middle_block[0].register_forward_hook(deep)]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def sample(model, frames=FRAMES, negative=NEGATIVE, steps=STEPS):
    import nodes

    latent = {"samples": torch.zeros(frames, 4, LATENT, LATENT)}
    with torch.inference_mode():
        (out,) = nodes.common_ksampler(model, SEED, steps, CFG, "euler", "normal", POSITIVE, negative, latent)
    return out["samples"].clone()


@pytest.fixture(scope="module")
def plain(ade_model):
    return sample(ade_model)


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_off_equals_plain_sampling_exactly(ade_model, plain):
    out = sample(patch(ade_model, mode="off"))
    assert torch.equal(out, plain)


def test_fixed_schedule_skips_the_deep_path_on_rehash_steps(ade_model, plain):
    model = patch(ade_model, mode="fixed", interval=2, warmup_steps=1, tail_steps=1)
    with deep_call_counter(ade_model.model.diffusion_model) as calls:
        out = sample(model)
    full, rehash = [0, 1, 3, 5], [2, 4]
    assert sorted(calls) == list(range(STEPS))
    assert all(calls[s]["deep"] == calls[s]["unet"] >= 1 for s in full), dict(calls)
    assert all(calls[s]["deep"] == 0 and calls[s]["unet"] >= 1 for s in rehash), dict(calls)
    report = state_of(model).last.report
    assert (report.steps, report.full, report.rehashed) == (STEPS, 4, 2)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)  # reuse happened and changed the output


def test_cache_is_empty_after_sampling_and_after_an_interrupted_run(ade_model):
    import comfy.model_management
    import comfy.patcher_extension

    model = patch(ade_model)
    sample(model)
    last = state_of(model).last
    assert last.run is not None and not last.run.deep and not last.run.shallow
    assert state_of(model).run is None  # the model's own state never holds a run

    calls = []

    def interrupt_at_step_3(executor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise comfy.model_management.InterruptProcessingException()
        return executor(*args, **kwargs)

    interrupted = model.clone()
    interrupted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test-interrupt",
                                     interrupt_at_step_3)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(interrupted)
    last = state_of(interrupted).last
    assert last.run is not None and state_of(interrupted).run is None
    assert not last.run.deep and not last.run.shallow and last.run.progress is None
    assert last.report.full + last.report.rehashed == 3


def test_runs_with_different_settings_do_not_interfere(ade_model):
    a, b = patch(ade_model, interval=2), patch(ade_model, interval=3, warmup_steps=2)
    first_a = sample(a)
    out_b = sample(b)
    second_a = sample(a)
    assert torch.equal(first_a, second_a)
    assert not torch.equal(first_a, out_b)
    assert (state_of(b).last.report.full, state_of(a).last.report.full) == (4, 4)


def test_cfg_batched_and_unbatched_give_the_same_result(ade_model, monkeypatch):
    model = patch(ade_model, interval=2)
    with probe(ade_model.model.diffusion_model) as batched_calls:
        batched = sample(model)
    # a model that says it needs more memory than there is: ComfyUI then runs cond and uncond apart
    monkeypatch.setattr(ade_model.model, "memory_required", lambda *a, **k: float("inf"))
    with probe(ade_model.model.diffusion_model) as unbatched_calls:
        unbatched = sample(model)
    assert {c.batch for c in batched_calls.unet_calls} == {2 * FRAMES}
    assert {c.batch for c in unbatched_calls.unet_calls} == {FRAMES}
    assert relative(unbatched, batched) <= 1e-4


def test_context_windows_cache_per_window(ade_context_model):
    from comfyui_streamline.techniques import rehash as step_rehash

    model, _ = ade_context_model
    keys_stored = set()
    real_store = step_rehash.RehashCallState.store

    def spy(self, deep):
        keys_stored.update(self.keys)
        return real_store(self, deep)

    step_rehash.RehashCallState.store = spy
    try:
        with deep_call_counter(model.model.diffusion_model) as calls:
            out = sample(patch(model, interval=2), frames=CTX_FRAMES)
    finally:
        step_rehash.RehashCallState.store = real_store
    windows = {window for _, window in keys_stored}
    assert len(windows) >= 2 and len(keys_stored) == 2 * len(windows)  # cond and uncond per window
    assert all(calls[s]["deep"] == 0 and calls[s]["unet"] == len(windows) for s in (2, 4)), dict(calls)
    assert torch.isfinite(out).all()


def test_composes_with_streamline_slicing(ade_model):
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.techniques.slicing import apply_streamline

    rehash_only = sample(patch(ade_model, interval=2))
    for both in (apply_streamline(patch(ade_model, interval=2), SliceConfig(3, 7, False)),
                 patch(apply_streamline(ade_model, SliceConfig(3, 7, False)), interval=2)):
        with probe(ade_model.model.diffusion_model) as record:
            out = sample(both)
        assert record.sliced_frame_groups() and record.sliced_motion_modules()
        assert relative(out, rehash_only) <= 1e-5
        assert state_of(both).last.report.rehashed == 2


def test_composes_with_the_memory_budget_which_leaves_the_cache_its_memory(ade_model, monkeypatch):
    """Memory Budget + Step Rehash in a real run: plans made once the cache holds features budget for it
    (a second plan per shape, for the budget less one held step), and the video is the one Step Rehash
    gives unsliced. The plans belong to the run: none stay on the model."""
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.techniques.budget import BudgetPlanner, held_step
    from comfyui_streamline.host.options import STREAMLINE_KEY as STREAMLINE_STATE_KEY
    from comfyui_streamline.techniques.slicing import StreamlineState, apply_streamline

    runs = []
    for_run = StreamlineState.for_run

    def recording_for_run(self, patcher=None):
        runs.append(for_run(self, patcher))
        return runs[-1]

    monkeypatch.setattr(StreamlineState, "for_run", recording_for_run)
    rehash_only = sample(patch(ade_model, interval=2))
    budget = 8 * 2**30
    both = patch(apply_streamline(ade_model, SliceConfig(), planner=BudgetPlanner(budget)), interval=2)
    out = sample(both)
    assert relative(out, rehash_only) <= 1e-5
    assert len(runs) == 1
    # before any feature is cached, and after
    assert {key[-1] for key in runs[0].planner.plans} == {budget, budget - held_step(budget)}
    assert not both.model_options["transformer_options"][STREAMLINE_STATE_KEY].planner.plans


def test_keystep_mode_calibrates_once_then_uses_the_saved_key_steps(ade_model, tmp_path):
    store = tmp_path / "keysteps.json"
    model = patch(ade_model, mode="keystep", full_steps=3, keystep_store=store)
    with deep_call_counter(ade_model.model.diffusion_model) as calibration:
        sample(model)
    assert all(c["deep"] == c["unet"] for c in calibration.values())  # the calibration run is all full
    assert store.is_file() and "key steps" in state_of(model).last.report.note
    with deep_call_counter(ade_model.model.diffusion_model) as calls:
        sample(model)
    full = [s for s, c in calls.items() if c["deep"]]
    assert len(full) == 3 and full[0] == 0
    assert state_of(model).last.report.full == 3


def test_adaptive_threshold_bounds(ade_model, plain):
    everything_full = sample(patch(ade_model, mode="adaptive", threshold=0.0))
    assert relative(everything_full, plain) <= 1e-5
    model = patch(ade_model, mode="adaptive", threshold=1e9)
    sample(model)
    assert state_of(model).last.report.full == 2  # steps 0 and 1: a change rate needs two full steps


def test_start_and_end_percent_limit_rehash(ade_model):
    model = patch(ade_model, mode="fixed", interval=100, warmup_steps=0, tail_steps=0, start_percent=0.5)
    sample(model)
    report = state_of(model).last.report
    assert 0 < report.rehashed < STEPS - 1


def test_sampler_node_reports_full_steps(ade_model, caplog):
    from comfyui_streamline.nodes.step_rehash import StepRehashSampler

    latent = {"samples": torch.zeros(FRAMES, 4, LATENT, LATENT)}
    with caplog.at_level(logging.INFO, logger="ComfyUI-Streamline"), torch.inference_mode():
        out = StepRehashSampler.execute(ade_model, SEED, STEPS, CFG, "euler", "normal", POSITIVE, NEGATIVE, latent,
                                        1.0, **settings(interval=2))
    (result,) = out.result
    text = out.ui.as_dict()["text"][0]
    assert result["samples"].shape == (FRAMES, 4, LATENT, LATENT)
    assert "4/6 steps computed in full, 2 rehashed" in text
    assert any("Step Rehash:" in r.getMessage() for r in caplog.records)


def test_held_bytes_count_each_cached_storage_once():
    """What Step Rehash keeps between calls, for the Memory Budget: cond and uncond features cut from one
    batch share a storage and count once; the adaptive mode's shallow reference counts too."""
    from comfyui_streamline.core.rehash import RehashConfig
    from comfyui_streamline.techniques.rehash import RehashRun

    run = RehashRun(RehashConfig(mode="adaptive"), steps=4, full_steps=None, rehash_sigma_range=(0.0, 1e9))
    batch, earlier, shallow = torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(2, 3)
    run.deep = {("cond", ()): [(2.0, earlier[:2]), (1.0, batch[:2])], ("uncond", ()): [(2.0, earlier[2:]), (1.0, batch[2:])]}
    run.shallow = {("cond", ()): shallow}
    assert run.held_bytes() == (32 + 32 + 6) * 4
    run.clear()
    assert run.held_bytes() == 0
