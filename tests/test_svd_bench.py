"""tools/bench_svd.py in its quick CPU form: every row measured, written to the markdown file, numbers sane."""
from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.host


def test_bench_svd_quick_cpu(tmp_path):
    from comfyui_streamline.tools import bench_svd

    out = tmp_path / "svd.md"
    bench_svd.main(["--device", "cpu", "--quick", "--repeats", "1", "--markdown", str(out)])
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 5 |")]
    assert [r.split("|")[2].strip().split(" ")[0] for r in rows] == ["ComfyUI", "sliced", "budget"]
    for row in rows:  # prediction within 5% of the live-tensor counter; outputs the same
        error = float(re.search(r"\(([-+][\d.]+)%\)", row).group(1))
        assert abs(error) <= 5.0, row
        assert float(row.split("|")[-2]) <= 1e-5, row
    assert float(re.search(r"\| ([\d.]+)x less", rows[1]).group(1)) >= 2.0
    share = float(re.search(r"Step Rehash\) \| [\d.]+ T \| ([\d.]+)%", text).group(1))
    assert 0 < share < 20
