"""The shipped workflows: each UI graph and its API twin describe the same pipeline, and every model a
newcomer must download is named with its URL where ComfyUI's frontend looks for it.

Every node of every API twin is one the host defines (ComfyUI 0.33's own nodes, ADE's and this pack's), with its
inputs, their values among the choices and in range, the widgets in the definition's order (the order of the UI
graph's widget values).

(That a real server knows them too, that the frontend loads each UI graph without missing nodes or overlapping
nodes and turns it into its API twin, and that the TinyVideo and TinyWan graphs run, is checked in test_browser.py
and test_server_e2e.py.)
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
         "tinywan_rehash", "wan21_t2v_streamline", "ltx2_t2v_streamline", "hunyuan15_t2v_streamline")
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
                     ("DualCLIPLoader", "clip_name1"): "text_encoders",
                     ("DualCLIPLoader", "clip_name2"): "text_encoders",
                     ("VAELoader", "vae_name"): "vae",
                     ("LTXAVTextEncoderLoader", "text_encoder"): "text_encoders",
                     ("LTXAVTextEncoderLoader", "ckpt_name"): "checkpoints",
                     ("LTXVAudioVAELoader", "ckpt_name"): "checkpoints",
                     ("LoraLoaderModelOnly", "lora_name"): "loras",
                     ("LatentUpscaleModelLoader", "model_name"): "latent_upscale_models"}


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
    `.safetensors`/`.sft` files from huggingface.co or civitai.com, into `directory`. A node that names several files
    (LTX-2's text encoder loader: Gemma and the checkpoint; DualCLIPLoader) lists each, in its inputs' order; a
    file several nodes name (LTX-2's checkpoint) is one download, the same everywhere."""
    ui, api = PAIRS[name]
    ui_nodes = {n["id"]: n for n in ui["nodes"]}
    listed = {}
    for node_id, node in api.items():
        files = [(input_name, file_name) for (k, input_name), (_, file_name) in model_files(api).items() if k == node_id]
        models = ui_nodes[int(node_id)]["properties"].get("models", [])
        assert [m["name"] for m in models] == [f for _, f in files], f"{node['class_type']}: properties.models {models}"
        for (input_name, file_name), model in zip(files, models):
            assert set(model) == {"name", "url", "directory"}
            assert model["directory"] == MODEL_DIRECTORIES[(node["class_type"], input_name)]
            assert model["name"].endswith(".safetensors")
            assert model["url"].startswith("https://huggingface.co/") and "/resolve/" in model["url"]
            assert model["url"].split("?")[0].rsplit("/", 1)[1] == model["name"]
            assert listed.setdefault(file_name, model) == model, f"{file_name}: two different downloads"
    assert all("models" not in n["properties"] for n in ui["nodes"] if n["type"] in FRONTEND_ONLY)
    # the same list for frontends that read only the top level, each file once
    assert ui.get("models", []) == list(listed.values())


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


@pytest.mark.parametrize("name", PAIRS)
def test_readme_lists_every_workflow_with_its_downloads(name):
    """The README's table of workflows (what the Templates browser shows) has a row for each, naming every file
    the newcomer downloads for it."""
    rows = [line for line in (WORKFLOWS.parent / "README.md").read_text().splitlines()
            if line.startswith(f"| `{name}.json` |")]
    assert len(rows) == 1, f"README.md: {len(rows)} rows for {name}.json"
    for model in PAIRS[name][0].get("models", []):
        assert f"`{model['name']}`" in rows[0], f"README.md's row for {name}.json does not name {model['name']}"


def downloads(name: str) -> dict[str, str]:
    """file name -> URL of the files a workflow names."""
    return {m["name"]: m["url"] for m in PAIRS[name][0]["models"]}


def test_ltx2_workflow_uses_the_files_of_comfyuis_template():
    """ComfyUI's LTX-2 text-to-video template's files: the checkpoint (video model, video VAE, audio VAE and the
    text encoder's connector in one file), its distilled LoRA and x2 spatial upscaler from Lightricks/LTX-2; Gemma 3
    12B from Comfy-Org/ltx-2 (which holds only text encoders and LoRAs)."""
    api = PAIRS["ltx2_t2v_streamline"][1]
    checkpoint = "ltx-2-19b-dev-fp8.safetensors"
    assert api["1"]["inputs"]["ckpt_name"] == api["2"]["inputs"]["ckpt_name"] == api["3"]["inputs"]["ckpt_name"] == checkpoint
    assert api["2"]["inputs"]["text_encoder"] == "gemma_3_12B_it_fp4_mixed.safetensors"
    assert api["5"]["inputs"]["lora_name"] == "ltx-2-19b-distilled-lora-384.safetensors"
    assert api["6"]["inputs"]["model_name"] == "ltx-2-spatial-upscaler-x2-1.0.safetensors"
    lightricks = "https://huggingface.co/Lightricks/LTX-2/resolve/main/"
    assert downloads("ltx2_t2v_streamline") == {
        checkpoint: lightricks + checkpoint,
        "gemma_3_12B_it_fp4_mixed.safetensors": "https://huggingface.co/Comfy-Org/ltx-2/resolve/main/split_files/"
                                                "text_encoders/gemma_3_12B_it_fp4_mixed.safetensors",
        "ltx-2-19b-distilled-lora-384.safetensors": lightricks + "ltx-2-19b-distilled-lora-384.safetensors",
        "ltx-2-spatial-upscaler-x2-1.0.safetensors": lightricks + "ltx-2-spatial-upscaler-x2-1.0.safetensors"}


