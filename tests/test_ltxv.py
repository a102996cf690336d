"""The sliced LTX blocks (families/ltxv/) against ComfyUI's own LTX forwards, their memory laws
(families/ltxv/laws.py), Memory Budget's plan and Step Rehash's split (families/ltxv/rehash.py).

Tiny random-weight models through ComfyUI's loader and detection (testing/model_families.py LTX_VARIANTS):
LTXV (LTXVModel) and LTX-2 (LTXAVModel: video and audio streams, audio<->video cross-attention), also with
cross_attention_adaln and LTX-2.3's gated attention as a model file's metadata names them. The patch goes on a
clone through ComfyUI's block-replace hook; the forward is the diffusion model's own. CPU, fp32; exact means
max|patched - plain| <= 1e-5 * max|plain|. ComfyUI 0.3.64 has no LTX-2 (those tests skip, saying so) and an
older LTX block the pack leaves to ComfyUI (tested: unchanged, one log line).
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import pytest
import torch

try:  # ComfyUI's nodes.py, imported at collection, while the host leads sys.path: pytest later puts a checkout's folder
    # first when its name is no module name (a worktree's), and the pack's own nodes/ package would shadow it
    import nodes as comfy_nodes
except ImportError:  # no host: the tests skip
    comfy_nodes = None

from comfyui_streamline.testing.matrix import full_matrix_only  # noqa: E402

pytestmark = pytest.mark.host

TOL = 1e-5
STREAMLINE_LOGGER = "ComfyUI-Streamline"
FRAMES, HEIGHT, WIDTH = 3, 4, 5  # 60 video tokens
AUDIO_FRAMES = 7


def relative_error(out, ref) -> float:
    out, ref = flat(out), flat(ref)
    assert out.shape == ref.shape
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.1
    return ((out - ref).abs().max() / ref.abs().max()).item()


def flat(out) -> torch.Tensor:
    return torch.cat([o.flatten() for o in out]) if isinstance(out, (list, tuple)) else out


def host_reason() -> str | None:
    from comfyui_streamline.families.ltxv.patch import host_reason as reason

    return reason()


def needs(name: str):
    """Skip where this host cannot run `name` sliced: no LTX-2 (ComfyUI 0.3.64), or an older LTX block."""
    from comfyui_streamline.testing.model_families import LTX_VARIANTS, host_lacks

    lacking = host_lacks(LTX_VARIANTS[name]) or host_reason()
    if lacking:
        pytest.skip(lacking)


def spec(name: str, layers: int = 2, **config):
    from comfyui_streamline.testing.model_families import LTX_VARIANTS, ltxav, ltxv

    base = LTX_VARIANTS[name]
    build = functools.partial(ltxav if name == "LTXAV" else ltxv, num_layers=layers, **config)
    metadata = {**(base.transformer_config or {}), **config} or None
    return dataclasses.replace(base, build=build, transformer_config=metadata)


@functools.lru_cache(maxsize=None)
def loaded(name: str, layers: int = 2, **config):
    from comfyui_streamline.testing.model_families import load

    needs(name)
    return load(spec(name, layers, **dict(config)))


def patched_clone(model, token_chunk: int):
    from comfyui_streamline.families.ltxv.patch import install_ltxv_slicing

    clone = model.clone()
    blocks = len(model.model.diffusion_model.transformer_blocks)
    assert install_ltxv_slicing(clone, lambda to, x, tokens_per_frame: token_chunk) == list(range(blocks))
    return clone


def call_options(model) -> dict:
    """transformer_options as sampling hands them to the diffusion model (with the patcher's wrappers)."""
    return {**model.model_options["transformer_options"], "wrappers": model.wrappers}


def inputs(name: str, batch: int, seed: int = 0, per_token: bool = False):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, 128, FRAMES, HEIGHT, WIDTH, generator=g)
    x = [video, torch.randn(batch, 8, AUDIO_FRAMES, 16, generator=g)] if name == "LTXAV" else video
    if per_token:  # a timestep per latent frame (a denoise mask's, patchified): one modulation row per token
        t = torch.rand(batch, FRAMES, 1, generator=g).expand(batch, FRAMES, HEIGHT * WIDTH).reshape(batch, -1)
    else:
        t = torch.rand(batch, generator=g)
    if name == "LTXAV" and per_token:  # the audio's own timestep (LTXAV.forward's (video, audio) pair)
        t = (t, torch.rand(batch, generator=g))
    width = 16 if name == "LTXAV" else 4096
    context = torch.randn(batch, 8, width, generator=g)
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[-1, -3:] = 0
    return x, t, context, mask


