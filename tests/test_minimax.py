"""MiniMax H3 (ComfyUI 0.33's MiniMaxH3Model) through the pack: its DiT blocks sliced over the packed
text/audio/video tokens (families/minimax/), Step Rehash's split.

A tiny random-weight H3 of 4 blocks (testing/video_families.py MINIMAX) loaded by ComfyUI's loader, which
detects it from the keys; CPU fp32. The sliced block against the host's DiTBlock.forward on slices that divide
the tokens and slices that do not, with per-token modulation rows (a denoise mask's blend) and text tag runs;
whole forwards through the block hook; KSampler under Streamline Model Patch; what runs ComfyUI's own block
(one line); Step Rehash's split (first and last blocks every step, the middle residual reused). ComfyUI 0.3.64
has no MiniMax H3: every test is skipped there, the reason naming the host.
"""
from __future__ import annotations

import functools
import logging
from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch

pytestmark = pytest.mark.host

STEPS, SEED, CFG, TOL = 4, 7, 5.0, 1e-5
STREAMLINE_LOGGER = "ComfyUI-Streamline"
BLOCKS = 4
FULL, REHASHED = [0, 1, 3], [2]  # fixed schedule (warm-up 1, interval 2, tail 1) over 4 steps


@functools.lru_cache(maxsize=1)
def h3_model():
    from comfyui_streamline.testing.model_families import host_lacks, load
    from comfyui_streamline.testing.video_families import MINIMAX

    lacking = host_lacks(MINIMAX)
    if lacking is not None:
        pytest.skip(lacking)
    return load(MINIMAX)


@pytest.fixture(autouse=True)
def host_has_minimax():
    """Every test skips on a host without MiniMax H3 (ComfyUI 0.3.64), the reason naming the host."""
    h3_model()


def sample(model, steps: int = STEPS) -> list[torch.Tensor]:
    import nodes
    from comfyui_streamline.testing.video_families import MINIMAX, minimax_latent

    positive, negative = MINIMAX.conds()
    with torch.inference_mode():
        (out,) = nodes.common_ksampler(model, SEED, steps, CFG, "euler", "normal", positive, negative,
                                       minimax_latent())
    return [t.clone() for t in out["samples"].unbind()]


@functools.lru_cache(maxsize=1)
def plain() -> tuple[torch.Tensor, ...]:
    out = sample(h3_model())
    assert all(torch.isfinite(t).all() and t.abs().max() > 0.1 for t in out)
    return tuple(out)


def relative(a, b) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


def equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == STREAMLINE_LOGGER and r.levelno >= logging.WARNING]


@contextmanager
def sliced_calls():
    """(tokens, chunk) of every MiniMax block the pack slices."""
    from comfyui_streamline.families.minimax import patch as minimax_patch

    seen, real = [], minimax_patch.sliced_block_forward

    def spy(block, x, *args):
        seen.append((x.shape[0], args[-1]))
        return real(block, x, *args)

    minimax_patch.sliced_block_forward = spy
    try:
        yield seen
    finally:
        minimax_patch.sliced_block_forward = real


def streamline(model):
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    return StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0]


# -- detection and the family -----------------------------------------------------------------------------

def test_the_model_is_what_comfyui_detects_and_the_pack_claims():
    from comfyui_streamline.families import registry

    model = h3_model()
    dm = model.model.diffusion_model
    assert type(model.model.model_config).__name__ == "MiniMaxH3"
    assert (type(model.model).__name__, type(dm).__name__) == ("MiniMaxH3", "MiniMaxH3Model")
    assert len(dm.blocks) == BLOCKS
    assert registry.family_of(dm) is registry.MINIMAX
    assert registry.unsupported_reason(dm, "slice") is None and registry.unsupported_reason(dm, "rehash") is None


def test_recorded_host_fingerprints_are_this_hosts():
    from comfyui_streamline.families.minimax.patch import RECORDED, minimax_functions
    from comfyui_streamline.host.fingerprints import unrecorded

    assert set(RECORDED) == set(minimax_functions())
    assert unrecorded(minimax_functions(), RECORDED) == []


