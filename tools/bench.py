"""Benchmark: one UNet forward, ComfyUI's own vs Streamline-patched, side by side in one run.

Random weights at SD1.5 + mm_sd_v15_v2 shapes, built through ComfyUI's and AnimateDiff-Evolved's
classes; ADE's motion modules injected as ADE does at sampling start; CFG batched (batch = 2 x frames).
Prints, per case: peak activation (GiB) and seconds per forward for both, and their ratios.

Peak activation is core/meter.py's window: on CUDA the caching allocator's active bytes above the memory
held before the forward (counters read, never reset; exact: a ballast block lifts this process's earlier
peak out of the way), on CPU the live-tensor counter (core/memtrace.py). Next to each measurement:
the Memory Budget's prediction (core/budget.py) for the same forward, and its error.

With --budget-gb the Streamline run plans its slices with the Memory Budget (as the node does); with
--cap-memory too, the CUDA process is held to the weights plus that budget
(torch.cuda.set_per_process_memory_fraction), so a forward that needs more fails with out-of-memory
(reported as OOM, not fatal): ComfyUI's forward against Streamline's on a card that small.

    python tools/bench.py --device cuda                       # the README table (GPU)
    python tools/bench.py --device cuda --cases 768x768x32 --budget-gb 4 --cap-memory
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
    p.add_argument("--chunks", nargs="+", metavar="F/S",
                   help="several Streamline settings, frame_chunk/spatial_chunk each, measured against one baseline "
                        "(overrides --frame-chunk/--spatial-chunk)")
    p.add_argument("--budget-gb", type=float, default=0.0,
                   help="plan Streamline's slices with the Memory Budget for this activation budget (GB)")
    p.add_argument("--cap-memory", action="store_true",
                   help="CUDA: hold the process to the weights plus --budget-gb (forwards that need more OOM)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per variant (after one warm-up)")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


class Variant:
    """One way to run the UNet: ComfyUI's forward, or through the Streamline wrapper."""

    def __init__(self, name: str, state=None):
        self.name, self.state = name, state

    def options(self, synthetic) -> dict:
        to = synthetic.ade_transformer_options(2)
        return to if self.state is None else synthetic.with_streamline(to, state=self.state)


def measure(unet, variant: Variant, synthetic, inputs, device: str, repeats: int, capped: bool = False) -> dict | None:
    """Peak activation, seconds per forward and output; None if the forward ran out of memory. `capped`:
    the process is held to a memory cap (--cap-memory), where the meter's ballast would eat the budget."""
    import torch

    x, t, c = inputs
    try:
        return _measure(unet, variant, synthetic, x, t, c, device, repeats, capped)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _measure(unet, variant: Variant, synthetic, x, t, c, device: str, repeats: int, capped: bool = False) -> dict:
    import torch
    from comfyui_streamline.core.meter import measure_peak

    def forward():
        return unet(x, t, c, transformer_options=variant.options(synthetic))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        # CUDA: the allocator's active bytes above what is held before the forward, never reset; the ballast
        # (this process is the bench's own) makes the window exact under an earlier, higher peak; under
        # --cap-memory it would eat the cap: op-boundary samples instead (a lower bound, "~" in the table)
        with measure_peak(device, ballast=not capped, sample=capped) as window:
            out = forward()
        peak = window.peak.bytes
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            forward()
            sync()
            times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "exact": window.peak.exact, "s_per_forward": statistics.median(times),
            "out": out.float().cpu()}