@pytest.fixture
def slice_spy(monkeypatch):
    """Records (video tokens, chunk) of every sliced block call."""
    from comfyui_streamline.families.ltxv import block, patch

    calls = []
    original_video, original_av = block.sliced_ltxv_block, block.sliced_av_block

    def video(blk, x, *args):
        calls.append((x.shape[1], args[-1]))
        return original_video(blk, x, *args)

    def av(blk, vx, ax, a, to, chunk):
        calls.append((vx.shape[1], chunk))
        return original_av(blk, vx, ax, a, to, chunk)

    monkeypatch.setattr(patch, "sliced_ltxv_block", video)
    monkeypatch.setattr(patch, "sliced_av_block", av)
    return calls


def run(model, name, batch, chunk=None, seed=0, per_token=False, options=None):
    x, t, context, mask = inputs(name, batch, seed, per_token)
    to = dict(options or {})
    if chunk is not None:
        to.update(call_options(patched_clone(model, chunk)))
    with torch.no_grad():
        x = [p.clone() for p in x] if isinstance(x, list) else x
        return model.model.diffusion_model(x, t, context, mask, frame_rate=25, transformer_options=to)


VARIANTS = [("LTXV", ()), ("LTXV", (("cross_attention_adaln", True),)), ("LTXAV", ()),
            ("LTXAV", (("cross_attention_adaln", True), ("apply_gated_attention", True)))]


@pytest.mark.parametrize("name,config", VARIANTS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("token_chunk", [7, 15])  # 60 tokens: 9 slices (the last of 4); 4 slices
def test_sliced_forward_matches_comfyui(name, config, batch, token_chunk, slice_spy):
    model = loaded(name, 2, **dict(config))
    plain = run(model, name, batch)
    out = run(model, name, batch, token_chunk)
    error = relative_error(out, plain)
    print(f"\n[{name} {dict(config)} batch {batch} chunk {token_chunk}] max|diff| / max|plain| = {error:.2e}")
    assert error <= TOL
    assert slice_spy == [(60, token_chunk)] * 2  # both blocks sliced


@pytest.mark.parametrize("name", ["LTXV", "LTXAV"])
def test_per_token_and_per_frame_timesteps(name, slice_spy):
    """A timestep per token (LTXV: one modulation row per token) or per latent frame (LTX-2: CompressedTimestep's
    rows of a frame's patches), read per slice without expanding them."""
    model = loaded(name)
    plain = run(model, name, 2, per_token=True)
    out = run(model, name, 2, 11, per_token=True)
    assert relative_error(out, plain) <= TOL
    assert slice_spy == [(60, 11)] * 2


@pytest.mark.parametrize("options", [{"stg_self_attn_blocks": [1]}, {"a2v_cross_attn": False},
                                     {"v2a_cross_attn": False}, {"run_ax": False}, {"run_vx": False}])
def test_ltx2_switches(options, slice_spy):
    """LTX-2's per-call switches: STG's value passthrough in a block, the audio<->video attentions off, a stream
    off."""
    model = loaded("LTXAV")
    plain = run(model, "LTXAV", 2, options=options)
    out = run(model, "LTXAV", 2, 13, options=options)
    assert relative_error(out, plain) <= TOL
    assert len(slice_spy) == 2


def test_guide_attention_mask_and_a_mask_per_query():
    """The guide mask (model.py GuideAttentionMask: noisy queries, tracked guide queries and the rest, each with
    its own mask) and a tensor mask with a row per query, on a block, slices crossing the groups' bounds."""
    needs("LTXV")
    from comfy.ldm.lightricks.model import GuideAttentionMask
    from comfyui_streamline.families.ltxv.block import sliced_ltxv_block

    dm = loaded("LTXV").model.diffusion_model
    block = dm.transformer_blocks[0]
    g = torch.Generator().manual_seed(4)
    b, t, c = 2, 40, dm.inner_dim
    x = torch.randn(b, t, c, generator=g)
    context = torch.randn(b, 8, c, generator=g)
    timestep = torch.randn(b, 1, 6 * c, generator=g) * 0.1
    pe = dm._precompute_freqs_cis(torch.rand(b, 3, t, generator=g) * 10, dim=c, out_dtype=x.dtype,
                                  num_attention_heads=dm.num_attention_heads)
    guide = GuideAttentionMask(t, 24, 10, torch.rand(1, 10, generator=g) + 0.1)
    per_query = torch.randn(1, 1, t, t, generator=g)
    for mask in (guide, per_query):
        with torch.no_grad():
            plain = block(x.clone(), context=context, timestep=timestep, pe=pe, transformer_options={},
                          self_attention_mask=mask)
            for chunk in (7, 16):
                out = sliced_ltxv_block(block, x.clone(), context, None, timestep, pe, {}, mask, None, chunk)
                assert relative_error(out, plain) <= TOL, (type(mask).__name__, chunk)


@pytest.mark.parametrize("name", ["LTXV", "LTXAV"])
def test_ksampler_under_streamline_model_patch_matches_without(name, slice_spy):
    """Two KSampler steps, cond and uncond batched, under the Streamline Model Patch node (its token slices
    automatic from frame_chunk 1: one latent frame of the batch per slice)."""
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch
    from comfyui_streamline.testing.model_families import LTX_VARIANTS, ltxav_latent

    model, family = loaded(name), LTX_VARIANTS[name]
    positive, negative = family.conds()
    video = (1, 128, FRAMES, HEIGHT, WIDTH)
    latent = ltxav_latent(video, AUDIO_FRAMES) if name == "LTXAV" else {"samples": torch.zeros(video)}

    def sample(m):
        (out,) = comfy_nodes.common_ksampler(m, 5, 2, family.cfg, "euler", "normal", positive, negative, latent)
        return out["samples"]

    plain = sample(model)
    out = sample(StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0])
    parts = (out.unbind(), plain.unbind()) if name == "LTXAV" else ((out,), (plain,))
    for o, p in zip(*parts):
        assert relative_error(o, p) <= TOL
    assert slice_spy == [(60, 10)] * 2 * 2  # 2 steps x 2 blocks; 1 frame x 20 tokens / batch 2