def test_hunyuan15_workflow_uses_the_comfy_org_repackaged_files():
    api = PAIRS["hunyuan15_t2v_streamline"][1]
    assert api["1"]["inputs"]["unet_name"] == "hunyuanvideo1.5_720p_t2v_fp16.safetensors"
    assert api["2"]["inputs"]["clip_name1"] == "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    assert api["2"]["inputs"]["clip_name2"] == "byt5_small_glyphxl_fp16.safetensors"
    assert api["2"]["inputs"]["type"] == "hunyuan_video_15"
    assert api["3"]["inputs"]["vae_name"] == "hunyuanvideo15_vae_fp16.safetensors"
    folders = {"hunyuanvideo1.5_720p_t2v_fp16.safetensors": "diffusion_models",
               "qwen_2.5_vl_7b_fp8_scaled.safetensors": "text_encoders",
               "byt5_small_glyphxl_fp16.safetensors": "text_encoders", "hunyuanvideo15_vae_fp16.safetensors": "vae"}
    assert downloads("hunyuan15_t2v_streamline") == {
        file: f"https://huggingface.co/Comfy-Org/HunyuanVideo_1.5_repackaged/resolve/main/split_files/{folder}/{file}"
        for file, folder in folders.items()}


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


def guided_chain(api: dict, sampler: str) -> list[str]:
    """A SamplerCustomAdvanced's model, upstream from its guider: [guider, ..., loader]."""
    node = api[sampler]["inputs"]["guider"][0]
    chain = [api[node]["class_type"]]
    while "model" in api[node]["inputs"]:
        node = api[node]["inputs"]["model"][0]
        chain.append(api[node]["class_type"])
    return chain


def test_ltx2_pipeline():
    """ComfyUI's LTX-2 template: a first pass at half the size (LTXVScheduler, 20 steps, cfg 4), the video latent
    upscaled x2, a second pass with the distilled LoRA (3 manual sigmas, cfg 1) at the issue's reference shape,
    1920x1088 and 241 frames (8n+1), the sound's latent as long as the video at the same frame rate. Streamline
    Model Patch is on the checkpoint's model, under both passes' guiders."""
    api = PAIRS["ltx2_t2v_streamline"][1]
    assert model_chain(api, "30") == ["SaveAnimatedWEBP", "VAEDecodeTiled", "LTXVSeparateAVLatent"]
    assert api["27"]["inputs"]["av_latent"] == ["26", 1]  # the second pass's denoised output, as the template
    assert guided_chain(api, "17") == ["CFGGuider", "StreamlineModelPatch", "CheckpointLoaderSimple"]
    assert guided_chain(api, "26") == ["CFGGuider", "LoraLoaderModelOnly", "StreamlineModelPatch",
                                       "CheckpointLoaderSimple"]
    video, audio = api["10"]["inputs"], api["11"]["inputs"]
    assert api["20"]["class_type"] == "LTXVLatentUpsampler" and api["6"]["class_type"] == "LatentUpscaleModelLoader"
    assert "x2" in api["6"]["inputs"]["model_name"]
    assert (2 * video["width"], 2 * video["height"], video["length"]) == (1920, 1088, 241)
    assert video["width"] % 32 == video["height"] % 32 == 0 and video["length"] % 8 == 1 and video["batch_size"] == 1
    assert audio["frames_number"] == video["length"]
    assert audio["frame_rate"] == api["9"]["inputs"]["frame_rate"] == api["30"]["inputs"]["fps"] == 24
    assert api["15"]["inputs"]["steps"] == 20 and api["16"]["inputs"]["cfg"] == 4.0 and api["25"]["inputs"]["cfg"] == 1.0
    assert len(api["24"]["inputs"]["sigmas"].split(",")) == 4
    assert api["28"]["inputs"]["samples"] == ["27", 0] and api["29"]["inputs"]["samples"] == ["27", 1]
    assert api["31"]["class_type"] == "SaveAudio" and api["31"]["inputs"]["audio"] == ["29", 0]


