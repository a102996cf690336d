"""Find the ComfyUI host (with AnimateDiff-Evolved) and load this pack as a package, for tests and tools.

Standalone on purpose (no relative imports): tests/conftest.py and tools/bench.py load it by path
before the pack itself is importable.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_streamline"
ADE_DIR_NAME = "ComfyUI-AnimateDiff-Evolved"


def load_pack():
    """Import the repository as the package `comfyui_streamline` (its folder name may not be importable)."""
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]


def find_comfy_root(explicit: str | None = None) -> Path | None:
    """$COMFYUI_PATH (or `explicit`), then the usual layout (this pack in ComfyUI/custom_nodes), then ~/comfy/ComfyUI."""
    candidates = []
    if explicit or os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(explicit or os.environ["COMFYUI_PATH"]).expanduser())
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


def host_problem(comfy_root: Path | None, ade_root: Path | None) -> str | None:
    if comfy_root is None:
        return "no ComfyUI host found ($COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)"
    if ade_root is None:
        return f"ComfyUI host at {comfy_root} has no custom_nodes/{ADE_DIR_NAME}"
    return None


def enter_host(comfy_root: Path, ade_root: Path, cpu: bool) -> None:
    """Make `comfy` and ADE's `animatediff` importable, the way ComfyUI's main.py would."""
    # `comfy` parses the command line at import: keep the caller's arguments away from it.
    sys.argv = sys.argv[:1]
    for path in (str(comfy_root), str(ade_root)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu


def enter_for_tool(explicit: str | None, cpu: bool, tool: str) -> None:
    """For scripts: find the host (or exit with the reason), enter it, load the pack."""
    comfy_root = find_comfy_root(explicit)
    ade_root = find_ade_root(comfy_root) if comfy_root else None
    problem = host_problem(comfy_root, ade_root)
    if problem:
        raise SystemExit(f"{tool}: {problem}")
    enter_host(comfy_root, ade_root, cpu=cpu)
    load_pack()