def test_streamline_model_patch_left_automatic_slices_as_the_laws_choose(slice_spy):
    """Streamline Model Patch with its slices left automatic, through KSampler: each call's block hooks get the
    slice the laws choose for it (the adapter's call_slicing: laws.automatic_token_chunk), whole latent frames,
    and the output stays within TOL of the plain MODEL's."""
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.ltxv.adapter import LTXV
    from comfyui_streamline.techniques.slicing import apply_streamline
    from comfyui_streamline.testing.model_families import LTX_VARIANTS

    model, family = loaded("LTXV"), LTX_VARIANTS["LTXV"]
    positive, negative = family.conds()
    video = (1, 128, FRAMES, HEIGHT, WIDTH)

    def sample(m):
        (out,) = comfy_nodes.common_ksampler(m, 5, 2, family.cfg, "euler", "normal", positive, negative,
                                             {"samples": torch.zeros(video)})
        return out["samples"]

    plain = sample(model)
    out = sample(apply_streamline(model, SliceConfig()))
    assert relative_error(out, plain) <= TOL
    dm = model.model.diffusion_model
    x, context = torch.empty(2, *video[1:]), torch.empty(2, positive[0][0].shape[1], 1)
    chunk = LTXV.call_slicing(dm, x, context, SliceConfig()).token_chunk
    assert chunk % (HEIGHT * WIDTH) == 0  # whole latent frames
    assert LTXV.call_slicing(dm, x, context, SliceConfig(token_chunk=7)).token_chunk == 7
    assert slice_spy == [(60, chunk)] * 2 * 2, (slice_spy, chunk)  # 2 steps x 2 blocks


