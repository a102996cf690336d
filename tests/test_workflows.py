"""The shipped workflows: each UI graph and its API twin describe the same pipeline, and every model a
newcomer must download is named with its URL where ComfyUI's frontend looks for it.

(That every node and input exists on a real server, that the frontend loads each UI graph without
missing nodes or overlapping nodes and turns it into its API twin, and that the TinyVideo and TinyWan
graphs run, is checked in test_browser.py and test_server_e2e.py.)
"""
import json
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
# ComfyUI lists every workflows/*.json of a custom node (not its subfolders) in the frontend's Templates browser,
# under the pack's name, with the picture `<name>.jpg` beside it (frontend 1.49: mediaSubtype `jpg` for custom
# nodes' templates): the UI graphs and their thumbnails live in workflows/, the API twins in workflows/api/.
API_WORKFLOWS = WORKFLOWS / "api"
THUMBNAIL_SUFFIX = ".jpg"
THUMBNAIL_MAX_BYTES = 60_000
NAMES = ("streamline_animatediff", "tinyvideo_streamline", "tinyvideo_budget_rehash", "svd_img2vid_streamline",
         "tinywan_rehash", "wan21_t2v_streamline")
PAIRS = {name: (json.loads((WORKFLOWS / f"{name}.json").read_text()),
                json.loads((API_WORKFLOWS / f"{name}_api.json").read_text()))
         for name in NAMES}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # virtual nodes: in the UI graph, never in a prompt
