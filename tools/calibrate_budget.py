"""Measure peak activation of one UNet forward (CPU, live-tensor counter) over a grid of shapes and
slicings, fit the Memory Budget coefficients (core/budget.py) to them, and print a table of predicted vs
measured peaks.

    python tools/calibrate_budget.py            # measure, fit, print
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402

GRID_SHAPES = [(4, 8), (8, 8), (16, 8), (4, 16), (8, 16), (16, 16)]  # (frames, latent side), CFG batched
GRID_CONFIGS = [None, (2, 32), (4, 64), (1, 16), (8, 128), (3, 7)]


def measure(cache: Path) -> list[dict]:
    if cache.is_file():
        return json.loads(cache.read_text())
    import comfy.patcher_extension
    import torch

    from comfyui_streamline.core.memtrace import LiveTensorMeter
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.nodes.model_patch import STATE_KEY, StreamlineState, streamline_wrapper
    from comfyui_streamline.tools import synthetic

    unet, mm = synthetic.sd15_unet(), synthetic.sd15_motion_model()
    synthetic.inject(unet, mm)
    rows = []
    for frames, side in GRID_SHAPES:
        mm.set_video_length(frames, frames)
        batch = 2 * frames
        g = torch.Generator().manual_seed(0)
        x, c = torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 77, 768, generator=g)
        t = torch.full((batch,), 500.0)
        for chunks in GRID_CONFIGS:
            to = synthetic.ade_transformer_options(2)
            if chunks:
                to[STATE_KEY] = StreamlineState(SliceConfig(*chunks))
                to["wrappers"] = {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"streamline": [streamline_wrapper]}}
            with torch.inference_mode(), LiveTensorMeter() as meter:
                unet(x, t, c, transformer_options=to)
            rows.append({"frames": frames, "side": side, "chunks": chunks, "peak_bytes": meter.peak_bytes})
            print(rows[-1], flush=True)
    cache.write_text(json.dumps(rows))
    return rows


def main() -> None:
    hostenv.enter_for_tool(None, cpu=True, tool="calibrate_budget")
    rows = measure(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench_results/budget_measurements.json"))
    fitted = fit(rows)
    print(f"fitted: {fitted}")
    print_table(rows, fitted)


def _predict(rows, coefficients):
    from comfyui_streamline.core.budget import Workload, predict_peak_bytes, sd15_shape
    from comfyui_streamline.core.slicing import SliceConfig

    shape = sd15_shape()
    return [predict_peak_bytes(shape, Workload(2 * r["frames"], r["frames"], r["side"], r["side"]),
                               SliceConfig(*r["chunks"]) if r["chunks"] else None, coefficients) for r in rows]


def fit(rows):
    """Coefficients minimising the squared log error of predicted vs measured peaks (and the worst case)."""
    import dataclasses
    import math

    import numpy as np
    from scipy.optimize import minimize

    from comfyui_streamline.core.budget import CPU_COEFFICIENTS, Coefficients

    names = [f.name for f in dataclasses.fields(Coefficients)]
    start = np.log([max(getattr(CPU_COEFFICIENTS, n), 1e-3) for n in names])
    measured = np.array([r["peak_bytes"] for r in rows], dtype=float)

    def loss(logs):
        predicted = np.array(_predict(rows, Coefficients(*np.exp(logs))), dtype=float)
        err = np.log(np.maximum(predicted, 1.0) / measured)
        return float(np.mean(err**2) + 0.5 * np.max(np.abs(err)) ** 2)

    result = minimize(loss, start, method="Nelder-Mead", options={"maxiter": 3000, "xatol": 1e-3, "fatol": 1e-7})
    return Coefficients(*[round(float(math.exp(v)), 3) for v in result.x])


def print_table(rows, coefficients):
    predicted = _predict(rows, coefficients)
    print("| frames | latent | frame/spatial chunk | measured MiB | predicted MiB | error |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for r, p in zip(rows, predicted):
        err = p / r["peak_bytes"] - 1
        worst = max(worst, abs(err))
        chunks = "unpatched" if not r["chunks"] else f"{r['chunks'][0]} / {r['chunks'][1]}"
        print(f"| {r['frames']} | {r['side']}x{r['side']} | {chunks} | {r['peak_bytes'] / 2**20:.1f} | {p / 2**20:.1f} | {err:+.1%} |")
    print(f"worst error {worst:.1%}")


if __name__ == "__main__":
    main()
