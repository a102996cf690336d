"""Test setup: load this pack under a fixed package name and find a ComfyUI host.

The host is looked up, in order, through $COMFYUI_PATH, the usual layout (this pack inside
`ComfyUI/custom_nodes/`), and `~/comfy/ComfyUI`. Without one, every host test is skipped and the
session summary says so in capitals, so a green run without the host cannot pass unnoticed.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import hostenv  # noqa: E402
import torch  # noqa: E402

# Exactness tests compare the sliced forward with ComfyUI's in fp32. The two differ only by float32
# reductions run in another order (tests/test_video_norm.py: in float64 they agree to 1e-14), and how
# kernels split a reduction depends on the thread count: one thread makes those rounding differences
# the same on every run (measured 1.0e-6 to 6.1e-6 of the 1e-5 bound; up to 9.5e-6 had been seen with more
# threads). Across machines the CPU's kernels (AVX-512, AVX2) still reorder them: two sampling steps of the
# SD1.5-wide motion-module families reach 1.07e-5 on an AVX2 AMD EPYC (tests/test_motion_families.py's bound).
# STREAMLINE_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("STREAMLINE_TEST_THREADS", "1")))

hostenv.load_pack()
COMFY_ROOT = hostenv.find_comfy_root()
ADE_ROOT = hostenv.find_ade_root(COMFY_ROOT) if COMFY_ROOT else None
HOST_MISSING_REASON = hostenv.host_problem(COMFY_ROOT, ADE_ROOT)
if HOST_MISSING_REASON is None:
    hostenv.enter_host(COMFY_ROOT, ADE_ROOT, cpu=True)
elif os.environ.get("STREAMLINE_REQUIRE_HOST"):
    # CI sets this: a run without the host proves nothing about the nodes.
    raise pytest.UsageError(f"STREAMLINE_REQUIRE_HOST is set but {HOST_MISSING_REASON}")

_host_skipped: list[str] = []


def pytest_collection_modifyitems(config, items):
    if HOST_MISSING_REASON is None:
        return
    skip = pytest.mark.skip(reason=f"HOST TEST SKIPPED: {HOST_MISSING_REASON}")
    for item in items:
        if "host" in item.keywords:
            item.add_marker(skip)
            _host_skipped.append(item.nodeid)


@pytest.fixture(scope="session")
def sd15_server_files(tmp_path_factory):
    """The random-weight SD1.5 checkpoint and mm_sd_v15_v2 files every server test's base directory links
    (comfy_server.write_sd15_files), drawn once a run."""
    from comfy_server import write_sd15_files

    return write_sd15_files(tmp_path_factory.mktemp("sd15-server-files"))


def pytest_configure(config):
    config.addinivalue_line("markers", "host: needs a ComfyUI + AnimateDiff-Evolved host tree")
    config.addinivalue_line("markers", "server: starts a real ComfyUI server")


def pytest_terminal_summary(terminalreporter):
    if _host_skipped:
        terminalreporter.write_sep("!", f"{len(_host_skipped)} HOST TESTS SKIPPED: {HOST_MISSING_REASON}", red=True)
    else:
        terminalreporter.write_line(f"ComfyUI host: {COMFY_ROOT} (AnimateDiff-Evolved: {ADE_ROOT})")


@pytest.fixture(autouse=True, scope="module")
def _release_models_after_each_module(request):
    """Each test file loads its own models (SD1.5, SVD, Wan, Flux at test sizes, up to a few GB): drop what
    ComfyUI's model management still holds once a file is done, so one pytest process does not grow
    through the whole suite (it once reached 12.6 GB)."""
    yield
    # models a test file caches (functools.lru_cache'd loaders) go with the file
    for value in list(vars(request.module).values()):
        if callable(getattr(value, "cache_clear", None)) and hasattr(value, "cache_info"):
            value.cache_clear()
    if HOST_MISSING_REASON is None:
        import gc

        import comfy.model_management

        comfy.model_management.unload_all_models()
        gc.collect()
        comfy.model_management.soft_empty_cache()
        try:  # glibc keeps freed heap for reuse; hand it back, so the server tests' processes have room
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
