"""Check the Memory Budget model (core/budget.py) against measured peaks on the CPU (live-tensor counter).

Two checks, nothing fitted:
- layers: each kind of layer run alone (ResBlocks, spatial transformers, motion modules whole and per
  spatial chunk, Upsample, Downsample) over several sizes: measured peak vs the layer's law;
- grid: whole SD1.5 + mm_sd_v15_v2 forwards (CFG batched) over frames, latent sizes and slicings,
  unpatched and streamlined: measured peak vs the walk's prediction;
- tinyvideo: the same for the pack's TinyVideo model, another model family.

    python tools/calibrate_budget.py                     # ComfyUI's CPU attention (sub-quadratic)
    python tools/calibrate_budget.py --attention sdpa    # PyTorch SDPA, ComfyUI's attention on CUDA
    python tools/calibrate_budget.py --only layers       # or: --only grid
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402

GRID_SHAPES = [(4, 8), (8, 8), (16, 8), (4, 16), (8, 16), (16, 16)]  # (frames, latent side), CFG batched
GRID_CONFIGS = [None, (2, 32), (4, 64), (1, 16), (8, 128), (3, 7)]
HELD_OUT = [(2, 24, None), (2, 24, (1, 64)), (6, 12, (5, 40)), (12, 8, (16, 0)), (4, 32, (2, 256))]
TINYVIDEO = [(8, None), (8, (4, 128)), (8, (1, 16)), (16, None), (16, (6, 300)), (32, (8, 64))]  # (frames, chunks), 32x32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", choices=["sub-quadratic", "sdpa"], default="sub-quadratic")
    p.add_argument("--only", choices=["layers", "grid", "tinyvideo"])
    p.add_argument("--cache", type=Path, help="grid measurements: read if present, else written")
    return p.parse_args(argv)


def peak_values(fn) -> float:
    """Peak activation of fn() in float32 values (tensors made before the call are not counted)."""
    import torch

    from comfyui_streamline.core.memtrace import LiveTensorMeter

    with torch.inference_mode(), LiveTensorMeter() as meter:
        fn()
    return meter.peak_bytes / 4


def layer_rows(laws) -> list[tuple[str, float, float]]:
    """(case, measured values, predicted values) for single layers of an SD1.5 UNet with motion modules."""
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed

    from comfyui_streamline.core.budget import Workload, _Walk
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.unet.motion_module import run_motion_module_sliced
    from comfyui_streamline.families.unet.structure import unet_shape
    from comfyui_streamline.testing import synthetic

    unet, motion = synthetic.sd15_unet(), synthetic.sd15_motion_model()
    synthetic.inject(unet, motion)
    shape = unet_shape(unet)
    to = synthetic.ade_transformer_options(2)
    g = torch.Generator().manual_seed(0)
    rows = []

    def walk(batch: int, frames: int, side: int) -> _Walk:
        return _Walk(shape, Workload(batch, frames, side, side), SliceConfig(), laws)

    # (name, block index in the shape and in the UNet, layer index, latent side at the layer's level)
    per_frame = [("ResBlock 320->320", "input", 1, 0), ("ResBlock 320->640 (down path)", "input", 4, 0),
                 ("ResBlock 2560->1280 (skip joined)", "output", 3, 0), ("spatial transformer 320", "input", 1, 1),
                 ("spatial transformer 1280", "input", 7, 1), ("Upsample 1280", "output", 2, 2),
                 ("Downsample 320", "input", 3, 0)]
    batch = 2
    for name, side_of, index, layer_index in per_frame:
        blocks = unet.input_blocks if side_of == "input" else unet.output_blocks
        described = (shape.input_blocks if side_of == "input" else shape.output_blocks)[index].layers[layer_index]
        module = blocks[index][layer_index]
        for side in (1, 2, 4, 16, 32) if described.kind == "attn" else (4, 16):
            x = torch.randn(batch, described.channels_in, side, side, generator=g)
            emb, context = torch.randn(batch, 1280, generator=g), torch.randn(batch, 77, 768, generator=g)
            measured = peak_values(lambda: forward_timestep_embed([module], x, emb, context, dict(to)))
            predicted = batch * walk(batch, 1, side).layer_values(described, 0)
            rows.append((f"{name}, {side}x{side}", measured, predicted))
    for frames in (8, 16):
        motion.set_video_length(frames, frames)
        batch = 2 * frames
        for index, side, chunk in ((1, 8, 8), (1, 8, 64), (7, 4, 4), (7, 4, 16)):
            module, described = unet.input_blocks[index][2], shape.input_blocks[index].layers[2]
            x = torch.randn(batch, described.channels_in, side, side, generator=g)
            w = walk(batch, frames, side)
            if chunk < side * side:
                measured = peak_values(lambda: run_motion_module_sliced(module, x, None, dict(to), chunk, in_place=True))
                case = f"motion module {described.channels_in}, {frames} frames, {side}x{side}, chunk {chunk}"
            else:
                measured = peak_values(lambda: forward_timestep_embed([module], x, None, None, dict(to)))
                case = f"motion module {described.channels_in}, {frames} frames, {side}x{side}, whole (ADE)"
            rows.append((case, measured, w.motion_values(described, 0, chunk)))
    return rows


def measure_grid(points) -> list[dict]:
    from comfyui_streamline.testing import synthetic

    unet, motion = synthetic.sd15_unet(), synthetic.sd15_motion_model()
    synthetic.inject(unet, motion)
    rows = []
    for frames, side, chunks in points:
        peak = synthetic.sd15_video_call_peak_bytes(unet, motion, frames, side, chunks)
        rows.append({"frames": frames, "side": side, "chunks": chunks, "peak_bytes": peak})
        print(f"  measured {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def tinyvideo_rows(laws) -> list[tuple[str, float, float]]:
    """(case, measured bytes, predicted bytes) for the pack's TinyVideo model: other widths, heads, context
    tokens and levels than SD1.5, so a check of the laws on a model they were not read off."""
    from comfyui_streamline.core.budget import Workload, predict_peak_bytes
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.unet.structure import unet_shape
    from comfyui_streamline.tinyvideo import model as tinyvideo
    from comfyui_streamline.testing.synthetic import video_call_peak_bytes

    unet = tinyvideo.load_model_patcher().model.diffusion_model.float()
    shape, rows = unet_shape(unet), []
    for frames, chunks in TINYVIDEO:
        tinyvideo.set_video_length(unet, frames)
        batch = 2 * frames
        measured = video_call_peak_bytes(unet, frames, 32, tinyvideo.motion_transformer_options(2), chunks,
                                         context=(3, tinyvideo.CONTEXT_DIM))
        predicted = predict_peak_bytes(shape, Workload(batch, frames, 32, 32, context_tokens=3),
                                       SliceConfig(*chunks) if chunks else None, laws)
        name = "unpatched" if not chunks else f"{chunks[0]} / {chunks[1]}"
        rows.append((f"TinyVideo 32x32x{frames}, {name}", measured, predicted))
        print(f"  measured {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def predict(row: dict, laws) -> int:
    from comfyui_streamline.core.budget import Workload, predict_peak_bytes, sd15_shape
    from comfyui_streamline.core.slicing import SliceConfig

    work = Workload(2 * row["frames"], row["frames"], row["side"], row["side"])
    return predict_peak_bytes(sd15_shape(), work, SliceConfig(*row["chunks"]) if row["chunks"] else None, laws)


def print_cases(rows, what: str, value_bytes: int) -> None:
    print(f"| {what} | measured MiB | predicted MiB | error |")
    print("|---|---|---|---|")
    for case, measured, predicted in rows:
        print(f"| {case} | {measured * value_bytes / 2**20:.2f} | {predicted * value_bytes / 2**20:.2f} | "
              f"{predicted / measured - 1:+.1%} |")
    print(f"worst error {max(abs(p / m - 1) for _, m, p in rows):.1%}\n")


def print_grid(rows, laws, title: str) -> None:
    print(f"{title}\n")
    print("| frames | latent | frame/spatial chunk | measured MiB | predicted MiB | error |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for r in rows:
        predicted = predict(r, laws)
        err = predicted / r["peak_bytes"] - 1
        worst = max(worst, abs(err))
        chunks = "unpatched" if not r["chunks"] else f"{r['chunks'][0]} / {r['chunks'][1]}"
        print(f"| {r['frames']} | {r['side']}x{r['side']} | {chunks} | {r['peak_bytes'] / 2**20:.1f} | "
              f"{predicted / 2**20:.1f} | {err:+.1%} |")
    print(f"worst error {worst:.1%}\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    hostenv.enter_for_tool(None, cpu=True, tool="calibrate_budget")
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = args.attention == "sdpa"
    import comfy.ldm.modules.attention

    from comfyui_streamline.core.budget import SDPA, SUB_QUADRATIC

    laws = SDPA if args.attention == "sdpa" else SUB_QUADRATIC
    print(f"attention kernel: {comfy.ldm.modules.attention.optimized_attention.__name__}, laws: {laws}\n")
    if args.only in (None, "layers"):
        print_cases(layer_rows(laws), "layer, latent at its level", 4)
    if args.only in (None, "grid"):
        points = [(f, s, c) for f, s in GRID_SHAPES for c in GRID_CONFIGS]
        if args.cache and args.cache.is_file():
            rows = json.loads(args.cache.read_text())
        else:
            rows = measure_grid(points + HELD_OUT)
            if args.cache:
                args.cache.write_text(json.dumps(rows))
        grid = [r for r in rows if (r["frames"], r["side"]) in GRID_SHAPES]
        print_grid(grid, laws, "Grid (frames x latent x slicing), CFG batched")
        print_grid([r for r in rows if r not in grid], laws, "Further shapes (odd sizes, automatic chunks)")
    if args.only in (None, "tinyvideo"):
        print_cases(tinyvideo_rows(laws), "TinyVideo forward, CFG batched", 1)


if __name__ == "__main__":
    main()
