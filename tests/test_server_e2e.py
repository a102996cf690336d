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
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from conftest import ADE_ROOT, COMFY_ROOT

pytestmark = [pytest.mark.host, pytest.mark.server]

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = REPO_ROOT / "workflows" / "streamline_animatediff_api.json"
TINYVIDEO_WORKFLOW = REPO_ROOT / "workflows" / "tinyvideo_streamline_api.json"
CKPT = "streamline-random-sd15.safetensors"
MOTION = "streamline-random-mm_sd_v15_v2.safetensors"
START_TIMEOUT = 240
RUN_TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path):
        self.base, self.port = base, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.process = None

    def start(self) -> None:
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:"],
            cwd=COMFY_ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if getattr(self, "log", None):
            self.log.close()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def run(self, prompt: dict) -> dict:
        body = json.dumps({"prompt": prompt, "client_id": str(uuid.uuid4())}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                prompt_id = json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            pytest.fail(f"POST /prompt refused the workflow: {e.read().decode()}")
        deadline = time.time() + RUN_TIMEOUT
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{self.log_tail()}"
                return entry
            time.sleep(1)
        pytest.fail(f"the workflow did not finish within {RUN_TIMEOUT} s:\n{self.log_tail()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from safetensors.torch import save_file

    from comfyui_streamline.tools.synthetic import mm_sd15_v2_state_dict, sd15_checkpoint_state_dict

    base = tmp_path_factory.mktemp("comfy-base")
    for folder in ("models/checkpoints", "models/animatediff_models", "custom_nodes"):
        (base / folder).mkdir(parents=True)
    save_file(sd15_checkpoint_state_dict(seed=0), str(base / "models/checkpoints" / CKPT))
    save_file(mm_sd15_v2_state_dict(pe_len=32, seed=1), str(base / "models/animatediff_models" / MOTION))
    (base / "custom_nodes" / "ComfyUI-Streamline").symlink_to(REPO_ROOT, target_is_directory=True)
    (base / "custom_nodes" / ADE_ROOT.name).symlink_to(ADE_ROOT, target_is_directory=True)
    running = Server(base)
    try:
        running.start()
        yield running
    finally:
        running.stop()


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
    """The Step Rehash Sampler node in place of KSampler: it samples and reports the full steps on the node."""
    prompt = sized_prompt(json.loads(WORKFLOW.read_text()), patched=True)
    sampler = prompt["7"]
    sampler["class_type"] = "StreamlineStepRehashSampler"
    sampler["inputs"].update(rehash_mode="fixed", interval=2, warmup_steps=1, tail_steps=0, threshold=0.15,
                             full_steps=2, cache_block=-1, start_percent=0.0, end_percent=1.0, steps=4)
    entry = server.run(prompt)
    report = entry["outputs"]["7"]["text"][0]
    assert "steps computed in full" in report, report


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


def sized_prompt(workflow: dict, patched: bool) -> dict:
    prompt = copy.deepcopy(workflow)
    prompt["1"]["inputs"]["ckpt_name"] = CKPT
    prompt["2"]["inputs"]["model_name"] = MOTION
    prompt["6"]["inputs"].update(width=64, height=64, batch_size=4)
    prompt["7"]["inputs"].update(steps=2, seed=7)
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
