"""TinyWan, the pack's small trained Wan-architecture model (tinywan/): it loads through the pack's node as
ComfyUI's own WanModel with Wan's rectified-flow sampling, its shipped weights generate clips that look
like the data (the untrained network's do not), and Streamline Model Patch, Memory Budget and Step Rehash
run on it through ComfyUI's real sampling path: slicing exact, Step Rehash close to full sampling."""
from __future__ import annotations

import pytest
import torch

from comfyui_streamline.tinyvideo import data, stats

pytestmark = pytest.mark.host

PROMPTS = ("red circle slide", "blue square bounce", "green triangle pulse", "yellow circle pan")
FRAMES, SIZE = 8, 32
CFG = 3.0  # TinyWan's guidance scale (tinywan/MODEL_CARD.md: at 5 its shapes come out too large)


@pytest.fixture(scope="module")
def tinywan_model():
    from comfyui_streamline.nodes.tinyvideo import TinyWanLoader

    return TinyWanLoader.execute().result[0]


@pytest.fixture(scope="module")
def untrained_model():
    from comfyui_streamline.tinywan import model as tinywan

    return tinywan.load_model_patcher(state_dict=tinywan.untrained_state_dict())


def _sample(model, prompt: str, steps: int = 20, seed: int = 3) -> torch.Tensor:
    from comfyui_streamline.nodes.tinyvideo import sample_clip

    return sample_clip(model, prompt, frames=FRAMES, size=SIZE, steps=steps, cfg=CFG, seed=seed, scheduler="simple")


def _clip_problems(latent: torch.Tensor, prompt: str) -> list[str]:
    """What the frame and video checks of tinyvideo/stats.py find wrong with a sampled clip."""
    from comfyui_streamline.nodes.tinyvideo import decode

    rgb = decode(latent).permute(0, 3, 1, 2)
    return stats.looks_like_data(stats.clip_stats(rgb), stats.data_ranges(FRAMES, SIZE), colour=prompt.split()[0])


def test_loads_as_comfyuis_wan_model_with_wans_flow_sampling(tinywan_model):
    import comfy.model_base
    import comfy.model_sampling
    from comfy.ldm.wan.model import WanAttentionBlock, WanModel

    from comfyui_streamline.families.registry import WAN, family_of
    from comfyui_streamline.tinywan import model as tinywan

    base = tinywan_model.model
    assert isinstance(base, comfy.model_base.WAN21) and type(base.diffusion_model) is WanModel
    assert all(type(block) is WanAttentionBlock for block in base.diffusion_model.blocks)
    assert len(base.diffusion_model.blocks) == tinywan.WAN_CONFIG["num_layers"]
    assert isinstance(base.model_sampling, comfy.model_sampling.CONST)
    assert base.model_sampling.shift == pytest.approx(tinywan.SHIFT)
    assert family_of(base.diffusion_model) == WAN
    metadata = tinywan.read_metadata(tinywan.WEIGHTS_PATH)
    assert metadata["format"] == tinywan.FORMAT and metadata["stages"], "the file records how it was trained"


def test_a_tinyvideo_file_is_refused_with_a_clear_error():
    from comfyui_streamline.tinyvideo import model as tinyvideo
    from comfyui_streamline.tinywan import model as tinywan

    with pytest.raises(tinywan.TinyWanError, match="tinyvideo-v1 file, not TinyWan|not a TinyWan checkpoint"):
        tinywan.load_model_patcher(tinyvideo.WEIGHTS_PATH)


def test_wans_own_empty_latent_node_feeds_it_and_the_decoder_reads_wans_layout(tinywan_model):
    """EmptyHunyuanLatentVideo (the empty latent Wan workflows use) gives 16 channels; ComfyUI's sampler
    fits an empty latent to the model's 4, and TinyVideo Decode reads (videos, 4, frames, h, w)."""
    import nodes
    from comfy_extras.nodes_hunyuan import EmptyHunyuanLatentVideo

    from comfyui_streamline.nodes.tinyvideo import TinyVideoDecode, TinyVideoPrompt

    (latent,) = EmptyHunyuanLatentVideo().generate(width=8 * SIZE, height=8 * SIZE, length=4 * (FRAMES - 1) + 1)
    assert latent["samples"].shape == (1, 16, FRAMES, SIZE, SIZE)
    positive = TinyVideoPrompt.execute(tinywan_model, PROMPTS[0]).result[0]
    negative = TinyVideoPrompt.execute(tinywan_model, "").result[0]
    (out,) = nodes.common_ksampler(tinywan_model, 0, 2, CFG, "euler", "simple", positive, negative, latent)
    assert out["samples"].shape == (1, 4, FRAMES, SIZE, SIZE)
    frames = TinyVideoDecode.execute(out, 2).result[0]
    assert frames.shape == (FRAMES, 2 * SIZE, 2 * SIZE, 3)
    with pytest.raises(ValueError, match="a TinyWan latent \\(videos, 4, frames, h, w\\)"):
        TinyVideoDecode.execute({"samples": torch.zeros(1, 16, FRAMES, SIZE, SIZE)}, 1)