def test_unknown_block_and_unknown_cond_run_unsliced_with_one_log_line(caplog, slice_spy):
    from comfy.ldm.lightricks.model import BasicTransformerBlock
    from comfyui_streamline.testing.model_families import load

    class OtherBlock(BasicTransformerBlock):  # another pack's block: its own forward
        def forward(self, x, **kwargs):
            return super().forward(x, **kwargs)

    needs("LTXV")
    model = load(spec("LTXV"), seed=1)
    model.model.diffusion_model.transformer_blocks[1].__class__ = OtherBlock
    clone = patched_clone(model, 16)
    x, t, context, mask = inputs("LTXV", 2)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger=STREAMLINE_LOGGER):
        plain = model.model.diffusion_model(x, t, context, mask)
        for _ in range(2):
            out = model.model.diffusion_model(x, t, context, mask, transformer_options=call_options(clone))
        unknown = model.model.diffusion_model(x, t, context, mask, transformer_options=call_options(clone),
                                              some_new_cond=torch.ones(1))
    assert relative_error(out, plain) <= TOL and torch.equal(unknown, plain)
    notices = [r.getMessage() for r in caplog.records if r.name == STREAMLINE_LOGGER]
    assert sum("OtherBlock" in n for n in notices) == 1, notices
    assert sum("some_new_cond" in n for n in notices) == 1, notices
    assert slice_spy == [(60, 16)] * 2  # block 0 sliced in both calls, block 1 never, the unknown cond never


def test_recorded_host_fingerprints_are_this_hosts():
    from comfyui_streamline.families.ltxv.patch import LTX_RECORDED, ltxv_functions
    from comfyui_streamline.host.fingerprints import unrecorded

    needs("LTXAV")
    assert set(ltxv_functions()) == set(LTX_RECORDED)
    assert unrecorded(ltxv_functions(), LTX_RECORDED) == []


def test_the_self_check_agrees():
    from comfyui_streamline.families.ltxv.patch import ltxv_self_check

    needs("LTXV")
    assert ltxv_self_check() <= TOL


def test_an_older_host_runs_ltxv_unchanged_and_says_so(caplog):
    """ComfyUI 0.3.64's LTX block (no fused ops, no guide mask) is not the one the pack mirrors: LTXV runs
    ComfyUI's own forward, bit-identical, with one log line."""
    from comfyui_streamline.families import registry
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch
    from comfyui_streamline.testing.model_families import FAMILIES, load

    if host_reason() is None:
        pytest.skip("this host's LTX block is the one the pack slices (tests above)")
    model = load(FAMILIES["LTXV"])
    assert registry.unsupported_reason(model.model.diffusion_model) == host_reason()
    positive, negative = FAMILIES["LTXV"].conds()
    latent = FAMILIES["LTXV"].latent()
    with caplog.at_level(logging.INFO, logger=STREAMLINE_LOGGER):
        (plain,) = comfy_nodes.common_ksampler(model, 5, 1, 5.0, "euler", "normal", positive, negative, latent)
        patched = StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0]
        (out,) = comfy_nodes.common_ksampler(patched, 5, 1, 5.0, "euler", "normal", positive, negative, latent)
    assert torch.equal(out["samples"], plain["samples"])
    assert sum("running it unchanged" in r.getMessage() for r in caplog.records) == 1


# --- memory: the live-tensor counter on the CPU against families/ltxv/laws.py --------------------------------------

MEMORY_MODEL = dict(attention_head_dim=64, num_attention_heads=2, cross_attention_dim=128, caption_channels=16)
MEMORY_AUDIO = dict(audio_attention_head_dim=32, audio_num_attention_heads=2, audio_cross_attention_dim=64)
MEMORY_TEXT, MEMORY_AUDIO_FRAMES = 6, 40


@functools.lru_cache(maxsize=None)
def memory_model(audio: bool):
    from comfyui_streamline.host import tiny_models

    needs("LTXAV" if audio else "LTXV")
    return tiny_models.ltxv(audio=audio, **MEMORY_MODEL, **(MEMORY_AUDIO if audio else {}))


def measured_peak(audio: bool, batch: int, frames: int, side: int, chunk: int | None, per_token: bool) -> int:
    from comfyui_streamline.core.memtrace import LiveTensorMeter
    from comfyui_streamline.families.ltxv.patch import WRAPPER_KEY, SlicedLtxBlock, add_call_info
    from comfyui_streamline.host import tiny_models

    model = memory_model(audio)
    call = tiny_models.ltxv_inputs(model, audio=audio, batch=batch, frames=frames, height=side, width=side,
                                   audio_frames=MEMORY_AUDIO_FRAMES)
    args = list(call["args"])
    if per_token:  # a timestep per token, equal within a latent frame (a denoise mask's)
        t = torch.rand(batch, frames, 1, generator=torch.Generator().manual_seed(2)).expand(batch, frames, side * side)
        args[1] = (t.reshape(batch, -1), torch.rand(batch)) if audio else t.reshape(batch, -1)
    to = {}
    if chunk is not None:
        to["patches_replace"] = {"dit": {("double_block", i): SlicedLtxBlock(i, lambda *_: chunk) for i in range(2)}}
        to["wrappers"] = {"diffusion_model": {WRAPPER_KEY: [add_call_info]}}
    with torch.no_grad(), LiveTensorMeter() as meter:
        memory_model(audio)(*args, transformer_options=to, **call["kwargs"])
    return meter.peak_bytes