SEED_INPUTS = {"seed", "noise_seed"}  # the frontend adds a control_after_generate widget value after these
SEED_CONTROLS = {"fixed", "increment", "decrement", "randomize"}
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
# Where each loader's file goes (ComfyUI's models/ folder), for the files the shipped workflows need.
MODEL_DIRECTORIES = {("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
                     ("ImageOnlyCheckpointLoader", "ckpt_name"): "checkpoints",
                     ("ADE_AnimateDiffLoaderGen1", "model_name"): "animatediff_models",
                     ("UNETLoader", "unet_name"): "diffusion_models",
                     ("CLIPLoader", "clip_name"): "text_encoders",
                     ("VAELoader", "vae_name"): "vae"}


def graph_nodes(ui: dict) -> list[dict]:
    return [n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY]


def widget_inputs(ui_node: dict, api_node: dict) -> dict:
    """The UI node's widget values by input name, in the API node's input order (which follows the node's
    definition), with the frontend's control_after_generate value after a seed checked and dropped."""
    values = list(ui_node["widgets_values"])
    named = {}
    for name, value in api_node["inputs"].items():
        if isinstance(value, list):  # a link
            continue
        assert values, f"{ui_node['type']}: no UI widget value for {name}"
        named[name] = values.pop(0)
        if name in SEED_INPUTS:
            control = values.pop(0) if values else None
            assert control in SEED_CONTROLS, f"{ui_node['type']}: no control_after_generate after {name}"
    assert not values, f"{ui_node['type']}: UI widget values left over: {values}"
    return named


def is_api_format(workflow) -> bool:
    """ComfyUI's API (prompt) format: a dict of node ids to {"class_type": ..., "inputs": ...}."""
    return isinstance(workflow, dict) and bool(workflow) and all(
        isinstance(node, dict) and "class_type" in node for node in workflow.values())


def test_every_workflow_has_its_api_twin():
    ui_files = {p.stem for p in WORKFLOWS.glob("*.json")}
    api_files = {p.stem.removesuffix("_api") for p in API_WORKFLOWS.glob("*.json")}
    assert ui_files == api_files == set(PAIRS)
    assert all(p.name.endswith("_api.json") for p in API_WORKFLOWS.glob("*.json"))


def test_templates_browser_lists_no_api_format_file():
    """workflows/ holds only UI graphs (an API-format file opens an empty canvas from the Templates browser)."""
    for path in WORKFLOWS.glob("*.json"):
        workflow = json.loads(path.read_text())
        assert not is_api_format(workflow), f"{path.name} is API format: move it to workflows/api/"
        assert isinstance(workflow.get("nodes"), list) and workflow["nodes"], path.name
    for path in API_WORKFLOWS.glob("*.json"):
        assert is_api_format(json.loads(path.read_text())), path.name


@pytest.mark.parametrize("name", PAIRS)
def test_every_workflow_has_its_thumbnail(name):
    """The Templates browser shows `workflows/<name>.jpg` as the graph's picture: a real JPEG, small, square (the
    frontend's card is; tools/workflow_thumbnails.py draws them)."""
    from PIL import Image

    path = WORKFLOWS / f"{name}{THUMBNAIL_SUFFIX}"
    assert path.is_file(), f"no thumbnail {path.name} for {name}.json"
    assert 2_000 < path.stat().st_size <= THUMBNAIL_MAX_BYTES, (path.name, path.stat().st_size)
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.mode == "RGB", (path.name, image.format, image.mode)
        width, height = image.size
        assert 256 <= width <= 1024 and height == width, (path.name, image.size)
        assert len(image.convert("L").resize((32, 32)).getcolors(1024)) > 8, f"{path.name} is a blank picture"


def test_workflows_folder_holds_only_the_graphs_and_their_thumbnails():
    expected = {f"{name}{ext}" for name in PAIRS for ext in (".json", THUMBNAIL_SUFFIX)} | {"api"}
    assert {p.name for p in WORKFLOWS.iterdir()} == expected


@pytest.mark.parametrize("name", PAIRS)
def test_same_nodes(name):
    ui, api = PAIRS[name]
    assert {n["id"]: n["type"] for n in graph_nodes(ui)} == {int(k): v["class_type"] for k, v in api.items()}
    assert all(v["_meta"]["title"] == n.get("title", n["type"]) for n in graph_nodes(ui) for v in [api[str(n["id"])]])


@pytest.mark.parametrize("name", PAIRS)
def test_same_links(name):
    ui, api = PAIRS[name]
    ui_nodes = {n["id"]: n for n in ui["nodes"]}
    ui_links = set()
    for link_id, source, source_slot, target, target_slot, link_type in ui["links"]:
        input_name = ui_nodes[target]["inputs"][target_slot]["name"]
        assert ui_nodes[target]["inputs"][target_slot]["link"] == link_id
        assert link_id in ui_nodes[source]["outputs"][source_slot]["links"]
        output, input_ = ui_nodes[source]["outputs"][source_slot], ui_nodes[target]["inputs"][target_slot]
        assert output["type"] == input_["type"] == link_type
        ui_links.add((target, input_name, source, source_slot))
    api_links = {(int(k), input_name, int(v[0]), v[1]) for k, node in api.items()
                 for input_name, v in node["inputs"].items() if isinstance(v, list)}
    assert ui_links == api_links
    assert ui["last_link_id"] >= max(link[0] for link in ui["links"])
    assert ui["last_node_id"] >= max(ui_nodes)


@pytest.mark.parametrize("name", PAIRS)
def test_same_widget_values(name):
    """Each widget value of the UI graph is the API twin's input of that name, in the definition's order."""
    ui, api = PAIRS[name]
    for node in graph_nodes(ui):
        api_node = api[str(node["id"])]
        named = widget_inputs(node, api_node)
        assert named == {k: v for k, v in api_node["inputs"].items() if not isinstance(v, list)}, node["type"]
        assert all(type(value) is type(api_node["inputs"][k]) for k, value in named.items()), node["type"]


@pytest.mark.parametrize("name", PAIRS)
def test_seeds_are_fixed(name):
    """A shipped graph makes the same clip every time (the README's numbers, the tests' checks)."""
    ui, _ = PAIRS[name]
    controls = [v for n in graph_nodes(ui) for v in n["widgets_values"] if v in SEED_CONTROLS]
    assert controls and set(controls) == {"fixed"}


@pytest.mark.parametrize("name", PAIRS)
def test_a_note_says_what_the_graph_shows(name):
    ui, _ = PAIRS[name]
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 100


def model_files(api: dict) -> dict[tuple[str, str], tuple[str, str]]:
    """(node id, input name) -> (node type, file name) for every input that names a model file."""
    return {(k, name): (node["class_type"], value) for k, node in api.items() for name, value in node["inputs"].items()
            if isinstance(value, str) and value.endswith(MODEL_SUFFIXES)}


@pytest.mark.parametrize("name", PAIRS)
def test_every_downloaded_model_names_its_url(name):
    """The frontend's missing-models dialog (frontend 1.27: `node.properties.models` entries whose name is one of
    the node's widget values, and the workflow's top-level `models`) offers a download only for
    `.safetensors`/`.sft` files from huggingface.co or civitai.com, into `directory`."""
    ui, api = PAIRS[name]
    ui_nodes = {n["id"]: n for n in ui["nodes"]}
    listed = []
    for (node_id, input_name), (node_type, file_name) in model_files(api).items():
        models = ui_nodes[int(node_id)]["properties"].get("models", [])
        assert [m["name"] for m in models] == [file_name], f"{node_type} {file_name}: properties.models {models}"
        (model,) = models
        assert set(model) == {"name", "url", "directory"}
        assert model["directory"] == MODEL_DIRECTORIES[(node_type, input_name)]
        assert model["name"].endswith(".safetensors")
        assert model["url"].startswith("https://huggingface.co/") and "/resolve/" in model["url"]
        assert model["url"].split("?")[0].rsplit("/", 1)[1] == model["name"]
        listed.append(model)
    assert ui.get("models", []) == listed  # the same list for frontends that read only the top level
    assert all("models" not in n["properties"] for n in ui["nodes"]
               if str(n["id"]) not in {node_id for node_id, _ in model_files(api)})


def test_tinyvideo_graphs_need_no_download():
    for name in ("tinyvideo_streamline", "tinyvideo_budget_rehash", "tinywan_rehash"):
        assert model_files(PAIRS[name][1]) == {}


def test_animatediff_workflow_uses_the_files_a_newcomer_downloads():
    api = PAIRS["streamline_animatediff"][1]
    assert api["1"]["inputs"]["ckpt_name"] == "v1-5-pruned-emaonly-fp16.safetensors"
    assert api["2"]["inputs"]["model_name"] == "mm_sd15_v2.safetensors"


def test_wan_workflow_uses_the_comfy_org_repackaged_files():
    api = PAIRS["wan21_t2v_streamline"][1]
    assert api["1"]["inputs"]["unet_name"] == "wan2.1_t2v_1.3B_fp16.safetensors"
    assert api["2"]["inputs"]["clip_name"] == "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    assert api["2"]["inputs"]["type"] == "wan"
    assert api["3"]["inputs"]["vae_name"] == "wan_2.1_vae.safetensors"
    urls = {m["name"]: m["url"] for m in PAIRS["wan21_t2v_streamline"][0]["models"]}
    assert all(url.startswith("https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/")
               for url in urls.values())


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


def test_budget_rehash_pipeline():
    """Load TinyVideo -> Memory Budget -> Step Rehash Sampler (fixed) -> TinyVideo Decode -> save, the budget small
    enough that the clip is sliced (0.05 GiB: TinyVideo unsliced needs 100 MiB at this size), its preview
    the clip's size."""
    api = PAIRS["tinyvideo_budget_rehash"][1]
    assert model_chain(api, "8") == ["SaveAnimatedWEBP", "StreamlineTinyVideoDecode", "StreamlineStepRehashSampler",
                                     "StreamlineMemoryBudget", "StreamlineTinyVideoLoader"]
    budget, sampler, latent = api["2"]["inputs"], api["6"]["inputs"], api["5"]["inputs"]
    assert 0 < budget["budget_gb"] <= 0.05
    assert (budget["width"], budget["height"]) == (latent["width"], latent["height"])
    assert budget["frames"] == latent["batch_size"]
    assert sampler["rehash_mode"] == "fixed" and sampler["interval"] > 1
    assert sampler["positive"] == ["3", 0] and sampler["negative"] == ["4", 0] and sampler["latent_image"] == ["5", 0]
    for node in api.values():
        if node["class_type"] == "StreamlineTinyVideoPrompt":
            assert node["inputs"]["model"] == ["1", 0]


def test_wan_pipeline_order():
    """diffusion model -> ModelSamplingSD3 -> Streamline Model Patch -> KSampler -> VAE decode -> save."""
    api = PAIRS["wan21_t2v_streamline"][1]
    assert model_chain(api, "11") == ["SaveAnimatedWEBP", "VAEDecode", "KSampler", "StreamlineModelPatch",
                                      "ModelSamplingSD3", "UNETLoader"]
    assert api["10"]["inputs"]["vae"] == ["3", 0]
    assert api["6"]["inputs"]["clip"] == api["7"]["inputs"]["clip"] == ["2", 0]


def test_tinywan_budget_rehash_pipeline():
    """Load TinyWan -> Memory Budget -> Step Rehash Sampler (fixed) -> TinyVideo Decode -> save, the budget small
    enough that the clip is sliced (0.01 GiB: TinyWan unsliced needs 21.4 MiB at this size), its preview the
    clip's size (for Wan the budget's frames are video frames, as the empty latent's length: 29 -> 8 latent
    frames)."""
    api = PAIRS["tinywan_rehash"][1]
    assert model_chain(api, "8") == ["SaveAnimatedWEBP", "StreamlineTinyVideoDecode", "StreamlineStepRehashSampler",
                                     "StreamlineMemoryBudget", "StreamlineTinyWanLoader"]
    budget, sampler, latent = api["2"]["inputs"], api["6"]["inputs"], api["5"]["inputs"]
    assert api["5"]["class_type"] == "EmptyHunyuanLatentVideo"
    assert 0 < budget["budget_gb"] <= 0.02
    assert (budget["width"], budget["height"]) == (latent["width"], latent["height"])
    assert budget["frames"] == latent["length"] and latent["batch_size"] == 1
    assert sampler["rehash_mode"] == "fixed" and sampler["interval"] > 1
    assert sampler["positive"] == ["3", 0] and sampler["negative"] == ["4", 0] and sampler["latent_image"] == ["5", 0]
    for node in api.values():
        if node["class_type"] == "StreamlineTinyVideoPrompt":
            assert node["inputs"]["model"] == ["1", 0]
