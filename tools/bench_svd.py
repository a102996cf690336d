"""Benchmark: SVD's video UNet, ComfyUI's own forward vs the sliced one (families/svd/forward.py), side by side.

Random weights at SVD's real layout (svd_layout(320): channels 320/640/1280/1280, ~1.5G parameters),
built with ComfyUI's UNetModel class on the device, fp16 on CUDA; inputs as SVD img2vid gets them
(8 channels, one CLIP-image token, cond/uncond batched: batch = 2 x frames). Rows, each printed (and
appended to --markdown, flushed) as soon as it is measured:
- per forward, at 576x1024 (latent 72x128) with 14 and 25 frames: ComfyUI, a chosen slicing and the
  Memory Budget's plan (families/svd/laws.py) for --budget-gb: peak activation (core/meter.py: CUDA active
  bytes above what was held before, counters never reset; CPU: the live-tensor counter) and seconds, the
  prediction and its error, the ratios to ComfyUI's forward and the largest difference of the output;
- Step Rehash: the FLOPs of a rehash call (shallow path, cache at the second-to-last output block) as a
  share of a full call, counted with torch.utils.flop_counter at the real shapes on the meta device, and
  what that makes of 25 steps with 13 full (the paper's key steps) for Step Rehash and for DeepCache-style
  reuse at the same full steps and cache point (the same FLOPs: they differ in what the rehash steps take).

    python tools/bench_svd.py --device cuda --budget-gb 4 --markdown svd.md
    python tools/bench_svd.py --device cpu --quick          # tiny shapes (64 channels, 8x8, 5 frames), ~1 minute
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402
from markdown_rows import Rows  # noqa: E402

REAL = dict(model_channels=320, height=72, width=128, frames=(14, 25), chunks=(4, 1024))
QUICK = dict(model_channels=64, height=8, width=8, frames=(5,), chunks=(2, 16))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny shapes (the plumbing; used by the tests)")
    p.add_argument("--frames", type=int, nargs="+", help="video lengths (default: 14 25; --quick: 5)")
    p.add_argument("--chunks", metavar="F/S", help="the chosen slicing, frame_chunk/spatial_chunk (default 4/1024)")
    p.add_argument("--budget-gb", type=float, default=4.0, help="Memory Budget for the planned row (GiB)")
    p.add_argument("--repeats", type=int, default=2, help="timed forwards per variant (after one warm-up)")
    p.add_argument("--markdown", help="append each row to this markdown file as it is measured")
    return p.parse_args(argv)


def build(model_channels: int, dtype, device):
    import torch

    from comfyui_streamline.testing.model_families import svd_layout

    unet = svd_layout(model_channels, dtype=dtype, device=device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # random weights on the device (fan-in scaled), fast at 1.5G parameters
        for name, p in unet.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) / p[0].numel() ** 0.5)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0)
                        + 0.1 * torch.randn(p.shape, generator=g, device=device, dtype=torch.float32))
    return unet


def svd_inputs(frames: int, height: int, width: int, dtype, device):
    import torch

    def randn(*shape):
        if device == "meta":
            return torch.empty(shape, device="meta", dtype=dtype)
        return torch.randn(shape, generator=g, device=device).to(dtype)

    g = torch.Generator(device=device).manual_seed(1) if device != "meta" else None
    batch = 2 * frames  # cond/uncond batched
    x = randn(batch, 8, height, width)
    context = randn(2, 1, 1024).repeat_interleave(frames, 0)
    y = randn(2, 768).repeat_interleave(frames, 0)
    return x, torch.full((batch,), 0.7, device=device), context, y, {"num_video_frames": frames}


def measure(forward, device: str, repeats: int):
    """(output, peak activation bytes, best seconds) of `forward()`."""
    import torch

    from comfyui_streamline.core.meter import measure_peak

    with torch.inference_mode():
        if device == "cuda":
            forward()  # warm-up
        # CUDA: active bytes above what is held before, counters never reset, exact (ballast); CPU: live tensors
        with measure_peak(device, ballast=True) as window:
            out = forward()
        peak = window.peak.bytes
        seconds = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            forward()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return out, peak, min(seconds)


def forward_rows(rows: Rows, unet, spec: dict, args, dtype) -> None:
    from comfyui_streamline.core.plan_search import BudgetError, format_bytes
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.svd.laws import SDPA, SUB_QUADRATIC, plan_svd, predict_svd_peak_bytes
    from comfyui_streamline.host.log import LogOnce
    from comfyui_streamline.families.svd.structure import read_svd_structure, svd_work
    from comfyui_streamline.families.svd.forward import svd_forward

    laws = SDPA if args.device == "cuda" else SUB_QUADRATIC
    structure, log = read_svd_structure(unet), LogOnce()
    frame_chunk, spatial_chunk = (int(v) for v in args.chunks.split("/")) if args.chunks else spec["chunks"]
    rows.line("| frames | forward | peak activation | predicted (error) | seconds | memory vs ComfyUI | time vs ComfyUI | max diff |")
    rows.line("|---|---|---|---|---|---|---|---|")
    for frames in args.frames or spec["frames"]:
        x, t, c, y, kw = svd_inputs(frames, spec["height"], spec["width"], dtype, args.device)
        work = svd_work(x, c, frames)
        variants = [("ComfyUI", None), (f"sliced {frame_chunk}/{spatial_chunk}", SliceConfig(frame_chunk, spatial_chunk))]
        try:
            plan = plan_svd(structure, work, int(args.budget_gb * 2**30), laws)
            variants.append((f"budget {args.budget_gb:g} GiB: {plan.config.frame_chunk}/{plan.config.spatial_chunk}",
                             plan.config))
        except BudgetError as e:
            rows.line(f"| {frames} | budget {args.budget_gb:g} GiB | {e} | | | | | |")
        base = None
        for name, config in variants:
            if config is None:
                forward = lambda: unet(x, t, c, y, transformer_options={}, **kw)  # noqa: E731
            else:
                forward = lambda config=config: svd_forward(unet, config, log, x, t, c, y, None, {}, **kw)  # noqa: E731
            out, peak, seconds = measure(forward, args.device, args.repeats)
            predicted = predict_svd_peak_bytes(structure, work, config, laws)
            if base is None:
                base = (out, peak, seconds)
            diff = ((out.float() - base[0].float()).abs().max() / base[0].float().abs().max()).item()
            rows.line(f"| {frames} | {name} | {format_bytes(peak)} | {format_bytes(predicted)} ({predicted / peak - 1:+.1%}) "
                      f"| {seconds:.3f} | {base[1] / peak:.2f}x less | {seconds / base[2]:.2f}x | {diff:.1e} |")
            del out


def rehash_flops(model_channels: int, height: int, width: int, frames: int, cache_block: int = -1):
    """FLOPs of a full call and of a rehash call (svd_forward with Step Rehash's call state), meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from comfyui_streamline.core.rehash import RehashConfig, resolve_output_block
    from comfyui_streamline.core.slicing import UNSLICED
    from comfyui_streamline.techniques.rehash import RehashCallState, RehashRun
    from comfyui_streamline.host.log import LogOnce
    from comfyui_streamline.host.options import REHASH_CALL_KEY
    from comfyui_streamline.families.svd.forward import svd_forward
    from comfyui_streamline.testing.model_families import svd_layout

    unet = svd_layout(model_channels, dtype=torch.float16, device="meta")
    block = resolve_output_block(cache_block, len(unet.output_blocks))
    run = RehashRun(RehashConfig(mode="fixed", reuse="hold"), 2, {0}, (0.0, 1e9))
    x, t, c, y, kw = svd_inputs(frames, height, width, torch.float16, "meta")
    from comfy.ldm.modules.attention import attention_pytorch

    def sdpa(func, *args, **kwargs):  # on the meta device: PyTorch SDPA (ComfyUI's CUDA default)
        return attention_pytorch(*args, **kwargs)

    flops = []
    for step in (0, 1):
        call = RehashCallState(run, block, step, 1.0 - 0.5 * step, [("cond", ()), ("uncond", ())])
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            to = {REHASH_CALL_KEY: call, "optimized_attention_override": sdpa}
            svd_forward(unet, UNSLICED, LogOnce(), x, t, c, y, None, to, **kw)
        assert call.rehashed == (step == 1)
        flops.append(counter.get_total_flops())
    return flops[0], flops[1], block


def rehash_rows(rows: Rows, spec: dict, frames: int, steps: int = 25, full: int = 13) -> None:
    full_flops, rehash_flops_, block = rehash_flops(spec["model_channels"], spec["height"], spec["width"], frames)
    share = rehash_flops_ / full_flops
    total = (full + (steps - full) * share) / steps
    rows.line("")
    rows.line("| Step Rehash, one call | FLOPs | share of a full call | 25 steps, 13 full: model FLOPs | speedup bound |")
    rows.line("|---|---|---|---|---|")
    rows.line(f"| full call ({frames} frames, {spec['height'] * 8}x{spec['width'] * 8}) | {full_flops / 1e12:.2f} T | 100% | | |")
    rows.line(f"| rehash call, cache after output block {block} (Step Rehash) | {rehash_flops_ / 1e12:.3f} T | {share:.1%} "
              f"| {total:.1%} | {1 / total:.2f}x |")
    rows.line(f"| DeepCache-style (hold, same cache point, same full steps) | {rehash_flops_ / 1e12:.3f} T | {share:.1%} "
              f"| {total:.1%} | {1 / total:.2f}x |")


def main(argv=None) -> None:
    args = parse_args(argv)
    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="bench_svd")
    import torch

    spec = QUICK if args.quick else REAL
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    rows = Rows(args.markdown)
    rows.line(f"SVD UNet (svd_layout({spec['model_channels']}), random weights), {args.device}, {dtype}, "
              f"{spec['height'] * 8}x{spec['width'] * 8}, cond/uncond batched")
    rows.line("")
    forward_rows(rows, build(spec["model_channels"], dtype, args.device), spec, args, dtype)
    rehash_rows(rows, spec, (args.frames or spec["frames"])[0])


if __name__ == "__main__":
    main()
