"""What ComfyUI-Manager and the Comfy Registry read: pyproject's [project] and [tool.comfy] tables, the
license file it names, the icon it links to (a file of this repository), and no dependencies to install
(the pack uses ComfyUI's own torch)."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO_ROOT = Path(__file__).resolve().parents[1]
RAW_MAIN = "https://raw.githubusercontent.com/comfyui-streamline/ComfyUI-Streamline/main/"


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_the_registry_metadata_is_complete():
    project, comfy = pyproject()["project"], pyproject()["tool"]["comfy"]
    assert project["name"] == "comfyui-streamline" and project["version"] and project["description"]
    assert project["urls"]["Repository"].startswith("https://github.com/")
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert comfy[key], key


def test_the_license_file_is_the_declared_mit_license():
    assert pyproject()["project"]["license"] == {"file": "LICENSE"}
    text = (REPO_ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


def test_the_icon_is_a_square_image_in_this_repository():
    icon = pyproject()["tool"]["comfy"]["Icon"]
    assert icon.startswith(RAW_MAIN), icon
    with Image.open(REPO_ROOT / icon.removeprefix(RAW_MAIN)) as image:
        assert image.size[0] == image.size[1] <= 400


def test_nothing_to_install_besides_comfyui():
    assert pyproject()["project"]["dependencies"] == []
    lines = [line.split("#")[0].strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line] == []
