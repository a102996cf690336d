"""End to end: a real ComfyUI server (`main.py --cpu`) with AnimateDiff-Evolved and this pack runs the
shipped API workflow through POST /prompt, with Streamline Model Patch in the graph and without it.

Everything the server touches lives in a temporary base directory: random-weight SD1.5 checkpoint and
mm_sd_v15_v2 motion model files in its models folders, this pack and the host's ADE linked into its
custom_nodes. The workflow is the shipped one with test-sized settings (64x64, 4 frames, 2 steps) and
small chunks so that slicing really happens; a SaveLatent node is added to compare the latents.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from comfy_server import make_base_directory, running_server

pytestmark = [pytest.mark.host, pytest.mark.server]

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = REPO_ROOT / "workflows" / "api" / "streamline_animatediff_api.json"
TINYVIDEO_WORKFLOW = REPO_ROOT / "workflows" / "api" / "tinyvideo_streamline_api.json"
TINYWAN_WORKFLOW = REPO_ROOT / "workflows" / "api" / "tinywan_rehash_api.json"
CKPT = "streamline-random-sd15.safetensors"
MOTION = "streamline-random-mm_sd_v15_v2.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd15_server_files):
    yield from running_server(make_base_directory(tmp_path_factory.mktemp("comfy-base"), CKPT, MOTION,
                                                  sd15_server_files))


def test_shipped_workflow_only_uses_inputs_the_server_knows(server):
    """Every node of the shipped API workflow exists on a server with ADE and this pack, with those inputs."""
    workflow = json.loads(WORKFLOW.read_text())
    info = server.get("/object_info")
    for node_id, node in workflow.items():
        assert node["class_type"] in info, f"node {node_id}: {node['class_type']} is not installed"
        known = info[node["class_type"]]["input"]
        names = {**known.get("required", {}), **known.get("optional", {})}
        assert set(node["inputs"]) <= set(names), (node["class_type"], set(node["inputs"]) - set(names))
    streamline = info["StreamlineModelPatch"]["input"]
    assert {"frame_chunk", "spatial_chunk"} <= set(streamline["required"])
    assert "tooltip" in streamline["required"]["frame_chunk"][1]
    assert "StreamlineStepRehashSampler" in info and "StreamlineStepRehash" in info
    for name in ("StreamlineTinyVideoLoader", "StreamlineTinyVideoPrompt", "StreamlineTinyVideoDecode"):
        assert name in info


def test_step_rehash_sampler_runs_through_the_api(server):
    """The Step Rehash Sampler node in place of KSampler (TinyVideo's graph, small: the node's API path is the
    same for every model): it samples and reports the full steps on the node."""
    prompt = json.loads(TINYVIDEO_WORKFLOW.read_text())
    prompt["5"]["inputs"].update(width=128, height=128, batch_size=8)
    sampler = prompt["6"]
    sampler["class_type"] = "StreamlineStepRehashSampler"
    sampler["inputs"].update(rehash_mode="fixed", interval=2, warmup_steps=1, tail_steps=0, threshold=0.15,
                             full_steps=2, cache_block=-1, start_percent=0.0, end_percent=1.0, steps=4)
    entry = server.run(prompt)
    report = entry["outputs"]["6"]["text"][0]
    assert "/4 steps computed in full" in report, report


def test_workflow_with_streamline_matches_workflow_without(server):
    patched = server.run(sized_prompt(json.loads(WORKFLOW.read_text()), patched=True))
    plain = server.run(sized_prompt(json.loads(WORKFLOW.read_text()), patched=False))
    log = server.log_tail(400)
    assert "running it unchanged" not in log, log
    pack_errors = [line for line in log.splitlines() if "Streamline" in line and ("Cannot import" in line or "IMPORT FAILED" in line)]
    assert not pack_errors, pack_errors
    out, ref = (load_latent(server.base, entry) for entry in (patched, plain))
    assert out.shape == ref.shape == (4, 4, 8, 8)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"\nserver e2e: max|patched - plain| / max|plain| = {rel:.2e}")
    assert rel <= 1e-4
    assert len(patched["outputs"]["9"]["images"]) == 1  # the animated WEBP was written


def test_tinyvideo_workflow_runs_as_shipped_and_makes_a_clip_of_the_prompt(server):
    """The TinyVideo workflow needs no downloaded weights: it runs as shipped and the clip shows the prompt."""
    from comfyui_streamline.tinyvideo import stats

    prompt = json.loads(TINYVIDEO_WORKFLOW.read_text())
    prompt["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "e2e/tinyvideo"}}
    entry = server.run(prompt)
    assert len(entry["outputs"]["8"]["images"]) == 1  # the animated WEBP
    latent = load_latent(server.base, entry, node="9")
    frames = prompt["5"]["inputs"]["batch_size"]
    assert latent.shape == (frames, 4, 32, 32)
    rgb = ((latent[:, :3] + 1) / 2).clamp(0, 1)
    colour = prompt["3"]["inputs"]["text"].split()[0]
    assert stats.frame_problems(stats.clip_stats(rgb), stats.data_ranges(frames, 32), colour) == []


def test_tinywan_workflow_runs_as_shipped_and_slicing_changes_nothing(server):
    """The TinyWan workflow (Memory Budget + Step Rehash Sampler) needs no downloaded weights: it runs as
    shipped, its Wan latent is one video of 8 frames (EmptyHunyuanLatentVideo's length 29) that shows the
    prompt, and the same graph without Memory Budget gives the same latent (its slicing is exact)."""
    from comfyui_streamline.tinyvideo import stats

    prompt = json.loads(TINYWAN_WORKFLOW.read_text())
    prompt["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "e2e/tinywan"}}
    entry = server.run(prompt)
    assert len(entry["outputs"]["8"]["images"]) == 1  # the animated WEBP
    latent = load_latent(server.base, entry, node="9")
    assert latent.shape == (1, 4, 8, 32, 32)
    frames = latent[0].movedim(1, 0)  # (frames, 4, h, w)
    rgb = ((frames[:, :3] + 1) / 2).clamp(0, 1)
    colour = prompt["3"]["inputs"]["text"].split()[0]
    assert stats.frame_problems(stats.clip_stats(rgb), stats.data_ranges(8, 32), colour) == []

    unsliced = copy.deepcopy(prompt)
    del unsliced["2"]
    unsliced["6"]["inputs"]["model"] = ["1", 0]
    unsliced["9"]["inputs"]["filename_prefix"] = "e2e/tinywan-unsliced"
    reference = load_latent(server.base, server.run(unsliced), node="9")
    assert (latent - reference).abs().max() <= 1e-5 * reference.abs().max()


def sized_prompt(workflow: dict, patched: bool) -> dict:
    prompt = copy.deepcopy(workflow)
    prompt["1"]["inputs"]["ckpt_name"] = CKPT
    prompt["2"]["inputs"]["model_name"] = MOTION
    prompt["6"]["inputs"].update(width=64, height=64, batch_size=4)
    prompt["7"]["inputs"].update(steps=1, seed=7)  # one step: the API path is what this checks
    prompt["3"]["inputs"].update(frame_chunk=3, spatial_chunk=16, scale_with_level=False)
    prompt["9"]["inputs"]["filename_prefix"] = f"e2e/{'patched' if patched else 'plain'}"
    if not patched:
        prompt["7"]["inputs"]["model"] = ["2", 0]
        del prompt["3"]
    prompt["10"] = {"class_type": "SaveLatent",
                    "inputs": {"samples": ["7", 0], "filename_prefix": f"e2e/{'patched' if patched else 'plain'}"}}
    return prompt




def load_latent(base: Path, entry: dict, node: str = "10") -> torch.Tensor:
    from safetensors.torch import load_file

    saved = entry["outputs"][node]["latents"][0]
    path = base / "output" / saved["subfolder"] / saved["filename"]
    return load_file(str(path))["latent_tensor"].float()
