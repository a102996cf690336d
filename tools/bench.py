"""Benchmark: one UNet forward, ComfyUI's own vs Streamline-patched, side by side in one run.

Random weights at SD1.5 + mm_sd_v15_v2 shapes, built through ComfyUI's and AnimateDiff-Evolved's
classes; ADE's motion modules injected as ADE does at sampling start; CFG batched (batch = 2 x frames).
Prints, per case: peak activation (GiB) and seconds per forward for both, and their ratios.

Peak activation is measured with torch.cuda.max_memory_allocated above the memory held before the
forward on CUDA, and with the live-tensor counter (core/memtrace.py) on CPU.

    python tools/bench.py --device cuda                       # the README table (GPU)
    python tools/bench.py --device cpu --cases 128x128x16     # a quick CPU run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402

GPU_CASES = ["512x512x16", "768x768x32", "512x512x128"]
CPU_CASES = ["128x128x16"]


def parse_case(text: str) -> tuple[int, int, int]:
    width, height, frames = (int(v) for v in text.lower().split("x"))
    if width % 8 or height % 8:
        raise SystemExit(f"case {text}: width and height must be multiples of 8")
    return width, height, frames


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--cases", nargs="+", help=f"WIDTHxHEIGHTxFRAMES (default: {GPU_CASES} on cuda, {CPU_CASES} on cpu)")
    p.add_argument("--frame-chunk", type=int, default=0, help="Streamline frame_chunk (0 = automatic)")
    p.add_argument("--spatial-chunk", type=int, default=0, help="Streamline spatial_chunk (0 = automatic)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per variant (after one warm-up)")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


class Variant:
    """One way to run the UNet: ComfyUI's forward, or through the Streamline wrapper."""

    def __init__(self, name: str, state=None):
        self.name, self.state = name, state

    def options(self, synthetic) -> dict:
        import comfy.patcher_extension

        from comfyui_streamline.nodes.model_patch import STATE_KEY, streamline_wrapper

        to = synthetic.ade_transformer_options(2)
        if self.state is not None:
            to[STATE_KEY] = self.state
            to["wrappers"] = {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"streamline": [streamline_wrapper]}}
        return to


def measure(unet, variant: Variant, synthetic, inputs, device: str, repeats: int) -> dict:
    import torch

    from comfyui_streamline.core.memtrace import LiveTensorMeter

    x, t, c = inputs

    def forward():
        return unet(x, t, c, transformer_options=variant.options(synthetic))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        if device == "cuda":
            torch.cuda.empty_cache()
            sync()
            held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = forward()
            sync()
            peak = torch.cuda.max_memory_allocated() - held
        else:
            with LiveTensorMeter() as meter:
                out = forward()
            peak = meter.peak_bytes
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            forward()
            sync()
            times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "s_per_forward": statistics.median(times), "out": out.float().cpu()}


def main(argv=None) -> None:
    args = parse_args(argv)
    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="bench")

    import torch

    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.nodes.model_patch import StreamlineState
    from comfyui_streamline.tools import synthetic

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but CUDA is not available (use --device cpu)")
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    cases = [parse_case(c) for c in (args.cases or (GPU_CASES if args.device == "cuda" else CPU_CASES))]
    pe_len = max(32, max(frames for _, _, frames in cases))
    unet = synthetic.sd15_unet(dtype=dtype, device=args.device, seed=0)
    motion = synthetic.sd15_motion_model(pe_len=pe_len, dtype=dtype, device=args.device, seed=1)
    synthetic.inject(unet, motion)
    config = SliceConfig(frame_chunk=args.frame_chunk, spatial_chunk=args.spatial_chunk)
    variants = [Variant("ComfyUI"), Variant("Streamline", StreamlineState(config))]

    print(f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, {dtype}, "
          f"motion-module position length {pe_len}, {config}, median of {args.repeats} forwards")
    header = (f"{'case (WxHxF, CFG)':>20} {'batch':>5} | {'ComfyUI GiB':>11} {'Streamline GiB':>14} {'mem ratio':>9} | "
              f"{'ComfyUI s':>9} {'Streamline s':>12} {'time ratio':>10} | {'max rel diff':>12}")
    print(header)
    print("-" * len(header))
    rows = []
    for width, height, frames in cases:
        motion.set_video_length(frames, frames)
        batch = 2 * frames
        g = torch.Generator().manual_seed(0)
        inputs = (
            torch.randn(batch, 4, height // 8, width // 8, generator=g).to(args.device, dtype),
            torch.full((batch,), 500.0, device=args.device),
            torch.randn(batch, 77, 768, generator=g).to(args.device, dtype),
        )
        base, patched = (measure(unet, v, synthetic, inputs, args.device, args.repeats) for v in variants)
        rel = ((patched["out"] - base["out"]).abs().max() / base["out"].abs().max()).item()
        row = {
            "case": f"{width}x{height}x{frames}", "batch": batch,
            "baseline_gib": base["peak_bytes"] / 2**30, "patched_gib": patched["peak_bytes"] / 2**30,
            "memory_ratio": base["peak_bytes"] / patched["peak_bytes"],
            "baseline_s": base["s_per_forward"], "patched_s": patched["s_per_forward"],
            "time_ratio": patched["s_per_forward"] / base["s_per_forward"], "max_rel_diff": rel,
        }
        rows.append(row)
        print(f"{row['case']:>20} {batch:>5} | {row['baseline_gib']:>11.3f} {row['patched_gib']:>14.3f} "
              f"{row['memory_ratio']:>8.2f}x | {row['baseline_s']:>9.3f} {row['patched_s']:>12.3f} "
              f"{row['time_ratio']:>9.2f}x | {rel:>12.2e}", flush=True)
        del inputs, base, patched
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": args.device, "dtype": str(dtype), "config": str(config),
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