def test_the_host_verdict_slices_and_its_self_check_agrees():
    from comfyui_streamline.families.minimax.patch import minimax_self_check, minimax_verdict

    assert minimax_verdict().sliced
    with sliced_calls() as slices:
        assert minimax_self_check() <= TOL
    assert slices and all(chunk < tokens for tokens, chunk in slices)


# -- the sliced block against the host's ------------------------------------------------------------------

def block_inputs(dm, text_len: int = 8, frames: int = 2, h: int = 4, w: int = 6, audio_t: int = 5):
    """(x (S, C), t_emb, mod_segments, rope table) as _forward builds them: segments per kind (text split into
    tag runs), the video segment with one modulation row per token (a denoise mask's blend)."""
    from comfy.ldm.minimax import model as h3

    layout = h3.PackedLayout(text_len, frames, h, w, audio_t)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(layout.seq_len, dm.hidden_size, generator=g)
    t_emb = dm.time_embedder(torch.tensor([0.2, 0.5, 0.9]))
    segments = []
    for a, b, kind in layout.segments:
        if kind == "text":  # two tag runs
            segments += [(a, a + 3, 1), (a + 3, b, 3 + 0)]
        elif kind == "video":
            segments.append((a, b, torch.randint(0, 9, (b - a,), generator=g)))
        else:
            segments.append((a, b, 6 + 2))
    rope = h3.rope_rotation_table(dm.rope_freqs(layout.position_ids, "cpu"), x.dtype)
    return x, t_emb, segments, rope


@pytest.mark.parametrize("chunk", [1, 5, 7, 13, 15, 16, 30, 1000])
def test_sliced_block_matches_the_hosts(chunk):
    """Slices that divide the 30 packed tokens (8 text, 10 audio, 12 video: 1, 5, 15) and that do not (7, 13,
    16); a slice of the whole sequence (30, 1000) is the host's block bit for bit."""
    from comfyui_streamline.families.minimax.block import sliced_block_forward

    dm = h3_model().model.diffusion_model
    x, t_emb, segments, rope = block_inputs(dm)
    assert x.shape[0] == 30
    for block in dm.blocks[:2]:
        with torch.inference_mode():
            ref = block(x.clone(), t_emb, segments, rope, transformer_options={})
            out = sliced_block_forward(block, x.clone(), t_emb, segments, rope, {}, chunk)
        if chunk >= x.shape[0]:
            assert torch.equal(out, ref)
        assert relative([out], [ref]) <= TOL, relative([out], [ref])


def test_segments_in_cuts_rows_and_per_token_rows():
    from comfyui_streamline.families.minimax.block import segments_in

    rows = torch.arange(10, 20)
    segments = [(0, 4, 1), (4, 10, 2), (10, 20, rows)]
    assert segments_in(segments, 3, 6) == [(0, 1, 1), (1, 3, 2)]
    cut = segments_in(segments, 8, 14)
    assert cut[0] == (0, 2, 2) and cut[1][:2] == (2, 6) and torch.equal(cut[1][2], torch.arange(10, 14))


def hooked_forward(model, chunk: int | None, denoise_mask=None, payload=None):
    """The diffusion model's output (video, audio) with the pack's block hooks slicing `chunk` tokens
    (None: ComfyUI's forward)."""
    from comfyui_streamline.families.minimax.patch import install_minimax_slicing
    from comfyui_streamline.host.options import DIT_WRAPPER_KEY

    dm = model.model.diffusion_model
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(1, 24, 2, 4, 6, generator=g), torch.randn(1, 32, 2, 5, generator=g)]
    context = torch.randn(1, 8, dm.hidden_size, generator=g)
    options = {}
    if chunk is not None:
        clone = model.clone()
        assert len(install_minimax_slicing(clone, lambda to, rows, per_frame: chunk)) == BLOCKS
        options = {**clone.model_options["transformer_options"], "wrappers": clone.wrappers}
        assert DIT_WRAPPER_KEY in str(clone.wrappers)
    with torch.inference_mode():
        return dm(x, torch.tensor([600.0]), context, transformer_options=options, denoise_mask=denoise_mask,
                  minimax_payload=payload)


