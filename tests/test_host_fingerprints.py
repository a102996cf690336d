"""The host fingerprints (host/fingerprints.py): the hosts recorded are the ones the exactness tests run on,
both supported ComfyUI versions are recorded, and a fingerprint follows code, not layout."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.host


def test_recorded_fingerprints_are_this_hosts():
    """Fails when ComfyUI or ADE changes a function the pack mirrors: rerun the exactness tests on the
    new host, then record its table (python tools/host_fingerprints.py)."""
    from comfyui_streamline.host import fingerprints as hf
    from comfyui_streamline.families.svd.forward import svd_functions
    from comfyui_streamline.families.wan.patch import wan_functions
    from comfyui_streamline.testing import synthetic

    functions = {**hf.comfy_functions(), **hf.ade_functions(synthetic.ade_transformer_options(1)),
                 **svd_functions(), **wan_functions()}
    assert set(functions) == set(hf.RECORDED)
    assert hf.unrecorded(functions) == []


def test_both_supported_comfyui_versions_are_recorded():
    from comfyui_streamline.host import fingerprints as hf

    for name, hosts in hf.RECORDED.items():
        named = ", ".join(hosts.values())
        if name.startswith("ADE "):
            assert hf.ADE_1_5_7 in named
        else:
            assert hf.HOST_0_33_0 in named and hf.HOST_0_3_64 in named, name


def test_fingerprints_ignore_blank_lines_and_indentation_but_not_code():
    from comfyui_streamline.host.fingerprints import source_fingerprint

    base = source_fingerprint("def f(x):\n    return x + 1\n")
    assert base == source_fingerprint("def f(x):\n\n        return x + 1   \n")
    assert base != source_fingerprint("def f(x):\n    return x + 2\n")
