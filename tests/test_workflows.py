"""The shipped workflows: the UI graph and its API twin describe the same pipeline.

(That every node and input exists on a real server is checked in test_server_e2e.py.)
"""
import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
UI = json.loads((WORKFLOWS / "streamline_animatediff.json").read_text())
API = json.loads((WORKFLOWS / "streamline_animatediff_api.json").read_text())


def test_same_nodes():
    assert {n["id"]: n["type"] for n in UI["nodes"]} == {int(k): v["class_type"] for k, v in API.items()}


def test_same_links():
    ui_nodes = {n["id"]: n for n in UI["nodes"]}
    ui_links = set()
    for link_id, source, source_slot, target, target_slot, _ in UI["links"]:
        name = ui_nodes[target]["inputs"][target_slot]["name"]
        assert ui_nodes[target]["inputs"][target_slot]["link"] == link_id
        assert link_id in ui_nodes[source]["outputs"][source_slot]["links"]
        ui_links.add((target, name, source, source_slot))
    api_links = {(int(k), name, int(v[0]), v[1]) for k, node in API.items()
                 for name, v in node["inputs"].items() if isinstance(v, list)}
    assert ui_links == api_links


def test_same_widget_values():
    for node in UI["nodes"]:
        api_values = [v for v in API[str(node["id"])]["inputs"].values() if not isinstance(v, list)]
        ui_values = [v for v in node["widgets_values"] if v not in ("fixed", "randomize")]
        assert sorted(map(str, ui_values)) == sorted(map(str, api_values)), node["type"]


def test_pipeline_order():
    """checkpoint -> AnimateDiff -> Streamline Model Patch -> KSampler -> VAE decode -> save."""
    chain, node = [], "9"
    while True:
        chain.append(API[node]["class_type"])
        upstream = [v for k, v in API[node]["inputs"].items() if isinstance(v, list) and k in ("images", "samples", "model")]
        if not upstream:
            break
        node = upstream[0][0]
    assert chain == ["SaveAnimatedWEBP", "VAEDecode", "KSampler", "StreamlineModelPatch", "ADE_AnimateDiffLoaderGen1",
                     "CheckpointLoaderSimple"]
