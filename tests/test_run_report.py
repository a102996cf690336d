"""Every sampling run with a model one of the pack's nodes patched says once what it did: in the log and,
through ComfyUI's server, on that node (techniques/report.py; web/streamline.js shows it). And the main job,
tools/demo.py, runs end to end. On TinyVideo through ComfyUI's real KSampler and the pack's real nodes
(the node ids come in through ComfyUI's own class clone with hidden inputs, as the executor makes it)."""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

pytestmark = pytest.mark.host

STREAMLINE_LOGGER = "ComfyUI-Streamline"
FRAMES, SIZE, STEPS = 8, 16, 2


class RecordingServer:
    """Stands in for ComfyUI's PromptServer.instance: records what the pack sends (the real server and
    frontend are exercised by tests/test_browser.py)."""

    client_id = "client-1"

    def __init__(self):
        self.sent = []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


@pytest.fixture
def server(monkeypatch):
    recording = RecordingServer()
    module = types.ModuleType("server")
    module.PromptServer = type("PromptServer", (), {"instance": recording})
    monkeypatch.setitem(sys.modules, "server", module)
    return recording


@pytest.fixture(scope="module")
def tinyvideo():
    from comfyui_streamline.nodes.tinyvideo import TinyVideoLoader

    return TinyVideoLoader.execute().result[0]


def as_node(node_class, unique_id: str):
    """The node class as ComfyUI's executor calls it for node `unique_id`."""
    import inspect

    from comfy_api.latest import io

    hidden = {io.Hidden.unique_id: unique_id}
    if "v3_data" in inspect.signature(node_class.PREPARE_CLASS_CLONE).parameters:  # ComfyUI 0.33
        return node_class.PREPARE_CLASS_CLONE({"hidden_inputs": hidden})
    return node_class.PREPARE_CLASS_CLONE(hidden)  # 0.3.64: the hidden inputs themselves