def test_hunyuan15_pipeline():
    """ComfyUI's HunyuanVideo 1.5 720p template without its bypassed super-resolution stage: 1280x720, 121 frames
    (4n+1), 20 steps, cfg 6, shift 7, the sigmas from the model the guider samples; Streamline Model Patch between
    ModelSamplingSD3 and the guider."""
    api = PAIRS["hunyuan15_t2v_streamline"][1]
    assert model_chain(api, "15") == ["SaveAnimatedWEBP", "VAEDecode", "SamplerCustomAdvanced"]
    assert guided_chain(api, "13") == ["CFGGuider", "StreamlineModelPatch", "ModelSamplingSD3", "UNETLoader"]
    assert api["10"]["inputs"]["model"] == api["9"]["inputs"]["model"]
    latent = api["8"]["inputs"]
    assert api["8"]["class_type"] == "EmptyHunyuanVideo15Latent"
    assert (latent["width"], latent["height"], latent["length"], latent["batch_size"]) == (1280, 720, 121, 1)
    assert api["4"]["inputs"]["shift"] == 7.0 and api["9"]["inputs"]["cfg"] == 6.0
    assert api["10"]["inputs"]["steps"] == 20 and api["14"]["inputs"]["vae"] == ["3", 0]
    assert api["6"]["inputs"]["clip"] == api["7"]["inputs"]["clip"] == ["2", 0]


@pytest.fixture(scope="module")
def host_nodes() -> dict:
    """node type -> class, for every node a shipped workflow may use: ComfyUI's own (comfy_extras too), ADE's and
    this pack's."""
    import asyncio

    from comfyui_streamline.nodes.extension import StreamlineExtension
    from comfyui_streamline.testing.weights import ade_module

    nodes = comfy_nodes()
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    pack = asyncio.run(StreamlineExtension().get_node_list())
    return {**nodes.NODE_CLASS_MAPPINGS, **ade_module("nodes").NODE_CLASS_MAPPINGS,
            **{node.define_schema().node_id: node for node in pack}}


def comfy_nodes():
    """ComfyUI's nodes.py as the module `nodes`, as the host has it (comfy_extras import it by that name): with the
    repository root on sys.path, `import nodes` finds the pack's own nodes/ folder instead. ComfyUI's `utils`
    package is imported first, as main.py does (0.3.64's extras put comfy/ on sys.path, whose utils.py would be
    found instead)."""
    import importlib
    import importlib.util
    import sys

    from conftest import COMFY_ROOT

    sys.path.insert(0, str(COMFY_ROOT))
    try:
        importlib.import_module("utils")
    finally:
        sys.path.remove(str(COMFY_ROOT))
    path = COMFY_ROOT / "nodes.py"
    if getattr(sys.modules.get("nodes"), "__file__", None) != str(path):
        spec = importlib.util.spec_from_file_location("nodes", path)
        sys.modules["nodes"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["nodes"])
    return sys.modules["nodes"]


# The ComfyUI model class (comfy.model_base) a graph's model is: a host without it (0.3.64 has neither) has none of
# the model's nodes either, and the graph is for newer hosts.
HOST_MODEL = {"ltx2_t2v_streamline": "LTXAV", "hunyuan15_t2v_streamline": "HunyuanVideo15"}


@pytest.mark.host
@pytest.mark.parametrize("name", PAIRS)
def test_api_twin_matches_the_host_definitions(name, host_nodes):
    """Each node is one the host has; each input one of its own, every required one given; a choice among the
    options (a model file: any, the host's folders are empty here), a number within its range; and the widget
    inputs in the definition's order, which is the order of the UI graph's widget values."""
    import comfy.model_base

    if name in HOST_MODEL and not hasattr(comfy.model_base, HOST_MODEL[name]):
        pytest.skip(f"this ComfyUI has no {HOST_MODEL[name]} model (ComfyUI 0.33 has): {name} is for newer hosts")
    _, api = PAIRS[name]
    for node_id, node in api.items():
        where = f"{name} node {node_id} ({node['class_type']})"
        assert node["class_type"] in host_nodes, f"{where}: the host has no such node"
        spec = host_nodes[node["class_type"]].INPUT_TYPES()
        known = {**spec.get("required", {}), **spec.get("optional", {})}
        assert set(node["inputs"]) <= set(known), f"{where}: unknown inputs {set(node['inputs']) - set(known)}"
        assert set(spec.get("required", {})) <= set(node["inputs"]), f"{where}: missing required inputs"
        widgets = [k for k, v in node["inputs"].items() if not isinstance(v, list)]
        assert widgets == [k for k in known if k in widgets], f"{where}: widgets not in the definition's order"
        for input_name in widgets:
            value, (kind, options) = node["inputs"][input_name], (tuple(known[input_name]) + ({},))[:2]
            if isinstance(kind, list) or kind == "COMBO":
                choices = kind if isinstance(kind, list) else options.get("options", [])
                assert value in choices or value.endswith(MODEL_SUFFIXES), f"{where}: {input_name}={value!r}"
            elif {"INT", "FLOAT"} & set(str(kind).split(",")):  # LTX-2's frame rates are "FLOAT,INT"
                assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {input_name}"
