"""Test setup: load this pack under a fixed package name and find a ComfyUI host.

The host is looked up, in order, through $COMFYUI_PATH, the usual layout (this pack inside
`ComfyUI/custom_nodes/`), and `~/comfy/ComfyUI`. Without one, every host test is skipped and the
session summary says so in capitals, so a green run without the host cannot pass unnoticed.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_streamline"
ADE_DIR_NAME = "ComfyUI-AnimateDiff-Evolved"


def _load_pack() -> None:
    if PACK_NAME in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)


def find_comfy_root() -> Path | None:
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    if REPO_ROOT.parent.name == "custom_nodes":
        candidates.append(REPO_ROOT.parent.parent)
    candidates.append(Path.home() / "comfy" / "ComfyUI")
    for root in candidates:
        if (root / "comfy" / "model_patcher.py").is_file() and (root / "main.py").is_file():
            return root.resolve()
    return None


def find_ade_root(comfy_root: Path) -> Path | None:
    ade = comfy_root / "custom_nodes" / ADE_DIR_NAME
    return ade if (ade / "animatediff" / "motion_module_ad.py").is_file() else None


_load_pack()
COMFY_ROOT = find_comfy_root()
ADE_ROOT = find_ade_root(COMFY_ROOT) if COMFY_ROOT else None
HOST_MISSING_REASON = None
if COMFY_ROOT is None:
    HOST_MISSING_REASON = "no ComfyUI host found ($COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)"
elif ADE_ROOT is None:
    HOST_MISSING_REASON = f"ComfyUI host at {COMFY_ROOT} has no custom_nodes/{ADE_DIR_NAME}"
else:
    # `comfy` reads its command line at import: keep pytest's arguments away from it.
    sys.argv = sys.argv[:1]
    for path in (str(COMFY_ROOT), str(ADE_ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import comfy.cli_args  # noqa: E402

    comfy.cli_args.args.cpu = True

_host_skipped: list[str] = []


def pytest_collection_modifyitems(config, items):
    if HOST_MISSING_REASON is None:
        return
    skip = pytest.mark.skip(reason=f"HOST TEST SKIPPED: {HOST_MISSING_REASON}")
    for item in items:
        if "host" in item.keywords:
            item.add_marker(skip)
            _host_skipped.append(item.nodeid)


def pytest_configure(config):
    config.addinivalue_line("markers", "host: needs a ComfyUI + AnimateDiff-Evolved host tree")
    config.addinivalue_line("markers", "server: starts a real ComfyUI server")


def pytest_terminal_summary(terminalreporter):
    if _host_skipped:
        terminalreporter.write_sep("!", f"{len(_host_skipped)} HOST TESTS SKIPPED: {HOST_MISSING_REASON}", red=True)
    else:
        terminalreporter.write_line(f"ComfyUI host: {COMFY_ROOT} (AnimateDiff-Evolved: {ADE_ROOT})")
