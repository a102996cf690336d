"""tools/bench_dit.py: its prediction table at the real shapes is the family adapters' own numbers (meta device,
no weights, seconds), a family without an adapter or laws is a row that says so, and the --quick --measure
plumbing on the CPU measures ComfyUI's forward and the automatic plans' side by side, outputs the same."""
from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.host


def test_the_prediction_rows_are_the_adapters_own(tmp_path):
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.family import Shaped
    from comfyui_streamline.families.registry import family_of, peaks_for
    from comfyui_streamline.tools import bench_dit

    out = tmp_path / "dit.md"
    found = {p.case.name: p for p in bench_dit.main(["--markdown", str(out)])}
    text = out.read_text()
    wan = found["Wan 2.1 14B t2v"]
    assert wan.tokens == 21 * 45 * 80 and wan.case.latent_shape() == (2, 16, 21, 90, 160)
    model = bench_dit.meta_model(wan.case)
    family = family_of(model)
    x = Shaped(wan.case.latent_shape(), 2)
    context = Shaped((2, 512, 1), 2)
    with bench_dit.cuda_attention():
        for budget in (24 * bench_dit.GiB, 12 * bench_dit.GiB):
            plan = wan.plans[budget]
            sliced, whole = peaks_for(family, model, x, context, plan.config)
            assert (plan.predicted_peak_bytes, plan.baseline_peak_bytes) == (sliced, whole)
            assert sliced <= budget
        assert wan.comfy == whole
    twelve = wan.plans[12 * bench_dit.GiB]
    assert twelve.predicted_peak_bytes < wan.comfy and twelve.config.token_chunk < wan.tokens
    ratio = float(re.search(r"\| Wan 2\.1 14B t2v \|.*\| ([\d.]+)x less \|$", text, re.M).group(1))
    assert ratio == pytest.approx(wan.comfy / twelve.predicted_peak_bytes, abs=0.006)
    for p in found.values():  # every real-shape family is a row: numbers, or why there are none
        assert f"| {p.case.name} |" in text
        assert (p.why is None) == (p.comfy is not None), p


def test_quick_measure_plumbing_cpu(tmp_path):
    from comfyui_streamline.tools import bench_dit

    out = tmp_path / "quick.md"
    bench_dit.main(["--quick", "--measure", "--device", "cpu", "--repeats", "1", "--markdown", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny Wan | 256x256x9 | 2 |")]
    assert [r.split("|")[4].strip().split(",")[0] for r in rows] == ["ComfyUI", "plan at 12.0 MiB", "plan at 8.0 MiB"]
    for row in rows[1:]:  # sliced: less memory than ComfyUI's, the same output
        assert float(re.search(r"\| ([\d.]+)x less \|", row).group(1)) > 1.0, row
        assert float(row.split("|")[-2]) <= 1e-5, row