def cap_cuda_memory(activation_bytes: int) -> int:
    """Hold this process to what it holds now (weights, CUDA context aside) plus `activation_bytes`."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    cap = torch.cuda.memory_reserved() + activation_bytes
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    return cap


def gib(value, exact: bool = True) -> str:
    return "OOM" if value is None else f"{'' if exact else '~'}{value / 2**30:.3f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="bench")

    import torch
    from comfyui_streamline.core.budget import Workload, predict_peak_bytes
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.techniques.budget import BudgetPlanner
    from comfyui_streamline.host.attention import attention_laws
    from comfyui_streamline.techniques.slicing import StreamlineState
    from comfyui_streamline.families.unet.structure import unet_shape
    from comfyui_streamline.testing import synthetic

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but CUDA is not available (use --device cpu)")
    if args.cap_memory and (args.device != "cuda" or args.budget_gb <= 0):
        raise SystemExit("bench: --cap-memory needs --device cuda and --budget-gb")
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    cases = [parse_case(c) for c in (args.cases or (GPU_CASES if args.device == "cuda" else CPU_CASES))]
    pe_len = max(32, max(frames for _, _, frames in cases))
    unet = synthetic.sd15_unet(dtype=dtype, device=args.device, seed=0)
    motion = synthetic.sd15_motion_model(pe_len=pe_len, dtype=dtype, device=args.device, seed=1)
    synthetic.inject(unet, motion)
    budget = int(args.budget_gb * 2**30)
    if budget:
        configs = [SliceConfig()]
    elif args.chunks:
        configs = [SliceConfig(*(int(v) for v in text.split("/"))) for text in args.chunks]
    else:
        configs = [SliceConfig(frame_chunk=args.frame_chunk, spatial_chunk=args.spatial_chunk)]
    baseline = Variant("ComfyUI")
    patched_variants = [Variant("Streamline", StreamlineState(c, planner=BudgetPlanner(budget) if budget else None))
                        for c in configs]
    laws, shape = attention_laws(), unet_shape(unet)
    cap = cap_cuda_memory(budget) if args.cap_memory else None

    print(f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, {dtype}, "
          f"motion-module position length {pe_len}, "
          f"{f'Memory Budget {args.budget_gb:g} GB' if budget else ', '.join(map(str, configs))}, attention laws "
          f"{'SDPA' if laws.scores == 0 else 'sub-quadratic'}, median of {args.repeats} forwards"
          + (f", process capped at {cap / 2**30:.2f} GiB (weights + budget)" if cap else ""))
    header = (f"{'case (WxHxF, CFG)':>20} {'batch':>5} | {'slices (frame/spatial)':>22} | "
              f"{'ComfyUI GiB':>11} {'predicted':>9} | {'Streamline GiB':>14} {'predicted':>9} | {'mem ratio':>9} | "
              f"{'ComfyUI s':>9} {'Streamline s':>12} {'time ratio':>10} | {'max rel diff':>12}")
    print(header)
    print("-" * len(header))

    def error(measured, predicted):
        return "" if measured is None else f"{predicted / measured['peak_bytes'] - 1:+.1%}"

    def seconds(measured):
        return "OOM" if measured is None else f"{measured['s_per_forward']:.3f}"

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
        work = Workload(batch, frames, height // 8, width // 8, dtype_bytes=inputs[0].element_size())
        predicted_base = predict_peak_bytes(shape, work, None, laws)
        base = measure(unet, baseline, synthetic, inputs, args.device, args.repeats, cap is not None)
        for variant in patched_variants:
            chosen = variant.state.config_for(unet, inputs[0], inputs[2])
            predicted_patched = predict_peak_bytes(shape, work, chosen, laws)
            patched = measure(unet, variant, synthetic, inputs, args.device, args.repeats, cap is not None)
            settled = variant.state.config_for(unet, inputs[0], inputs[2])
            if settled != chosen:  # the out-of-memory fallback (techniques/slicing.py) made the slices finer
                print(f"  Streamline ran out of memory with {chosen} and went on with {settled}")
            row = {
                "case": f"{width}x{height}x{frames}", "batch": batch,
                "frame_chunk": chosen.frame_chunk, "spatial_chunk": chosen.spatial_chunk,
                "fallback": None if settled == chosen else str(settled),
                "baseline_gib": base and base["peak_bytes"] / 2**30,
                "patched_gib": patched and patched["peak_bytes"] / 2**30,
                "baseline_predicted_gib": predicted_base / 2**30, "patched_predicted_gib": predicted_patched / 2**30,
                "baseline_s": base and base["s_per_forward"], "patched_s": patched and patched["s_per_forward"],
            }
            if base and patched:
                row["memory_ratio"] = base["peak_bytes"] / patched["peak_bytes"]
                row["time_ratio"] = patched["s_per_forward"] / base["s_per_forward"]
                row["max_rel_diff"] = ((patched["out"] - base["out"]).abs().max() / base["out"].abs().max()).item()
            rows.append(row)
            print(f"{row['case']:>20} {batch:>5} | {f'{chosen.frame_chunk} / {chosen.spatial_chunk}':>22} | "
                  f"{gib(base and base['peak_bytes'], not base or base['exact']):>11} {error(base, predicted_base):>9} | "
                  f"{gib(patched and patched['peak_bytes'], not patched or patched['exact']):>14} {error(patched, predicted_patched):>9} | "
                  f"{row.get('memory_ratio', 0):>8.2f}x | {seconds(base):>9} {seconds(patched):>12} "
                  f"{row.get('time_ratio', 0):>9.2f}x | {row.get('max_rel_diff', float('nan')):>12.2e}", flush=True)
            del patched
        del inputs, base
    print("predicted: the error of the Memory Budget's prediction (core/budget.py) for the same forward")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": args.device, "dtype": str(dtype), "configs": [str(c) for c in configs],
                                               "budget_gb": args.budget_gb, "cap_bytes": cap,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