@pytest.mark.parametrize("chunk", [3, 8, 11])
def test_whole_forward_through_the_block_hook(chunk):
    """8 text + 10 audio + 12 video = 30 packed tokens: 3 divides them, 8 and 11 do not."""
    ref = hooked_forward(h3_model(), None)
    with sliced_calls() as slices:
        out = hooked_forward(h3_model(), chunk)
    assert slices == [(30, chunk)] * BLOCKS
    assert relative(out, ref) <= TOL


def test_whole_forward_with_a_denoise_mask_blend():
    """A denoise mask that is not all ones gives the video rows their own timesteps: per-token modulation rows."""
    mask = torch.ones(1, 1, 2, 4, 6)
    mask[:, :, 0, :2] = 0.25
    ref = hooked_forward(h3_model(), None, mask)
    with sliced_calls() as slices:
        out = hooked_forward(h3_model(), 7, mask)
    assert slices and relative(out, ref) <= TOL
    assert relative(out, hooked_forward(h3_model(), None)) > 1e-3  # the mask changed the output


def test_whole_forward_with_keyframe_rows():
    """A keyframe (MiniMaxH3ImageToVideo's payload: its latent and audio packed as condition rows after the text,
    at their own timesteps): more packed tokens, more segments; the same exactness."""
    g = torch.Generator().manual_seed(2)
    keyframe = {"resolved_frame_index": 0, "latent": torch.randn(1, 24, 1, 4, 6, generator=g),
                "audio_latent": torch.randn(1, 32, 2, 2, generator=g)}
    payload = {"keyframes": [keyframe], "cond_video_latents": [keyframe["latent"]],
               "cond_audio_latents": [keyframe["audio_latent"]]}
    ref = hooked_forward(h3_model(), None, payload=payload)
    with sliced_calls() as slices:
        out = hooked_forward(h3_model(), 7, payload=payload)
    assert slices == [(30 + 6 + 4, 7)] * BLOCKS  # + 6 keyframe video rows, + 4 keyframe audio rows
    assert relative(out, ref) <= TOL
    assert relative(out, hooked_forward(h3_model(), None)) > 1e-3  # the keyframe changed the output


# -- through KSampler ---------------------------------------------------------------------------------------

def test_streamline_model_patch_through_ksampler(caplog):
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    with sliced_calls() as slices:
        out = sample(streamline(h3_model()))
    assert slices and all(chunk < tokens for tokens, chunk in slices), slices
    assert len(slices) == STEPS * 2 * BLOCKS  # cond and uncond: H3 runs batch 1
    assert relative(out, plain()) <= TOL, relative(out, plain())
    assert not warnings(caplog)


def test_an_attention_override_runs_the_hosts_block_with_one_line(caplog):
    """An optimized_attention_override may need whole query sequences: ComfyUI's own block, bit for bit,
    and one line saying why."""
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)

    def with_override(model):
        model = model.clone()
        model.model_options["transformer_options"]["optimized_attention_override"] = \
            lambda func, *args, **kwargs: func(*args, **kwargs)
        return model

    reference = sample(with_override(h3_model()))
    with sliced_calls() as slices:
        out = sample(with_override(streamline(h3_model())))
    assert equal(out, reference) and not slices
    said = warnings(caplog)
    assert len(said) == 1 and "attention override" in said[0] and "MiniMax block" in said[0], said


# -- memory laws and Memory Budget -----------------------------------------------------------------------

# (hidden, heads, head_dim, ffn, rope_len, video latent T x H x W, audio frames, text tokens): packed tokens
LAW_SIZES = {
    "187 tokens": (96, 2, 40, 160, 4, (2, 16, 20), 10, 7),
    "672 tokens": (64, 2, 32, 96, 4, (2, 32, 40), 10, 12),
    "4856 tokens (two score blocks)": (32, 1, 32, 48, 4, (3, 80, 80), 20, 16),
}


