"""The shipped workflows: each UI graph and its API twin describe the same pipeline.

(That every node and input exists on a real server, and that the graphs run, is checked in
test_server_e2e.py.)
"""
import json
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
PAIRS = {name: (json.loads((WORKFLOWS / f"{name}.json").read_text()),
                json.loads((WORKFLOWS / f"{name}_api.json").read_text()))
         for name in ("streamline_animatediff", "tinyvideo_streamline")}


def test_every_workflow_has_its_api_twin():
    ui_files = {p.stem for p in WORKFLOWS.glob("*.json") if not p.stem.endswith("_api")}
    api_files = {p.stem[:-4] for p in WORKFLOWS.glob("*_api.json")}
    assert ui_files == api_files == set(PAIRS)


@pytest.mark.parametrize("name", PAIRS)
def test_same_nodes(name):
    ui, api = PAIRS[name]
    assert {n["id"]: n["type"] for n in ui["nodes"]} == {int(k): v["class_type"] for k, v in api.items()}


@pytest.mark.parametrize("name", PAIRS)
def test_same_links(name):
    ui, api = PAIRS[name]
    ui_nodes = {n["id"]: n for n in ui["nodes"]}
    ui_links = set()
    for link_id, source, source_slot, target, target_slot, _ in ui["links"]:
        input_name = ui_nodes[target]["inputs"][target_slot]["name"]
        assert ui_nodes[target]["inputs"][target_slot]["link"] == link_id
        assert link_id in ui_nodes[source]["outputs"][source_slot]["links"]
        ui_links.add((target, input_name, source, source_slot))
    api_links = {(int(k), input_name, int(v[0]), v[1]) for k, node in api.items()
                 for input_name, v in node["inputs"].items() if isinstance(v, list)}
    assert ui_links == api_links


@pytest.mark.parametrize("name", PAIRS)
def test_same_widget_values(name):
    ui, api = PAIRS[name]
    for node in ui["nodes"]:
        api_values = [v for v in api[str(node["id"])]["inputs"].values() if not isinstance(v, list)]
        ui_values = [v for v in node["widgets_values"] if v not in ("fixed", "randomize")]
        assert sorted(map(str, ui_values)) == sorted(map(str, api_values)), node["type"]


def model_chain(api: dict, last: str) -> list[str]:
    chain, node = [], last
    while True:
        chain.append(api[node]["class_type"])
        upstream = [v for k, v in api[node]["inputs"].items() if isinstance(v, list) and k in ("images", "samples", "model")]
        if not upstream:
            return chain
        node = upstream[0][0]


def test_animatediff_pipeline_order():
    """checkpoint -> AnimateDiff -> Streamline Model Patch -> KSampler -> VAE decode -> save."""
    assert model_chain(PAIRS["streamline_animatediff"][1], "9") == [
        "SaveAnimatedWEBP", "VAEDecode", "KSampler", "StreamlineModelPatch", "ADE_AnimateDiffLoaderGen1",
        "CheckpointLoaderSimple"]


def test_tinyvideo_pipeline_order():
    """Load TinyVideo -> Streamline Model Patch -> KSampler -> TinyVideo Decode -> save; prompts from the same model."""
    api = PAIRS["tinyvideo_streamline"][1]
    assert model_chain(api, "8") == ["SaveAnimatedWEBP", "StreamlineTinyVideoDecode", "KSampler",
                                     "StreamlineModelPatch", "StreamlineTinyVideoLoader"]
    for node in api.values():
        if node["class_type"] == "StreamlineTinyVideoPrompt":
            assert node["inputs"]["model"] == ["1", 0]
