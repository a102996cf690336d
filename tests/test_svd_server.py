"""End to end: a real ComfyUI server (`main.py --cpu`) runs the shipped SVD img2vid API workflow
(ImageOnlyCheckpointLoader -> VideoLinearCFGGuidance -> Streamline Model Patch -> KSampler, LoadImage ->
SVD_img2vid_Conditioning, VAEDecode, SaveAnimatedWEBP) through POST /prompt, with Streamline Model Patch
in the graph and without it.

The checkpoint is a complete single-file SVD checkpoint with random weights (testing/synthetic.py,
write_svd_checkpoint: SVD's UNet layout at 320 channels on every level, the CLIP ViT-H image encoder,
SVD's video VAE; 1.9 GB in fp16), built once per test session. The workflow is the shipped one with
test-sized settings (a 64x64 image, 4 frames, 3 steps) and small chunks so that slicing really happens;
a SaveLatent node is added to compare the latents.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from comfy_server import REPO_ROOT, running_server
from conftest import ADE_ROOT

from comfyui_streamline.testing.matrix import full_matrix_only

# A second server with a 1.9 GB checkpoint: full matrix only. Faster tests check each part of it: SVD sliced and exact
# through ComfyUI's KSampler path (tests/test_svd_exact.py), the shipped graph against the host's node definitions
# (tests/test_workflows.py) and in the real frontend (tests/test_browser.py).
pytestmark = [pytest.mark.host, pytest.mark.server,
              full_matrix_only("test_svd_exact.py (KSampler), test_workflows.py and test_browser.py (the graph)")]

WORKFLOW = REPO_ROOT / "workflows" / "api" / "svd_img2vid_streamline_api.json"
CKPT = "streamline-random-svd.safetensors"
IMAGE = "streamline-svd-test.png"
FRAMES, SIZE = 4, 64  # the latent: (FRAMES, 4, SIZE / 8, SIZE / 8)


@pytest.fixture(scope="session")
def svd_checkpoint(tmp_path_factory) -> Path:
    """The random-weight SVD checkpoint, built once per test session (and removed after it: pytest keeps
    the temporary directories of its last runs, and the file is 1.9 GB)."""
    import subprocess
    import sys

    path = tmp_path_factory.mktemp("svd-checkpoint") / CKPT
    # built in a process of its own: the 3 GB it takes while drawing the weights go back to the system
    # before the server loads the file, and this process does not keep them
    build = ("import sys; tools, out = sys.argv[1:3]; sys.path.insert(0, tools); import hostenv; "
             "hostenv.enter_for_tool(None, cpu=True, tool='svd checkpoint'); "
             "from comfyui_streamline.testing.synthetic import write_svd_checkpoint; "
             "write_svd_checkpoint(out, seed=0)")
    subprocess.run([sys.executable, "-c", build, str(REPO_ROOT / "tools"), str(path)], check=True, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def server(tmp_path_factory, svd_checkpoint):
    yield from running_server(svd_base_directory(tmp_path_factory.mktemp("comfy-base-svd"), svd_checkpoint))


@pytest.fixture(scope="module")
def runs(server) -> dict:
    """The workflow's history entries with Streamline Model Patch and without it (Server.run asserts
    that each succeeded), and the server's log of both runs."""
    patched = server.run(sized_prompt(json.loads(WORKFLOW.read_text()), patched=True))
    plain = server.run(sized_prompt(json.loads(WORKFLOW.read_text()), patched=False))
    return {"patched": patched, "plain": plain, "log": server.log_path.read_text(errors="replace")}