def measured_and_predicted(sizes, chunk: int | None, scores: bool) -> tuple[int, int]:
    """The live-tensor meter's peak of one whole forward (blocks sliced `chunk` tokens through the hook, None:
    ComfyUI's), and the laws' prediction."""
    from comfyui_streamline.core.memtrace import LiveTensorMeter
    from comfyui_streamline.families.minimax import laws
    from comfyui_streamline.families.minimax.adapter import packed_input
    from comfyui_streamline.families.minimax.patch import MiniMaxCall, SlicedMiniMaxBlock
    from comfyui_streamline.host.options import DIT_CALL_KEY
    from comfyui_streamline.testing.video_families import minimax
    from comfyui_streamline.testing.weights import randomize_

    hidden, heads, head_dim, ffn, rope_len, (t, h, w), audio_t, text = sizes
    dm = randomize_(minimax(2, hidden, heads, head_dim, ffn, rope_len), 0).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(1, 24, t, h, w, generator=g), torch.randn(1, 32, 2, audio_t, generator=g)]
    context = torch.randn(1, text, hidden, generator=g)
    packed = packed_input(dm, x, context, None)
    options = {}
    if chunk is not None:
        hooks = {("double_block", i): SlicedMiniMaxBlock(i, lambda *_: chunk) for i in range(len(dm.blocks))}
        options = {DIT_CALL_KEY: MiniMaxCall(dm.blocks, packed.tokens_per_frame), "patches_replace": {"dit": hooks}}
    with torch.inference_mode(), LiveTensorMeter() as meter:
        dm(x, torch.tensor([600.0]), context, transformer_options=options)
    return meter.peak_bytes, laws.forward_peak_bytes(laws.h3_shape(dm), laws.packed_work(packed), chunk, scores)


@pytest.mark.parametrize("kernel", ["sub-quadratic", "sdpa"])
@pytest.mark.parametrize("size", list(LAW_SIZES))
def test_laws_match_the_live_tensor_meter(size, kernel, monkeypatch):
    """Within 1% of the meter, ComfyUI's forward and sliced ones, under ComfyUI's CPU attention (sub-quadratic:
    scores) and PyTorch SDPA (its CUDA default, run here on the CPU); slicing lowers the peak."""
    import comfy.ldm.minimax.model as h3
    import comfy.ldm.modules.attention as attention

    if kernel == "sdpa":
        monkeypatch.setattr(h3, "optimized_attention", attention.attention_pytorch)
    elif h3.optimized_attention.__name__ != "attention_sub_quad":
        monkeypatch.setattr(h3, "optimized_attention", attention.attention_sub_quad)
    peaks = {}
    for chunk in (None, 64) if LAW_SIZES[size][5][1] > 32 else (None, 1, 64, 500):  # the large one: two
        measured, predicted = measured_and_predicted(LAW_SIZES[size], chunk, kernel != "sdpa")
        print(f"\n[{size}, {kernel}, slices of {chunk}] measured {measured / 2**20:.2f} MiB, predicted "
              f"{predicted / 2**20:.2f} MiB ({predicted / measured - 1:+.2%})")
        assert abs(predicted / measured - 1) <= 0.01
        peaks[chunk] = measured
    if kernel != "sdpa":  # under SDPA at one head the forward's own tensors are the peak of the large one
        assert peaks[64] < peaks[None]


def call_peaks(model) -> tuple[int, int]:
    """(finest slicing, ComfyUI's forward) predicted for the calls the sampling test makes."""
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families import registry
    from comfyui_streamline.families.minimax.adapter import packed_input
    from comfyui_streamline.testing.model_families import TOKENS
    from comfyui_streamline.testing.video_families import minimax_latent

    dm = model.model.diffusion_model
    video, audio = minimax_latent()["samples"].unbind()
    packed = packed_input(dm, [video, audio], torch.empty(1, TOKENS, dm.hidden_size), None)
    return registry.MINIMAX.peaks(dm, packed, None, SliceConfig(token_chunk=1))


