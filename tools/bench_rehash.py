"""Benchmark: end-to-end AnimateDiff sampling with Step Rehash against full sampling, ComfyUI's
EasyCache and LazyCache, and a DeepCache-style fixed interval, on the same seed and conditioning.

Prints wall time, speedup over full sampling (measured side by side in this run) and fidelity of the
final latents against full sampling (PSNR, SSIM). With random weights (all this machine can have)
fidelity numbers say little about a real model; they are printed with that caveat.

    python tools/bench_rehash.py --device cuda                 # 512x512x16, 25 steps (GPU)
    python tools/bench_rehash.py --device cpu                  # 64x64x8, quick
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--size", help="WIDTHxHEIGHTxFRAMES (default 512x512x16 on cuda, 64x64x8 on cpu)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--full-steps", type=int, default=13, help="key-step search: steps computed in full (paper: 13)")
    p.add_argument("--threshold", type=float, default=0.15, help="adaptive Step Rehash threshold")
    p.add_argument("--easycache-threshold", type=float, default=0.2)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--streamline", action="store_true", help="also apply Streamline Model Patch (automatic chunks)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="bench_rehash")

    import nodes
    import torch
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    from comfyui_streamline.core.fidelity import psnr, ssim
    from comfyui_streamline.core.rehash import RehashConfig, fixed_full_steps
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.nodes.model_patch import apply_streamline
    from comfyui_streamline.nodes.step_rehash import STATE_KEY, apply_rehash
    from comfyui_streamline.tools import synthetic

    width, height, frames = (int(v) for v in (args.size or ("512x512x16" if args.device == "cuda" else "64x64x8")).split("x"))
    work = Path(tempfile.mkdtemp(prefix="streamline-bench-"))
    model = synthetic.ade_model_patcher(work / "animatediff_models", pe_len=max(32, frames))
    if args.streamline:
        model = apply_streamline(model, SliceConfig())
    g = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]
    latent = {"samples": torch.zeros(frames, 4, height // 8, width // 8)}

    def sample(m) -> tuple[torch.Tensor, float]:
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            (out,) = nodes.common_ksampler(m, args.seed, args.steps, args.cfg, args.sampler, args.scheduler,
                                           positive, negative, latent)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out["samples"].float(), time.perf_counter() - start

    def rehash(**kw):
        return apply_rehash(model, RehashConfig(**kw), keystep_store=work / "keysteps.json")

    def full_count(m) -> str:
        state = m.model_options["transformer_options"].get(STATE_KEY)
        report = state.last.report if state is not None else None
        return f"{report.full}/{report.steps}" if report else "-"

    interval_full = len(fixed_full_steps(args.steps, 2, 2, 1))
    methods = [
        ("full (ComfyUI + ADE)", model),
        (f"Step Rehash key-step ({args.full_steps} full)", rehash(mode="keystep", full_steps=args.full_steps)),
        (f"Step Rehash fixed (interval 2, warm-up 2, tail 1: {interval_full} full)", rehash(mode="fixed", interval=2, warmup=2, tail=1)),
        (f"Step Rehash adaptive (threshold {args.threshold})", rehash(mode="adaptive", threshold=args.threshold)),
        ("DeepCache-style (every 2nd step full)", rehash(mode="fixed", interval=2, warmup=0, tail=0)),
        ("DeepCache-style (every 3rd step full)", rehash(mode="fixed", interval=3, warmup=0, tail=0)),
        (f"EasyCache (threshold {args.easycache_threshold})", EasyCacheNode.execute(model, args.easycache_threshold, 0.15, 0.95, False).result[0]),
        (f"LazyCache (threshold {args.easycache_threshold})", LazyCacheNode.execute(model, args.easycache_threshold, 0.15, 0.95, False).result[0]),
    ]
    print(f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, {width}x{height}x{frames}, "
          f"{args.steps} steps {args.sampler}/{args.scheduler}, cfg {args.cfg}, seed {args.seed}, "
          f"Streamline slicing {'on' if args.streamline else 'off'}")
    sample(model)  # warm-up (kernels, allocator, ADE injection caches)
    calibration = methods[1][1]
    _, calibration_s = sample(calibration)
    print(f"key-step calibration run (all steps full, result saved for the runs below): {calibration_s:.2f} s")
    header = f"{'method':>56} | {'full steps':>10} | {'time s':>8} | {'speedup':>7} | {'PSNR dB':>8} | {'SSIM':>6}"
    print(header)
    print("-" * len(header))
    reference, reference_s = None, None
    for name, m in methods:
        try:
            out, seconds = sample(m)
        except Exception as e:  # a method that cannot run this case is reported, not fatal
            print(f"{name:>56} | failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}", flush=True)
            continue
        if reference is None:
            reference, reference_s = out, seconds
        print(f"{name:>56} | {full_count(m):>10} | {seconds:>8.2f} | {reference_s / seconds:>6.2f}x | "
              f"{psnr(out, reference):>8.2f} | {ssim(out, reference):>6.3f}", flush=True)
    print("Fidelity (PSNR/SSIM of final latents vs full sampling) is measured on random weights: it does not "
          "predict quality on a trained model.")


if __name__ == "__main__":
    main()
