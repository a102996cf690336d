"""The guard against host drift (nodes/host_fingerprints.py): the recorded fingerprints are those of
the host the exactness tests run on, and a host whose mirrored function differs is told once."""
from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.host


def test_recorded_fingerprints_are_this_hosts():
    """Fails when ComfyUI or ADE changes a function the pack mirrors: rerun the exactness tests on the
    new host, then record its table (python tools/host_fingerprints.py)."""
    from comfyui_streamline.nodes import host_fingerprints as hf
    from comfyui_streamline.tools import synthetic

    functions = {**hf.comfy_functions(), **hf.ade_functions(synthetic.ade_transformer_options(1))}
    assert set(functions) == set(hf.RECORDED)
    assert hf.changed(functions) == []


def test_a_changed_host_function_is_named_once_with_the_check_command(caplog):
    from comfyui_streamline.nodes import host_fingerprints as hf
    from comfyui_streamline.nodes.streamlined_unet import LogOnce
    from comfyui_streamline.tools import synthetic

    drifted = dict(hf.RECORDED, **{"comfy ResBlock._forward": "0" * 16, "ADE groupnorm_mm_factory": "1" * 16})
    log = LogOnce()
    with caplog.at_level(logging.WARNING, logger="ComfyUI-Streamline"):
        for _ in range(3):  # three UNet calls
            hf.warn_on_drift(log, synthetic.ade_transformer_options(1), drifted)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert any("comfy ResBlock._forward" in m for m in messages)
    assert any("ADE groupnorm_mm_factory" in m for m in messages)
    assert all(hf.CHECK_COMMAND in m and hf.TESTED_HOSTS in m for m in messages)


def test_fingerprints_ignore_blank_lines_and_indentation_but_not_code():
    from comfyui_streamline.nodes.host_fingerprints import source_fingerprint

    base = source_fingerprint("def f(x):\n    return x + 1\n")
    assert base == source_fingerprint("def f(x):\n\n        return x + 1   \n")
    assert base != source_fingerprint("def f(x):\n    return x + 2\n")