def sample(model, steps: int = STEPS, cfg: float = 5.0) -> torch.Tensor:
    import nodes as comfy_nodes

    from comfyui_streamline.nodes.tinyvideo import TinyVideoPrompt

    positive = TinyVideoPrompt.execute(model, "red circle bounce").result[0]
    negative = TinyVideoPrompt.execute(model, "").result[0]
    latent = comfy_nodes.EmptyLatentImage().generate(SIZE * 8, SIZE * 8, FRAMES)[0]
    return comfy_nodes.KSampler().sample(model, 0, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def pack_messages(caplog, level=logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == STREAMLINE_LOGGER and r.levelno >= level]


def test_model_patch_reports_each_run_once_with_its_slices_and_predicted_peaks(tinyvideo, server, caplog):
    from comfyui_streamline.core.budget import predict_peak_bytes
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.host.attention import attention_laws
    from comfyui_streamline.families.unet.planning import workload_for
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch
    from comfyui_streamline.families.unet.structure import unet_shape
    from comfyui_streamline.tinyvideo import model as tinyvideo_model

    caplog.set_level(logging.INFO, logger=STREAMLINE_LOGGER)
    patched = as_node(StreamlineModelPatch, "7").execute(tinyvideo, 4, 64).result[0]
    sample(patched)
    sample(patched, steps=3)

    reports = [m for m in pack_messages(caplog) if m.startswith("Streamline Model Patch, this run")]
    assert len(reports) == 2, reports  # once per run
    assert [m for m in pack_messages(caplog, logging.WARNING)] == []  # no notice on the host the pack was tested on
    batch = 2 * FRAMES  # cond and uncond batched
    assert f"{batch}x4x{SIZE}x{SIZE} ({STEPS} calls)" in reports[0]
    assert f"{batch}x4x{SIZE}x{SIZE} (3 calls)" in reports[1]
    assert f"slices of 4 of {batch} samples in per-frame layers, 64 of {SIZE * SIZE} positions" in reports[0]

    # the predicted peaks are the planner's, for the UNet as it ran (TinyVideo's motion modules in)
    x = torch.zeros(batch, 4, SIZE, SIZE)
    context = torch.zeros(batch, len(tinyvideo_model.SLOTS), 1)
    run_unet = patched.model.diffusion_model
    shape = unet_shape(run_unet)
    sliced = predict_peak_bytes(shape, workload_for(x, context, FRAMES), SliceConfig(4, 64), attention_laws())
    whole = predict_peak_bytes(shape, workload_for(x, context, FRAMES), None, attention_laws())
    assert sliced < whole
    from comfyui_streamline.core.plan_search import format_bytes

    assert f"predicted peak activation {format_bytes(sliced)}, ComfyUI's forward {format_bytes(whole)}" in reports[0]
    assert "measured" not in reports[0]  # measured on CUDA only: a CPU run does not pretend

    assert [(e, d["node"], sid) for e, d, sid in server.sent] == [("streamline.report", "7", "client-1")] * 2
    assert [d["text"] for _, d, _ in server.sent] == reports


def test_memory_budget_and_step_rehash_model_patch_report_on_their_own_nodes(tinyvideo, server, caplog):
    from comfyui_streamline.nodes.memory_budget import MemoryBudget
    from comfyui_streamline.nodes.step_rehash import StepRehashModelPatch

    caplog.set_level(logging.INFO, logger=STREAMLINE_LOGGER)
    budgeted = as_node(MemoryBudget, "3").execute(tinyvideo, 0.02, SIZE * 8, SIZE * 8, FRAMES).result[0]
    rehashed = as_node(StepRehashModelPatch, "5").execute(
        budgeted, rehash_mode="fixed", interval=2, warmup_steps=1, tail_steps=1, threshold=0.15, full_steps=3,
        cache_block=-1, start_percent=0.0, end_percent=1.0).result[0]
    sample(rehashed, steps=4)

    by_node = {d["node"]: d["text"] for e, d, _ in server.sent if e == "streamline.report"}
    assert set(by_node) == {"3", "5"}
    assert by_node["3"].startswith("Streamline Memory Budget (20.5 MiB), this run:")
    assert "predicted peak activation" in by_node["3"]
    assert by_node["5"].startswith("Step Rehash")
    assert "full" in by_node["5"]


def test_a_model_the_pack_leaves_unchanged_says_so_on_the_node_and_once_in_the_log(server, caplog):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from comfyui_streamline.testing import model_families

    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    spec = model_families.WAN_SUBCLASS_VARIANTS["WAN21_HuMo"]  # a model the pack leaves to ComfyUI
    model = model_families.load(spec)
    caplog.set_level(logging.INFO, logger=STREAMLINE_LOGGER)
    patched = as_node(StreamlineModelPatch, "9").execute(model, 4, 64).result[0]
    import nodes as comfy_nodes

    positive, negative = spec.conds()
    comfy_nodes.KSampler().sample(patched, 0, 1, spec.cfg, "euler", "normal", positive, negative, spec.latent())

    messages = pack_messages(caplog)
    assert len(messages) == 1 and "running it unchanged" in messages[0], messages
    [(event, data, _)] = server.sent
    assert data["node"] == "9" and "ran unchanged" in data["text"] and data["text"].startswith("Streamline Model Patch: ")


def test_the_demo_runs_labelled_passes_and_saves_both_clips(tmp_path, capsys):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tools"))
    import demo

    demo.main(["--frames", "4", "--size", "8", "--steps", "2", "--frame-chunk", "2", "--spatial-chunk", "16",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for label in ("[1/4] warm-up", "[2/4] ComfyUI: 2 steps, timed", "[3/4] Streamline: 2 steps, timed",
                  "[4/4] peak memory"):
        assert label in out, out
    assert "x less memory" in out
    difference = float(out.split("(relative to the largest value): ")[1].split()[0])
    assert difference < 1e-5
    assert "Streamline Model Patch, this run:" in out and "(2 calls)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tinyvideo_red_circle_bounce_comfyui.gif",
                                                         "tinyvideo_red_circle_bounce_streamline.gif"]
