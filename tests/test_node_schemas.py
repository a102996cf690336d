"""What the frontend shows of the pack's nodes (ComfyUI frontend 1.27's rules, applied to the nodes'
real /object_info entries): outputs named for what they carry, not for their type; every value a float
input's step reaches shown with its digits; a tooltip on every input."""
from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.host


def node_infos() -> dict[str, dict]:
    import asyncio

    from comfyui_streamline.nodes.extension import StreamlineExtension

    nodes = asyncio.run(StreamlineExtension().get_node_list())
    return {node.GET_SCHEMA().node_id: node.GET_NODE_INFO_V1() for node in nodes}


def frontend_precision(step: float) -> int:
    """Decimals the frontend shows a FLOAT widget with (useFloatWidget: from the step, when the user has
    not set Comfy.FloatRoundingPrecision)."""
    return max(0, -math.floor(math.log10(step)))


def test_outputs_other_than_the_model_are_named_for_what_they_carry():
    for node_id, info in node_infos().items():
        for name, kind in zip(info["output_name"], info["output"]):
            if kind not in ("MODEL", "LATENT", "CONDITIONING", "IMAGE"):
                assert name != kind, f"{node_id}: its {kind} output shows as '{name}'"


def test_float_inputs_show_every_value_their_step_reaches():
    for node_id, info in node_infos().items():
        for name, spec in {**info["input"].get("required", {}), **info["input"].get("optional", {})}.items():
            if spec[0] != "FLOAT":
                continue
            options = spec[1]
            step, digits = options["step"], frontend_precision(options["step"])
            for k in range(1, 40):
                value = k * step
                assert abs(float(f"{value:.{digits}f}") - value) < 1e-9, (node_id, name, value, digits)


def test_the_memory_budget_shows_a_quarter_gib_as_0_25_and_names_its_plan_output():
    info = node_infos()["StreamlineMemoryBudget"]
    budget = info["input"]["required"]["budget_gb"][1]
    assert f"{0.25:.{frontend_precision(budget['step'])}f}" == "0.25"
    assert "GiB" in budget["tooltip"] and budget.get("display_name") == "budget (GiB)"
    assert info["output_name"] == ["MODEL", "plan"]


def test_every_input_has_a_tooltip():
    for node_id, info in node_infos().items():
        for name, spec in {**info["input"].get("required", {}), **info["input"].get("optional", {})}.items():
            if name == "model" or spec[0] in ("MODEL", "LATENT", "CONDITIONING"):
                continue
            assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