def test_memory_budget_plans_and_slices_through_ksampler(caplog):
    """A budget between the finest slicing's predicted peak and ComfyUI's: the plan slices, the output stays
    within 1e-5 of the plain one, nothing logged."""
    from comfyui_streamline.core.plan_search import ALLOCATOR_HEADROOM
    from comfyui_streamline.nodes.memory_budget import MemoryBudget

    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    finest, whole = call_peaks(h3_model())
    assert finest < whole
    budget_gb = (finest + whole) / 2 / ALLOCATOR_HEADROOM / 2**30
    patched, text = MemoryBudget.execute(h3_model(), budget_gb, 64, 64, 5).result
    assert "MiniMax" in text, text  # the preview plans a 512-token prompt: no slicing fits this tiny budget
    with sliced_calls() as slices:
        out = sample(patched)
    assert slices and all(chunk < tokens for tokens, chunk in slices), slices
    assert relative(out, plain()) <= TOL
    assert not warnings(caplog)


# -- Step Rehash --------------------------------------------------------------------------------------------

def rehash(model, **overrides):
    from comfyui_streamline.nodes.step_rehash import StepRehashModelPatch

    settings = dict(rehash_mode="fixed", interval=2, warmup_steps=1, tail_steps=1, threshold=0.15, full_steps=3,
                    cache_block=-1, start_percent=0.0, end_percent=1.0, reuse="extrapolate")
    return StepRehashModelPatch.execute(model, **{**settings, **overrides}).result[0]


def report_of(model):
    from comfyui_streamline.host.options import REHASH_KEY

    return model.model_options["transformer_options"][REHASH_KEY].last.report


