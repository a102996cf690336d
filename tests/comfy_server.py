"""A real ComfyUI server for the end-to-end tests (test_server_e2e.py, test_browser.py).

Everything the server touches lives in a temporary base directory: random-weight SD1.5 checkpoint and
mm_sd_v15_v2 motion model files in its models folders (under the names a test asks for), this pack and
the host's ADE linked into its custom_nodes.
"""
from __future__ import annotations

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

from conftest import ADE_ROOT, COMFY_ROOT

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 240
RUN_TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_sd15_files(folder: Path) -> tuple[Path, Path]:
    """A random-weight SD1.5 checkpoint and mm_sd_v15_v2 motion model written into `folder` (the server tests'
    fixture sd15_server_files writes them once a run)."""
    from safetensors.torch import save_file

    from comfyui_streamline.testing.synthetic import mm_sd15_v2_state_dict, sd15_checkpoint_state_dict

    checkpoint, motion_model = folder / "sd15.safetensors", folder / "mm_sd_v15_v2.safetensors"
    save_file(sd15_checkpoint_state_dict(seed=0), str(checkpoint))
    save_file(mm_sd15_v2_state_dict(pe_len=32, seed=1, pooled=True), str(motion_model))
    return checkpoint, motion_model


def make_base_directory(base: Path, checkpoint: str, motion_model: str, files: tuple[Path, Path]) -> Path:
    """A ComfyUI base directory with the random-weight SD1.5 and mm_sd_v15_v2 `files` (write_sd15_files) under
    these names (hard links), and this pack and ADE in its custom_nodes."""
    for folder in ("models/checkpoints", "models/animatediff_models", "custom_nodes"):
        (base / folder).mkdir(parents=True)
    os.link(files[0], base / "models/checkpoints" / checkpoint)
    os.link(files[1], base / "models/animatediff_models" / motion_model)
    (base / "custom_nodes" / "ComfyUI-Streamline").symlink_to(REPO_ROOT, target_is_directory=True)
    (base / "custom_nodes" / ADE_ROOT.name).symlink_to(ADE_ROOT, target_is_directory=True)
    return base


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


def running_server(base: Path):
    """A generator for a pytest fixture: the started server, stopped at the end."""
    server = Server(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()
