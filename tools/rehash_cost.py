"""What a Step Rehash step costs against a full UNet call at real SD1.5 shapes, and the end-to-end
speedup that bounds for K full steps of N.

One sampling run computes every step in full; a second computes its first two steps in full and the
third as a rehash step (so the extrapolated reuse has two full steps to draw its line through). Their
difference is one rehash call. Both are counted in FLOPs (torch's FlopCounterMode: matmuls,
convolutions, attention) and timed per UNet call on this device.

The FLOP share of a rehash step bounds what any implementation can gain at this cache point:
N / (K + (N - K) * share) with K of N steps full, before the sampler's own per-step time (which lowers
it further); the ceiling, with free rehash steps, is N / K. FLOP shares barely depend on the frame
count (only temporal attention grows with it), so a few frames on a CPU give the share of 16.

    python tools/rehash_cost.py --device cpu --size 512x512x2          # ~6 min on 2 CPU cores
    python tools/rehash_cost.py --device cuda --size 512x512x16 --cache-blocks -1 9 8
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--size", default="512x512x2", help="WIDTHxHEIGHTxFRAMES in pixels (SD1.5 latent = pixels / 8)")
    p.add_argument("--cache-blocks", type=int, nargs="+", default=[-1],
                   help="Step Rehash cache points to measure (-1 = the default, the second-to-last output block)")
    p.add_argument("--steps", type=int, default=25, help="N of the bound N / (K + (N - K) * share)")
    p.add_argument("--full-steps", type=int, nargs="+", default=[13, 9], help="K values of that bound")
    p.add_argument("--cfg", type=float, default=7.5)
    return p.parse_args(argv)


def speedup_bound(steps: int, full_steps: int, rehash_share: float) -> float:
    """Model-time speedup of K full and N - K rehash steps over N full ones."""
    return steps / (full_steps + (steps - full_steps) * rehash_share)


def main(argv=None) -> None:
    args = parse_args(argv)
    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="rehash_cost")

    import nodes
    import torch
    import torch.utils.flop_counter as flop_counter

    from comfyui_streamline.core.rehash import RehashConfig
    from comfyui_streamline.host.options import REHASH_KEY as STATE_KEY
    from comfyui_streamline.techniques.rehash import apply_rehash
    from comfyui_streamline.testing import synthetic

    width, height, frames = (int(v) for v in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="streamline-rehash-cost-"))
    model = synthetic.ade_model_patcher(work / "animatediff_models", pe_len=max(32, frames))
    positive, negative = synthetic.random_conds()
    latent = {"samples": torch.zeros(frames, 4, height // 8, width // 8)}

    def cpu_sdpa(query, key, value, *_, out_shape=None, **__):
        return flop_counter.sdpa_flop_count(query, key, value)

    # torch has FLOP formulas for the CUDA attention kernels but not for the CPU one
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}

    def sample_flops(m, steps: int) -> int:
        with torch.inference_mode(), flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention) as fc:
            nodes.common_ksampler(m, 0, steps, args.cfg, "euler", "normal", positive, negative, latent)
        return fc.get_total_flops()

    print(f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, SD1.5 UNet + mm_sd_v15_v2 "
          f"shapes (random weights), {args.size}, cfg {args.cfg} (cond and uncond in one call)", flush=True)
    full_flops = sample_flops(model, 1)
    print(f"full UNet call: {full_flops / 1e12:.3f} TFLOP", flush=True)
    header = (f"{'cache block':>11} | {'rehash TFLOP':>12} | {'FLOP share':>10} | {'time ms full/rehash':>19} | "
              f"{'time share':>10} | " + " | ".join(f"bound {k}/{args.steps} full" for k in args.full_steps))
    print(header)
    print("-" * len(header))
    for cache_block in args.cache_blocks:
        # warm-up 1, then every `steps`-th step from step 1: steps 0 and 1 full, step 2 rehashed
        patched = apply_rehash(model, RehashConfig(mode="fixed", interval=args.steps, warmup=1, tail=0,
                                                   split_point=cache_block))
        rehash_flops = sample_flops(patched, 3) - 2 * full_flops
        report = patched.model_options["transformer_options"][STATE_KEY].last.report
        if report.calls_rehashed == 0:
            raise SystemExit(f"rehash_cost: the third step was not rehashed ({report.text()})")
        full_ms = 1000 * report.full_call_seconds / report.calls_full
        rehash_ms = 1000 * report.rehash_call_seconds / report.calls_rehashed
        share = rehash_flops / full_flops
        bounds = " | ".join(f"{speedup_bound(args.steps, k, share):>{len(f'bound {k}/{args.steps} full') - 1}.3f}x"
                            for k in args.full_steps)
        label = "default" if cache_block < 0 else str(cache_block)
        print(f"{label:>11} | {rehash_flops / 1e12:>12.4f} | {100 * share:>9.2f}% | {full_ms:>8.0f} / {rehash_ms:>8.0f} | "
              f"{100 * rehash_ms / full_ms:>9.1f}% | {bounds}", flush=True)
    print("Ceiling with free rehash steps: " + ", ".join(f"{args.steps / k:.3f}x at {k}/{args.steps}" for k in args.full_steps)
          + ". The bounds leave out the sampler's own time per step, which lowers end-to-end speedups further.")


if __name__ == "__main__":
    main()