@contextmanager
def block_calls(model):
    """[(step, block index, input, output)] of every DiTBlock call (the block writes x in place: its input is
    taken before it runs)."""
    calls, handles, inputs = [], [], {}
    for index, block in enumerate(model.model.diffusion_model.blocks):
        def pre(module, args, kwargs, index=index):
            inputs[index] = args[0].clone()

        def post(module, args, kwargs, out, index=index):
            to = kwargs.get("transformer_options", {})
            step = int((to["sample_sigmas"] == to["sigmas"].max()).nonzero()[0, 0])
            calls.append((step, index, inputs.pop(index), out.clone()))
        handles += [block.register_forward_pre_hook(pre, with_kwargs=True),
                    block.register_forward_hook(post, with_kwargs=True)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def test_step_rehash_split_runs_the_shallow_blocks_on_rehash_steps(caplog):
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    patched = rehash(h3_model())
    with block_calls(h3_model()) as calls:
        out = sample(patched)
    per_step = defaultdict(list)
    for step, index, _, _ in calls:
        per_step[step].append(index)
    for step in FULL:  # cond and uncond: two calls
        assert per_step[step] == list(range(BLOCKS)) * 2, (step, per_step[step])
    for step in REHASHED:
        assert per_step[step] == [0, BLOCKS - 1] * 2, (step, per_step[step])
    report = report_of(patched)
    assert (report.steps, report.full, report.rehashed) == (STEPS, len(FULL), len(REHASHED))
    assert all(torch.isfinite(t).all() for t in out) and not equal(out, plain())
    assert not warnings(caplog)


def test_step_rehash_with_nothing_reused_is_comfyuis_forward():
    assert equal(sample(rehash(h3_model(), warmup_steps=STEPS)), plain())
    sliced = sample(streamline(h3_model()))
    assert relative(sample(rehash(streamline(h3_model()), warmup_steps=STEPS)), sliced) <= 1e-6


def test_streamline_slicing_and_step_rehash_compose():
    """Both on one model: the same split, its blocks sliced (within 1e-5 of the unsliced split)."""
    with sliced_calls() as slices:
        out = sample(rehash(streamline(h3_model())))
    assert slices and all(chunk < tokens for tokens, chunk in slices)
    assert relative(out, sample(rehash(h3_model()))) <= TOL


def test_the_reused_residual_is_the_extrapolated_deep_residual(monkeypatch):
    """The rehash step's last block gets x leaving block 0 plus the reused residual: the line through the
    deep residuals (x leaving block 2 minus x entering block 1) of the last two full steps, per cond."""
    from comfyui_streamline.core.rehash import reused_feature
    from comfyui_streamline.techniques import rehash as step_rehash

    stored, reused = [], []
    real_store, real_reuse = step_rehash.RehashCallState.store, step_rehash.RehashCallState.reuse

    def store(self, deep):
        stored.append((list(self.keys), self.sigma, deep.clone()))
        return real_store(self, deep)

    def reuse(self, shallow):
        out = real_reuse(self, shallow)
        if out is not None:
            reused.append((list(self.keys), self.sigma, out.clone()))
        return out

    monkeypatch.setattr(step_rehash.RehashCallState, "store", store)
    monkeypatch.setattr(step_rehash.RehashCallState, "reuse", reuse)
    with block_calls(h3_model()) as calls:
        sample(rehash(h3_model()))
    assert len(stored) == 2 * len(FULL) and len(reused) == 2 * len(REHASHED)
    full_calls = defaultdict(list)  # step -> [{index: (in, out)}] per call
    for step, index, x_in, x_out in calls:
        if index == 0:
            full_calls[step].append({})
        full_calls[step][-1][index] = (x_in, x_out)
    deep = [(keys, sigma, d) for keys, sigma, d in stored]
    for (keys, sigma, d), (step, n) in zip(deep, [(s, n) for s in FULL for n in range(2)]):
        by_index = full_calls[step][n]
        assert torch.equal(d, by_index[2][1] - by_index[1][0])
    for keys, sigma, cached in reused:
        history = [(s, d) for k, s, d in stored if k == keys and s > sigma][-2:]
        assert len(history) == 2
        assert torch.allclose(cached, reused_feature(history, sigma, "extrapolate"), rtol=0, atol=1e-6)
    for n, (keys, sigma, cached) in enumerate(reused):
        by_index = full_calls[REHASHED[0]][n]
        assert torch.allclose(by_index[BLOCKS - 1][0], by_index[0][1] + cached, rtol=0, atol=1e-6)


def test_the_budget_preview_lays_out_clips_as_comfyuis_empty_latent():
    from comfyui_streamline.families.minimax.laws import temporal_shape

    nodes_h3 = pytest.importorskip("comfy_extras.nodes_minimax_h3")
    for frames in (1, 5, 6, 22, 100, 124, 362):
        _, video_t, audio_t = nodes_h3.temporal_shape(frames)
        assert temporal_shape(frames) == (video_t, audio_t), frames


def test_comfyuis_memory_estimate_under_the_patch():
    """From the run's latent shapes when the model has them (the laws for a TEXT_TOKENS prompt), else an upper
    bound from the packed size; per sequence of the batch asked about."""
    from types import SimpleNamespace

    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.minimax import laws

    dm = h3_model().model.diffusion_model
    shapes = [(1, 24, 2, 4, 6), (1, 32, 2, 6)]
    base = SimpleNamespace(diffusion_model=dm, latent_shapes=shapes)
    work = laws.latent_work(dm, shapes[0], 6, 4)
    assert work.tokens == laws.TEXT_TOKENS + 12 + 12
    config = SliceConfig(token_chunk=5)
    expected = laws.forward_peak_bytes(laws.h3_shape(dm), work, 5, laws.kernel_has_scores())
    assert laws.estimate_minimax(base, [1, 1, 1536], 4, config, None) == expected
    assert laws.estimate_minimax(base, [2, 1, 1536], 4, config, None) == 2 * expected
    bound = laws.estimate_minimax(SimpleNamespace(diffusion_model=dm), [1, 1, 1536], 4, config, None)
    assert bound > expected  # 1536 / 32 = 48 rows for the 24 the latents pack


# -- The plan search and the automatic slice (core/plan_search.py) ------------------------------------------

def _h3_laws_cases():
    from comfyui_streamline.families.minimax.laws import H3Shape, H3Work

    shape = H3Shape(3072, 24, 128, 8192, rope_len=16, time_dim=256, blocks=4)  # H3-like block dims
    video = 8 * 30 * 40  # 8 latent frames of 30x40 tokens (480x640)
    return [(shape, H3Work(512 + 200 + video, video, 200, 2, builds_layout=False, text_tokens=512), 30 * 40),
            (shape, H3Work(700, 600, 50, 4), 100)]


@pytest.mark.parametrize("scores", [False, True])
def test_planned_token_slice_is_the_first_that_fits_in_a_scan(scores):
    """The plan search bisects: for budgets across the range, it finds the slice a scan of every slice from all
    packed tokens down to one finds; under the finest slice's peak, BudgetError."""
    from comfyui_streamline.core.plan_search import BudgetError, PlanSearch
    from comfyui_streamline.families.minimax.laws import forward_peak_bytes, plan_tokens, token_slices

    for shape, work, _ in _h3_laws_cases():
        peaks = [forward_peak_bytes(shape, work, n, scores) for n in token_slices(work)]
        assert peaks[-1] < peaks[0]
        for i in range(41):
            budget = peaks[-1] + (peaks[0] - peaks[-1]) * i / 40
            scanned = next(n for n, p in zip(token_slices(work), peaks) if p <= budget)
            assert plan_tokens(shape, work, PlanSearch(budget, "a test", headroom=1.0), scores).candidate == scanned
        with pytest.raises(BudgetError):
            plan_tokens(shape, work, PlanSearch(peaks[-1] * 0.99, "a test", headroom=1.0), scores)


@pytest.mark.parametrize("scores", [False, True])
def test_automatic_slice_is_the_coarsest_close_to_one_frame(scores):
    """A config left automatic: the most latent frames per slice whose predicted peak is within
    AUTO_PEAK_CLOSENESS of one frame per slice's; the next coarser candidate is not."""
    from comfyui_streamline.core.plan_search import AUTO_PEAK_CLOSENESS
    from comfyui_streamline.core.slicing import frame_slices
    from comfyui_streamline.families.minimax.laws import automatic_token_chunk, forward_peak_bytes

    for shape, work, per_frame in _h3_laws_cases():
        slices = frame_slices(work.tokens, per_frame)
        peak = lambda n: forward_peak_bytes(shape, work, n, scores)  # noqa: E731
        chosen = automatic_token_chunk(shape, work, per_frame, scores)
        bound = (1 + AUTO_PEAK_CLOSENESS) * peak(slices[-1])
        assert chosen in slices[1:] and peak(chosen) <= bound
        assert peak(slices[slices.index(chosen) - 1]) > bound


def test_streamline_model_patch_left_automatic_slices_as_the_laws_choose():
    """Streamline Model Patch with its slices left automatic, through KSampler: each call's block hooks get the
    slice the laws choose for it (the adapter's call_slicing: laws.automatic_token_chunk), and the output stays
    within TOL of the plain MODEL's."""
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families import registry
    from comfyui_streamline.families.minimax.adapter import packed_input
    from comfyui_streamline.techniques.slicing import apply_streamline
    from comfyui_streamline.testing.model_families import TOKENS
    from comfyui_streamline.testing.video_families import minimax_latent

    dm = h3_model().model.diffusion_model
    video, audio = minimax_latent()["samples"].unbind()
    packed = packed_input(dm, [video, audio], torch.empty(1, TOKENS, dm.hidden_size), None)
    chunk = registry.MINIMAX.call_slicing(dm, packed, None, SliceConfig()).token_chunk
    assert registry.MINIMAX.call_slicing(dm, packed, None, SliceConfig(token_chunk=7)).token_chunk == 7
    with sliced_calls() as slices:
        out = sample(apply_streamline(h3_model(), SliceConfig()))
    assert relative(out, plain()) <= TOL
    assert slices and all(c == (packed.shape[1], chunk) for c in slices), (slices, chunk, packed.shape)


def test_a_host_without_minimax_still_removes_every_familys_slicing(monkeypatch):
    """registry.remove_slicing asks every family on every clone: on a host without comfy.ldm.minimax (ComfyUI
    0.3.64) MiniMax's answer is nothing to remove, not an import of its block module (which needs the host's)."""
    import sys

    from comfyui_streamline.families.minimax.adapter import MINIMAX, host_has_minimax

    monkeypatch.setitem(sys.modules, "comfy.ldm.minimax", None)
    monkeypatch.setitem(sys.modules, "comfy.ldm.minimax.model", None)
    assert not host_has_minimax()
    MINIMAX.remove_slicing(object())  # a patcher it would fail on, were it asked to remove anything