def test_svd_workflow_with_streamline_matches_workflow_without(server, runs):
    log = runs["log"]
    # the checkpoint is complete: ComfyUI found every CLIP vision and VAE weight in it
    assert "missing clip vision" not in log and "Missing VAE keys" not in log, log
    pack_errors = [line for line in log.splitlines() if "Streamline" in line and ("Cannot import" in line or "IMPORT FAILED" in line)]
    assert not pack_errors, pack_errors
    out, ref = (load_latent(server.base, runs[name]) for name in ("patched", "plain"))
    assert out.shape == ref.shape == (FRAMES, 4, SIZE // 8, SIZE // 8)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"\nSVD server e2e: max|patched - plain| / max|plain| = {rel:.2e}")
    assert rel <= 1e-5
    for name in ("patched", "plain"):  # the animated WEBP was written
        (webp,) = runs[name]["outputs"]["8"]["images"]
        path = server.base / "output" / webp["subfolder"] / webp["filename"]
        assert path.suffix == ".webp" and path.stat().st_size > 0, path


def test_streamline_slices_svd_instead_of_running_it_unchanged(runs):
    reason = svd_unsupported_reason()
    if reason is not None:
        pytest.skip(f"families/registry.py's unsupported_reason still rejects SVD ({reason}): the pack runs it "
                    "unchanged, as its log says")
    lines = runs["log"].splitlines()
    unchanged = [line for line in lines if "running it unchanged" in line]
    assert not unchanged, unchanged
    # the patched run's report: the UNet calls of its one shape (cond and uncond of every frame, the
    # latent and the image's latent side by side) ran sliced
    # ComfyUI 0.33's log prefixes each record with its level ("[INFO] ", coloured); 0.3.64's does not
    report = next(i for i, line in enumerate(lines) if line.endswith("Streamline Model Patch, this run:"))
    assert lines[report + 1].startswith(f"- {2 * FRAMES}x8x{SIZE // 8}x{SIZE // 8} "), lines[report:report + 3]


def svd_unsupported_reason() -> str | None:
    """What the pack says of SVD's UNet (the checkpoint's layout; weights not initialised)."""
    from comfyui_streamline.families.registry import unsupported_reason
    from comfyui_streamline.testing.model_families import svd_reduced

    return unsupported_reason(svd_reduced())


def svd_base_directory(base: Path, checkpoint: Path) -> Path:
    """A ComfyUI base directory with the SVD checkpoint (linked), a 64x64 input image, and this pack and
    ADE in its custom_nodes (as comfy_server.make_base_directory has them)."""
    from PIL import Image

    for folder in ("models/checkpoints", "input", "custom_nodes"):
        (base / folder).mkdir(parents=True)
    (base / "models/checkpoints" / CKPT).symlink_to(checkpoint)
    ramp = torch.linspace(0, 255, SIZE).to(torch.uint8)
    rgb = torch.stack([ramp[None, :].expand(SIZE, SIZE), ramp[:, None].expand(SIZE, SIZE),
                       ramp.flip(0)[None, :].expand(SIZE, SIZE)], dim=-1)  # (h, w, 3): colour ramps
    Image.fromarray(rgb.contiguous().numpy()).save(base / "input" / IMAGE)
    (base / "custom_nodes" / "ComfyUI-Streamline").symlink_to(REPO_ROOT, target_is_directory=True)
    (base / "custom_nodes" / ADE_ROOT.name).symlink_to(ADE_ROOT, target_is_directory=True)
    return base


def sized_prompt(workflow: dict, patched: bool) -> dict:
    prompt = copy.deepcopy(workflow)
    name = f"e2e-svd/{'patched' if patched else 'plain'}"
    prompt["1"]["inputs"]["ckpt_name"] = CKPT
    prompt["2"]["inputs"]["image"] = IMAGE
    prompt["3"]["inputs"].update(width=SIZE, height=SIZE, video_frames=FRAMES)
    prompt["5"]["inputs"].update(frame_chunk=2, spatial_chunk=16, scale_with_level=False)
    prompt["6"]["inputs"].update(steps=3, seed=7)
    prompt["8"]["inputs"]["filename_prefix"] = name
    if not patched:
        prompt["6"]["inputs"]["model"] = ["4", 0]
        del prompt["5"]
    prompt["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": name}}
    return prompt


def load_latent(base: Path, entry: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    saved = entry["outputs"]["9"]["latents"][0]
    return load_file(str(base / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"].float()