def test_shipped_weights_generate_clips_that_look_like_the_data(tinywan_model):
    """A small model is not perfect (tinywan/card/report.md), so the test asks for 3 clips out of 4, each
    with a different colour, shape and motion."""
    problems = {prompt: _clip_problems(_sample(tinywan_model, prompt), prompt) for prompt in PROMPTS}
    passed = [prompt for prompt, found in problems.items() if not found]
    assert len(passed) >= 3, problems


def test_the_untrained_model_fails_the_same_check(untrained_model):
    assert _clip_problems(_sample(untrained_model, PROMPTS[0]), PROMPTS[0]) != []


def test_shipped_weights_denoise_far_better_than_the_untrained_model(tinywan_model, untrained_model):
    from comfyui_streamline.tinywan import model as tinywan

    batch = data.sample_batch(6, FRAMES, SIZE, torch.Generator().manual_seed(99))  # held out: training used seed 1
    sigmas = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    trained = tinywan.denoising_loss(tinywan_model, batch.videos, batch.words, sigmas)
    untrained = tinywan.denoising_loss(untrained_model, batch.videos, batch.words, sigmas)
    assert trained < 0.3 * untrained, (trained, untrained)


def test_streamline_model_patch_and_memory_budget_are_exact_on_tinywan(tinywan_model, caplog):
    """Both nodes, unchanged in the graph, slice TinyWan's blocks over tokens (512 tokens a clip here; slices
    that do not divide them) and sample the same clip as ComfyUI, through KSampler with CFG."""
    import logging

    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.nodes.memory_budget import MemoryBudget
    from comfyui_streamline.techniques.slicing import apply_streamline

    plain = _sample(tinywan_model, PROMPTS[1], steps=4, seed=5)
    sliced_model = apply_streamline(tinywan_model, SliceConfig(token_chunk=100))
    budget_model, plan_text = MemoryBudget.execute(tinywan_model, 0.004, 8 * SIZE, 8 * SIZE, 4 * (FRAMES - 1) + 1).result
    assert "token" in plan_text, plan_text
    caplog.set_level(logging.INFO, logger="ComfyUI-Streamline")
    for model in (sliced_model, budget_model):
        caplog.clear()
        out = _sample(model, PROMPTS[1], steps=4, seed=5)
        assert (out - plain).abs().max() <= 1e-5 * plain.abs().max()
        reports = [r.getMessage() for r in caplog.records if ", this run" in r.getMessage()]
        assert len(reports) == 1 and "token" in reports[0], reports  # the run says what ran
    assert "100 of 512 tokens" in reports[0] or "of 512 tokens" in reports[0], reports


def test_step_rehash_on_tinywan_stays_close_to_full_sampling(tinywan_model):
    """Step Rehash computes only its schedule's full steps in full; the clip is still the asked one and close
    to full sampling, and extrapolated reuse is closer than holding at the same calls."""
    from comfyui_streamline.core.fidelity import psnr
    from comfyui_streamline.core.rehash import RehashConfig, fixed_full_steps
    from comfyui_streamline.host.options import REHASH_KEY as STATE_KEY
    from comfyui_streamline.techniques.rehash import apply_rehash

    full = _sample(tinywan_model, PROMPTS[1], steps=25, seed=5)
    scores = {}
    for reuse in ("hold", "extrapolate"):
        model = apply_rehash(tinywan_model, RehashConfig(mode="fixed", interval=2, warmup=2, tail=1, reuse=reuse))
        rehashed = _sample(model, PROMPTS[1], steps=25, seed=5)
        report = model.model_options["transformer_options"][STATE_KEY].last.report
        assert report.full == len(fixed_full_steps(25, 2, 2, 1)) and report.rehashed == 25 - report.full
        assert not torch.equal(rehashed, full)
        scores[reuse] = psnr(rehashed, full)
        if reuse == "extrapolate":
            assert _clip_problems(rehashed, PROMPTS[1]) == _clip_problems(full, PROMPTS[1]) == []
    # tools/bench_rehash.py --model tinywan, 4 prompts: 50.8 dB extrapolated, 39.5 dB held at these steps
    assert scores["extrapolate"] > 35 and scores["extrapolate"] > scores["hold"] + 3, scores