def predicted_peak(audio: bool, batch: int, frames: int, side: int, chunk: int | None, per_token: bool) -> float:
    from comfyui_streamline.families.ltxv import laws

    model = memory_model(audio)
    work = dataclasses.replace(laws.ltx_work(model, (batch, 8, frames, side, side), 4, MEMORY_TEXT, MEMORY_AUDIO_FRAMES),
                               modulation_rows=(frames if audio else frames * side * side) if per_token else 1,
                               timestep_per_token=per_token)
    return laws.forward_peak_bytes(laws.ltx_shape(model), work, chunk, laws.SUB_QUADRATIC)


@pytest.mark.parametrize("audio, per_token", [
    (False, True), (True, False),
    pytest.param(False, False, marks=full_matrix_only("the per-token case")),
    pytest.param(True, True, marks=full_matrix_only("LTX-2's and the per-token cases"))])
def test_memory_laws_within_one_percent_of_the_meter(audio, per_token):
    """Whole forwards (2 blocks), ComfyUI's and sliced (16, 64, 512 tokens), against the live-tensor counter:
    2048 tokens (the attention scores lead ComfyUI's peak), 256 (the prologue and head matter), batch 1 and 2."""
    rows = []
    for batch, frames, side in [(2, 2, 32), (1, 2, 32), (2, 1, 16)]:
        for chunk in (None, 16, 64, 512):
            measured = measured_peak(audio, batch, frames, side, chunk, per_token)
            predicted = predicted_peak(audio, batch, frames, side, chunk, per_token)
            print(f"\n[{'LTX-2' if audio else 'LTXV'} per-token {per_token} batch {batch} tokens "
                  f"{frames * side * side} chunk {chunk}] measured {measured / 2**20:.2f} MiB, predicted "
                  f"{predicted / 2**20:.2f} MiB ({predicted / measured - 1:+.2%})")
            assert abs(predicted / measured - 1) <= 0.01
            rows.append(measured)
    assert rows[0] / rows[1] >= 3  # ComfyUI's peak against 16-token slices, 2048 tokens


def test_planned_token_slice_fits_and_is_largest():
    from comfyui_streamline.core.plan_search import BudgetError, PlanSearch
    from comfyui_streamline.families.ltxv.laws import SDPA, SUB_QUADRATIC, AudioShape, LtxShape, LtxWork, \
        forward_peak_bytes, plan_tokens

    shape = LtxShape(4096, 32, layers=48, ada_params=9, gated=True, audio=AudioShape(2048, 32))  # LTX-2.3-like
    work = LtxWork(2, 16 * 24 * 38, text_tokens=1024, dtype_bytes=2, audio_tokens=121)  # 768x1216x121, CFG batched
    for kernel in (SDPA, SUB_QUADRATIC):
        def planned(budget: float) -> int:
            return plan_tokens(shape, work, PlanSearch(budget, "a test", headroom=1.0), kernel).candidate

        plain = forward_peak_bytes(shape, work, None, kernel)
        budget = (plain + forward_peak_bytes(shape, work, 1, kernel)) / 2
        n = planned(budget)
        assert forward_peak_bytes(shape, work, n, kernel) <= budget < forward_peak_bytes(shape, work, n + 1, kernel)
        assert planned(plain) == work.tokens
        with pytest.raises(BudgetError):
            planned(1.0)


