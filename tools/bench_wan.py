"""Benchmark: Wan 2.1's diffusion model, ComfyUI's own blocks vs the pack's token-sliced ones (families/wan/),
side by side in one run, per forward.

Random weights at Wan 2.1 1.3B shapes (dim 1536, FFN 8960, 12 heads) at 480x832x81 and 14B shapes (dim
5120, FFN 13824, 40 heads) at 720x1280x81, built with ComfyUI's WanModel class on the device in bf16 (fp32
on the CPU), cond and uncond batched, a 512-token prompt. Only --layers of the model's blocks are built
(default 2 of 30 / 40): every block has the same shapes, so the peak activation of a forward is that of
these, and its time grows by the block count (the rows say both). The sliced run reaches the blocks through
the same block-replace hook the node installs. Each row is printed, and appended to --markdown (flushed),
as soon as it is measured: peak activation (core/meter.py: CUDA active bytes above what was held before,
counters never reset; the live-tensor counter on the CPU), seconds per forward, the largest difference,
and the planner's prediction (families/wan/laws.py).

First, what a Step Rehash step costs at these shapes with all the model's blocks (30 / 40): its FLOPs
against a full call's (torch's FlopCounterMode over ComfyUI's WanModel on the meta device: shapes only,
no memory, instant), and the speedup that bounds for K full steps of 25, N / (K + (N - K) * share).

A token_chunk of None is the automatic slice (families/wan/laws.py automatic_token_chunk: the most latent
frames per slice whose predicted peak is within core/plan_search.py's AUTO_PEAK_CLOSENESS of one frame's), as
Streamline Model Patch left at 0 runs it. --case picks cases; "1.3B 480x832x17" is issue 24's defaults case
(7800 tokens: about 8 GB in fp32 on the CPU; --repeats 0 runs one forward per variant).

    python tools/bench_wan.py --device cuda --markdown wan.md
    python tools/bench_wan.py --device cpu --case "1.3B 480x832x17" --repeats 0 --no-flops
    python tools/bench_wan.py --device cpu --quick       # tiny shapes: the plumbing (tests)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402
from markdown_rows import Rows  # noqa: E402

# name: (dim, ffn_dim, heads, width, height, frames, token_chunk; None: the automatic slice)
CASES = {"1.3B 480x832x81": (1536, 8960, 12, 832, 480, 81, 4096),
         "14B 720x1280x81": (5120, 13824, 40, 1280, 720, 81, 2048),
         "1.3B 480x832x17": (1536, 8960, 12, 832, 480, 17, None)}
QUICK = {"tiny 128x128x5": (256, 1024, 2, 128, 128, 5, 16), "tiny 128x128x17": (256, 1024, 2, 128, 128, 17, None)}
FULL_DEPTH = {"1.3B 480x832x81": 30, "14B 720x1280x81": 40, "1.3B 480x832x17": 30, "tiny 128x128x5": 4,
              "tiny 128x128x17": 4}
TEXT_TOKENS = 512


def rehash_share_rows(rows: Rows, cases: dict, steps: int = 25, full_steps: tuple[int, ...] = (13, 10, 9)) -> None:
    """FLOPs of a Step Rehash call (the patch and time embeddings, the first and last blocks, the head: the
    deep blocks skipped; families/wan/rehash.py with cache_block -1) against a full call, CFG batched."""
    import comfy.ops
    import torch
    from comfy.ldm.modules.attention import attention_pytorch
    from comfy.ldm.wan.model import WanModel
    from torch.utils.flop_counter import FlopCounterMode

    rows.line("| case | blocks | full call TFLOP | rehash call TFLOP | share | " +
              " | ".join(f"bound at {k}/{steps} full" for k in full_steps) + " |")
    rows.line("|---|---|---|---|---|" + "---|" * len(full_steps))
    for name, (dim, ffn, heads, width, height, frames, _) in cases.items():
        layers = FULL_DEPTH[name]
        model = WanModel(model_type="t2v", dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers, device="meta",
                         dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
        x = torch.zeros(2, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device="meta", dtype=torch.bfloat16)
        context = torch.zeros(2, TEXT_TOKENS, 4096, device="meta", dtype=torch.bfloat16)
        # SDPA for the count whatever this process's attention (the CPU's sub-quadratic kernel asks the device
        # for free memory, which a meta tensor has none of); its FLOPs are attention's, kernel aside
        options = {"optimized_attention_override": lambda func, *a, **kw: attention_pytorch(*a, **kw)}
        with FlopCounterMode(display=False) as counter:
            model(x, torch.zeros(2, device="meta"), context, transformer_options=options)
        total = counter.get_total_flops()
        block = sum(counter.get_flop_counts()["WanModel.blocks.0"].values())
        rehash = total - (layers - 2) * block  # every block has the same shapes
        share = rehash / total
        bounds = " | ".join(f"{steps / (k + (steps - k) * share):.2f}x" for k in full_steps)
        rows.line(f"| {name} | {layers} | {total / 1e12:.1f} | {rehash / 1e12:.2f} | {share:.1%} | {bounds} |")
    rows.line("")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny shapes (the plumbing; used by the tests)")
    p.add_argument("--layers", type=int, default=2, help="blocks built (all Wan blocks have the same shapes)")
    p.add_argument("--repeats", type=int, default=2, help="timed forwards per variant (after one warm-up); 0: one forward, metered and timed (the meter's "
                   "overhead included)")
    p.add_argument("--markdown", help="append each row to this markdown file as it is measured")
    p.add_argument("--case", action="append", help="only these cases (repeat the flag; default: all)")
    p.add_argument("--no-flops", action="store_true", help="skip the Step Rehash FLOP rows")
    return p.parse_args(argv)


def chosen_cases(args: argparse.Namespace) -> dict:
    cases = QUICK if args.quick else CASES
    unknown = sorted(set(args.case or ()) - set(cases))
    if unknown:
        raise SystemExit(f"bench_wan: unknown case(s) {unknown}; known: {sorted(cases)}")
    return {name: case for name, case in cases.items() if not args.case or name in args.case}


def main(argv=None) -> None:
    args = parse_args(argv)
    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="bench_wan")

    import comfy.ops
    import torch
    from comfy.ldm.wan.model import WanModel

    from comfyui_streamline.core.plan_search import format_bytes
    from comfyui_streamline.families.wan.laws import (SDPA, SUB_QUADRATIC, WanShape, WanWork, automatic_token_chunk,
                                                      forward_peak_bytes)
    from comfyui_streamline.families.wan.block import host_copies_block_input
    from comfyui_streamline.core.meter import measure_peak
    from comfyui_streamline.families.wan.patch import CALL_KEY, SlicedWanBlock, WanCall

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    kernel = SDPA if args.device == "cuda" else SUB_QUADRATIC
    rows = Rows(args.markdown)
    cases = chosen_cases(args)
    if not args.no_flops:
        rehash_share_rows(rows, cases)
    rows.line("| case | blocks | variant | peak activation | predicted | s / forward | memory ratio | time ratio | max diff |")
    rows.line("|---|---|---|---|---|---|---|---|---|")
    for name, (dim, ffn, heads, width, height, frames, chunk) in cases.items():
        torch.manual_seed(0)
        model = WanModel(model_type="t2v", dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=args.layers, in_dim=16,
                         out_dim=16, cross_attn_norm=True, dtype=dtype, device=device,
                         operations=comfy.ops.manual_cast if args.device == "cuda" else comfy.ops.disable_weight_init)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        latent_frames, lh, lw = 1 + (frames - 1) // 4, height // 8, width // 8
        x = torch.randn(2, 16, latent_frames, lh, lw, device=device, dtype=dtype)
        t = torch.full((2,), 500.0, device=device)
        context = torch.randn(2, 512, 4096, device=device, dtype=dtype)
        per_frame = (lh // 2) * (lw // 2)
        tokens = latent_frames * per_frame
        shape = WanShape(dim, ffn, heads, args.layers)
        work = WanWork(2, tokens, 512, dtype_bytes=x.element_size(), input_copy=host_copies_block_input())
        variant = f"token_chunk {chunk}"
        if chunk is None:
            chunk = automatic_token_chunk(shape, work, per_frame, kernel)
            variant = f"automatic, {chunk} of {tokens} tokens"

        def options(token_chunk):
            if token_chunk is None:
                return {}
            blocks = {("double_block", i): SlicedWanBlock(i, lambda to, h, tpf: token_chunk)
                      for i in range(args.layers)}
            return {"patches_replace": {"dit": blocks}, CALL_KEY: WanCall(model.blocks, None, per_frame)}

        def measure(token_chunk):
            with torch.no_grad():
                if args.repeats:
                    model(x, t, context, transformer_options=options(token_chunk))  # warm-up
                start = time.perf_counter()
                with measure_peak(device, ballast=True) as window:  # core/meter.py: exact, never reset
                    out = model(x, t, context, transformer_options=options(token_chunk))
                peak = window.peak.bytes
                seconds = [] if args.repeats else [time.perf_counter() - start]  # 0 repeats: the metered one
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    model(x, t, context, transformer_options=options(token_chunk))
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds.append(time.perf_counter() - start)
            return out, peak, min(seconds)

        try:
            base, base_peak, base_s = measure(None)
        except torch.OutOfMemoryError:
            rows.line(f"| {name} | {args.layers} | ComfyUI | OOM | | | | | |")
            base = None
        if base is not None:
            predicted = forward_peak_bytes(shape, work, None, kernel)
            rows.line(f"| {name} ({tokens} tokens) | {args.layers} | ComfyUI | {format_bytes(base_peak)} | "
                      f"{format_bytes(predicted)} ({predicted / base_peak - 1:+.1%}) | {base_s:.3f} | | | |")
        out, peak, seconds = measure(chunk)
        predicted = forward_peak_bytes(shape, work, chunk, kernel)
        ratios = ("| | |" if base is None else
                  f"| {base_peak / peak:.2f}x less | {seconds / base_s:.2f}x | "
                  f"{((out - base).abs().max() / base.abs().max()).item():.1e} |")
        rows.line(f"| {name} ({tokens} tokens) | {args.layers} | Streamline, {variant} | {format_bytes(peak)} | "
                  f"{format_bytes(predicted)} ({predicted / peak - 1:+.1%}) | {seconds:.3f} " + ratios)
        model = base = out = None  # free the weights before the next case
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