@pytest.mark.parametrize("kernel_name", ["SDPA", "SUB_QUADRATIC"])
def test_planned_token_slice_is_the_first_that_fits_in_a_scan(kernel_name):
    """The plan search bisects: for budgets across the range, it finds the slice a scan of every slice from all
    tokens down to one finds (LTX-2's dims, audio included, over 3 latent frames of 16x24)."""
    from comfyui_streamline.core.plan_search import PlanSearch
    from comfyui_streamline.families.ltxv import laws
    from comfyui_streamline.families.ltxv.laws import AudioShape, LtxShape, LtxWork, forward_peak_bytes, \
        plan_tokens, token_slices

    kernel = getattr(laws, kernel_name)
    shape = LtxShape(4096, 32, layers=2, ada_params=9, gated=True, audio=AudioShape(2048, 32))
    work = LtxWork(2, 3 * 16 * 24, text_tokens=1024, dtype_bytes=2, audio_tokens=24)
    peaks = [forward_peak_bytes(shape, work, n, kernel) for n in token_slices(work)]
    assert peaks[-1] < peaks[0]
    for i in range(41):
        budget = peaks[-1] + (peaks[0] - peaks[-1]) * i / 40
        scanned = next(n for n, p in zip(token_slices(work), peaks) if p <= budget)
        assert plan_tokens(shape, work, PlanSearch(budget, "a test", headroom=1.0), kernel).candidate == scanned


def test_automatic_slice_is_the_coarsest_close_to_one_frame():
    """A config left automatic: the most latent frames per slice whose predicted peak is within
    AUTO_PEAK_CLOSENESS of one frame per slice's; the next coarser candidate is not."""
    from comfyui_streamline.core.plan_search import AUTO_PEAK_CLOSENESS
    from comfyui_streamline.core.slicing import frame_slices
    from comfyui_streamline.families.ltxv.laws import SDPA, SUB_QUADRATIC, AudioShape, LtxShape, LtxWork, \
        automatic_token_chunk, forward_peak_bytes

    cases = [(LtxShape(4096, 32, layers=48, ada_params=9, gated=True, audio=AudioShape(2048, 32)),
              LtxWork(2, 16 * 24 * 38, text_tokens=1024, dtype_bytes=2, audio_tokens=121), 24 * 38),
             (LtxShape(2048, 32, layers=28, ada_params=6, gated=False, audio=None),
              LtxWork(2, 13 * 16 * 24, text_tokens=128, dtype_bytes=2), 16 * 24)]
    for shape, work, per_frame in cases:
        for kernel in (SDPA, SUB_QUADRATIC):
            slices = frame_slices(work.tokens, per_frame)
            peak = lambda n: forward_peak_bytes(shape, work, n, kernel)  # noqa: E731
            chosen = automatic_token_chunk(shape, work, per_frame, kernel)
            bound = (1 + AUTO_PEAK_CLOSENESS) * peak(slices[-1])
            assert chosen in slices[1:] and peak(chosen) <= bound
            assert peak(slices[slices.index(chosen) - 1]) > bound


@pytest.mark.parametrize("name", ["LTXV", "LTXAV"])
def test_memory_budget_plans_and_slices_exactly(name, slice_spy, caplog):
    """The Memory Budget node under a budget ComfyUI's forward does not fit: it plans token slices (logged), the
    blocks run them, and the output is ComfyUI's; the plan fits the budget by the laws."""
    from comfyui_streamline.core.plan_search import ALLOCATOR_HEADROOM
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families import registry
    from comfyui_streamline.families.ltxv import laws
    from comfyui_streamline.nodes.memory_budget import MemoryBudget
    from comfyui_streamline.testing.model_families import LTX_VARIANTS, ltxav_latent

    model, family = loaded(name), LTX_VARIANTS[name]
    dm = model.model.diffusion_model
    video = (1, 128, FRAMES, HEIGHT, WIDTH)
    latent = ltxav_latent(video, AUDIO_FRAMES) if name == "LTXAV" else {"samples": torch.zeros(video)}
    batched = (2, *video[1:])
    whole = laws.ltx_peaks(dm, batched, 4, SliceConfig(), 8)[1]
    budget = int(whole * 0.6)
    plan = registry.plan_for(registry.LTXV, dm, batched, 4, budget, context_tokens=8)
    assert plan.config.token_chunk < 60 and plan.predicted_peak_bytes <= budget * ALLOCATOR_HEADROOM
    positive, negative = family.conds()

    def sample(m):
        (out,) = comfy_nodes.common_ksampler(m, 5, 2, family.cfg, "euler", "normal", positive, negative, latent)
        return out["samples"]

    plain = sample(model)
    caplog.set_level(logging.INFO, logger=STREAMLINE_LOGGER)
    budgeted = MemoryBudget.execute(model, budget / 2**30, 160, 128, 17).result[0]
    out = sample(budgeted)
    parts = (out.unbind(), plain.unbind()) if name == "LTXAV" else ((out,), (plain,))
    for o, p in zip(*parts):
        assert relative_error(o, p) <= TOL
    assert slice_spy and all(chunk == plan.config.token_chunk for _, chunk in slice_spy), (slice_spy, plan)
    assert any(r.getMessage().startswith("Streamline Memory Budget (") and "token_chunk" in r.getMessage()
               for r in caplog.records)


# --- Step Rehash: the shallow/deep split (families/ltxv/rehash.py through techniques/rehash.py) ---------------------

REHASH_BLOCKS, REHASH_STEPS = 4, 6  # cache_block -1: blocks 0 and 3 shallow; fixed schedule: full 0, 1, 3, 5
FULL_STEPS, REHASHED_STEPS = [0, 1, 3, 5], [2, 4]


def rehash_settings(**kw) -> dict:
    base = dict(rehash_mode="fixed", interval=2, warmup_steps=1, tail_steps=1, threshold=0.15, full_steps=3,
                cache_block=-1, start_percent=0.0, end_percent=1.0, reuse="extrapolate")
    return {**base, **kw}


def with_rehash(model, **kw):
    from comfyui_streamline.nodes.step_rehash import rehash_config
    from comfyui_streamline.techniques.rehash import apply_rehash

    return apply_rehash(model, rehash_config(**rehash_settings(**kw)))


def rehash_report(model):
    from comfyui_streamline.host.options import REHASH_KEY

    return model.model_options["transformer_options"][REHASH_KEY].last.report


def rehash_sample(model, name, steps=REHASH_STEPS):
    from comfyui_streamline.testing.model_families import LTX_VARIANTS, ltxav_latent

    family = LTX_VARIANTS[name]
    positive, negative = family.conds()
    video = (1, 128, FRAMES, HEIGHT, WIDTH)
    latent = ltxav_latent(video, AUDIO_FRAMES) if name == "LTXAV" else {"samples": torch.zeros(video)}
    with torch.inference_mode():
        (out,) = comfy_nodes.common_ksampler(model, 7, steps, family.cfg, "euler", "normal", positive, negative, latent)
    return flat(out["samples"].unbind() if name == "LTXAV" else out["samples"]).clone()


def streamline_patch(model):
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    return StreamlineModelPatch.execute(model, frame_chunk=1, spatial_chunk=0).result[0]


def block_steps(model):
    """[(step, block index)] of every block the forward runs (hooks on the blocks)."""
    calls, handles = [], []
    for index, block in enumerate(model.model.diffusion_model.transformer_blocks):
        def hook(module, args, kwargs, out, index=index):
            to = kwargs.get("transformer_options", {})
            calls.append((int((to["sample_sigmas"] == to["sigmas"].max()).nonzero()[0, 0]), index))
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    return calls, handles


@pytest.fixture
def rehash_cache_spy(monkeypatch):
    """What each call stores and reuses: [(keys, sigma, deep feature)], [(keys, sigma, reused)]."""
    from comfyui_streamline.techniques import rehash as step_rehash

    stored, reused = [], []
    store, reuse = step_rehash.RehashCallState.store, step_rehash.RehashCallState.reuse

    def spy_store(self, deep):
        stored.append((list(self.keys), self.sigma, deep.clone()))
        return store(self, deep)

    def spy_reuse(self, shallow):
        out = reuse(self, shallow)
        if out is not None:
            reused.append((list(self.keys), self.sigma, out.clone()))
        return out

    monkeypatch.setattr(step_rehash.RehashCallState, "store", spy_store)
    monkeypatch.setattr(step_rehash.RehashCallState, "reuse", spy_reuse)
    return stored, reused


@pytest.mark.parametrize("name", ["LTXV", "LTXAV"])
def test_rehash_all_full_is_plain_and_with_slicing_is_streamlines(name):
    """Fidelity tied to full steps: a run whose steps are all full is ComfyUI's output (bit-identical), and with
    Streamline's slices Streamline's output."""
    model = loaded(name, REHASH_BLOCKS)
    plain = rehash_sample(model, name)
    assert torch.equal(rehash_sample(with_rehash(model, rehash_mode="off"), name), plain)
    all_full = with_rehash(model, warmup_steps=REHASH_STEPS)
    assert torch.equal(rehash_sample(all_full, name), plain)
    assert rehash_report(all_full).full == REHASH_STEPS and rehash_report(all_full).rehashed == 0
    sliced = rehash_sample(streamline_patch(model), name)
    assert relative_error(sliced, plain) <= TOL
    for both in (with_rehash(streamline_patch(model), warmup_steps=REHASH_STEPS),
                 streamline_patch(with_rehash(model, warmup_steps=REHASH_STEPS))):
        assert relative_error(rehash_sample(both, name), sliced) <= 1e-6


@pytest.mark.parametrize("name", ["LTXV", "LTXAV"])
def test_rehash_steps_run_only_the_shallow_blocks_and_reuse_each_conds_and_streams_residual(name,
                                                                                           rehash_cache_spy):
    from comfyui_streamline.core.rehash import reused_feature

    stored, reused = rehash_cache_spy
    model = loaded(name, REHASH_BLOCKS)
    patched = with_rehash(model)
    calls, handles = block_steps(model)
    try:
        out = rehash_sample(patched, name)
    finally:
        for h in handles:
            h.remove()
    for step in FULL_STEPS:
        assert sorted(i for s, i in calls if s == step) == list(range(REHASH_BLOCKS)), step
    for step in REHASHED_STEPS:
        assert sorted(i for s, i in calls if s == step) == [0, REHASH_BLOCKS - 1], step
    report = rehash_report(patched)
    assert (report.full, report.rehashed) == (len(FULL_STEPS), len(REHASHED_STEPS))
    assert torch.isfinite(out).all() and not torch.equal(out, rehash_sample(model, name))
    # cond and uncond batched: one call per step, two caches; LTX-2: each row holds a cond's video then audio
    video_values = 60 * model.model.diffusion_model.inner_dim
    audio_values = AUDIO_FRAMES * model.model.diffusion_model.audio_inner_dim if name == "LTXAV" else 0
    assert {len(keys) for keys, _, _ in stored} == {2} and len(stored) == len(FULL_STEPS)
    assert {tuple(d.shape) for _, _, d in stored} == ({(2, 60, video_values // 60)} if name == "LTXV"
                                                      else {(2, video_values + audio_values)})
    for keys, sigma, cached in reused:
        history = [(s, d) for k, s, d in stored if s > sigma][-2:]
        expected = torch.cat([reused_feature([(s, d.chunk(2)[i]) for s, d in history], sigma, "extrapolate")
                              for i in range(2)])
        assert torch.allclose(cached, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_rehash_and_streamline_slicing_compose(mode, slice_spy):
    threshold = 10.0 if mode == "adaptive" else 0.15
    model = loaded("LTXAV", REHASH_BLOCKS)
    alone = with_rehash(model, rehash_mode=mode, threshold=threshold)
    unsliced = rehash_sample(alone, "LTXAV")
    assert not slice_spy
    both = with_rehash(streamline_patch(model), rehash_mode=mode, threshold=threshold)
    out = rehash_sample(both, "LTXAV")
    assert slice_spy and all(chunk < tokens for tokens, chunk in slice_spy)
    assert relative_error(out, unsliced) <= TOL
    assert rehash_report(both).rehashed == rehash_report(alone).rehashed > 0


def test_rehash_shallow_blocks_and_conflicts(caplog):
    from comfyui_streamline.core.rehash import RehashConfigError
    from comfyui_streamline.families.registry import LTXV

    class Stack:  # an LTX model as rehash_split reads it: its transformer blocks
        def __init__(self, n):
            self.transformer_blocks = [None] * n

    assert [LTXV.rehash_split(Stack(n), -1) for n in (1, 2, 3, 48)] == [0, 0, 1, 1]
    for c, n in ((1, 2), (24, 48), (-2, 48)):
        with pytest.raises(RehashConfigError, match="for a LTX model with"):
            LTXV.rehash_split(Stack(n), c)
    model = loaded("LTXV", REHASH_BLOCKS)
    plain = rehash_sample(model, "LTXV")
    caplog.set_level(logging.WARNING, logger=STREAMLINE_LOGGER)
    out_of_range = with_rehash(model, cache_block=2)  # 2 at each end of 4 blocks: nothing deep
    assert torch.equal(rehash_sample(out_of_range, "LTXV"), plain)
    assert sum("cache_block 2" in r.getMessage() for r in caplog.records) == 1
