"""Every GPU benchmark of the pack in one command, each row appended to a markdown file as soon as it is
measured (flushed), each benchmark under its own time limit, so an interrupted run keeps what it measured
and one slow part cannot eat the rest.

    python tools/gpu_evidence.py --out $OUT/gpu_evidence.md            # H100/H200: at most ~8 minutes
    python tools/gpu_evidence.py --device cpu --quick --out /tmp/e.md  # the plumbing, tiny cases (tests)

Adding a benchmark is one line in BENCHMARKS: a name, the script under tools/, its arguments on the GPU and
in --quick mode, and its time limit in seconds. A script that does not exist (yet) is listed as skipped. The benchmark "offload" is this file's own: ComfyUI's forward, Streamline, and Streamline with
skip offload side by side per UNet forward (peak activation, time, bit-identity, the planner's prediction).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from markdown_rows import append  # noqa: E402


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str  # under tools/; "gpu_evidence.py" runs this file's own benchmark
    gpu_args: tuple[str, ...]
    quick_args: tuple[str, ...]
    limit_s: int  # on the GPU; --quick uses QUICK_LIMIT_S


# fmt: off
BENCHMARKS = [
    Benchmark("offload", "gpu_evidence.py", ("--offload-bench",), ("--offload-bench",), 90),
    Benchmark("paper_metric", "paper_metric.py", ("--limit-s", "32"), ("--quick",), 130),
    Benchmark("bench", "bench.py", ("--cases", "512x512x16", "768x768x32", "512x512x128", "--chunks", "8/2048", "4/512", "0/0", "--repeats", "2"), ("--cases", "64x64x4", "--chunks", "2/16", "--repeats", "1"), 40),
    Benchmark("bench_rehash", "bench_rehash.py", ("--prompts", "red circle bounce", "--steps", "25"), ("--prompts", "red circle bounce", "--steps", "2"), 30),
    Benchmark("rehash_cost", "rehash_cost.py", ("--size", "512x512x16"), ("--size", "64x64x2"), 20),
    Benchmark("svd", "bench_svd.py", ("--frames", "14", "--repeats", "1"), ("--quick",), 45),
    Benchmark("wan", "bench_wan.py", ("--repeats", "1"), ("--quick",), 25),
    # the SVD img2vid workflow, whole process (a peak is one step's: 4 steps measure what 25 would)
    Benchmark("svd_process", "paper_metric.py", ("--model", "svd", "--steps", "4", "--limit-s", "30"),
              ("--model", "svd", "--quick"), 100),
]
# fmt: on
QUICK_LIMIT_S = 240
GPU_TOTAL_S = 480  # the budget the limits above add up to at most (an H100/H200)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="markdown file the rows are appended to")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny cases (the plumbing test on the CPU)")
    p.add_argument("--only", nargs="+", help="run only these benchmarks (names in BENCHMARKS)")
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--offload-bench", action="store_true", help=argparse.SUPPRESS)  # the "offload" benchmark itself
    return p.parse_args(argv)


def run_benchmark(bench: Benchmark, args: argparse.Namespace, out: Path) -> str:
    """Run one benchmark in its own process under its time limit, its output lines appended as they come."""
    script = TOOLS / bench.script
    if not script.exists():
        append(out, f"\n## {bench.name}\n\nskipped: tools/{bench.script} does not exist yet\n")
        return "skipped"
    extra = list(bench.quick_args if args.quick else bench.gpu_args)
    if bench.script == "gpu_evidence.py":
        extra += ["--out", str(out)] + (["--quick"] if args.quick else [])
    command = [sys.executable, str(script), "--device", args.device] + extra
    if args.comfy:
        command += ["--comfy", args.comfy]
    limit = QUICK_LIMIT_S if args.quick else bench.limit_s
    fence = "" if bench.script == "gpu_evidence.py" else "```\n"  # its own rows are a markdown table
    append(out, f"\n## {bench.name}\n\n`{' '.join(['python', 'tools/' + bench.script] + command[2:])}` "
                f"(limit {limit} s)\n\n{fence}")
    start = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    status = "ok"
    try:
        import selectors

        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            left = limit - (time.monotonic() - start)
            if left <= 0:
                status = f"stopped at its limit ({limit} s)"
                break
            if selector.select(timeout=min(left, 5.0)):
                line = process.stdout.readline()
                if not line:
                    break
                append(out, line)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)  # the benchmark's own process group, started above
        process.wait()
    if status == "ok" and process.returncode != 0:
        status = f"failed (exit {process.returncode})"
    append(out, f"{fence}\n{bench.name}: {status}, {time.monotonic() - start:.0f} s\n")
    return status


# -- the "offload" benchmark: one UNet forward, ComfyUI vs Streamline vs Streamline + skip offload --------------

GPU_CASES = [((512, 512, 16), (2, 512)), ((768, 768, 32), (4, 1024)), ((512, 512, 128), (0, 0))]
QUICK_CASES = [((64, 64, 4), (2, 16))]


def offload_bench(args: argparse.Namespace) -> None:
    import hostenv

    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="gpu_evidence")
    import torch
    from comfyui_streamline.core.budget import Workload, offload_traffic, predict_peak_bytes
    from comfyui_streamline.core.memtrace import LiveTensorMeter
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.nodes.memory_budget import attention_laws
    from comfyui_streamline.nodes.structure import unet_shape
    from comfyui_streamline.tools import synthetic

    out = Path(args.out)
    cuda = args.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    cases = QUICK_CASES if args.quick else GPU_CASES
    unet = synthetic.sd15_unet(dtype=dtype, device=args.device, seed=0)
    motion = synthetic.sd15_motion_model(pe_len=max(32, max(c[0][2] for c in cases)), dtype=dtype, device=args.device,
                                         seed=1)
    synthetic.inject(unet, motion)
    shape, laws = unet_shape(unet), attention_laws()
    append(out, "| case (WxHxF, CFG) | variant | peak activation GiB | predicted (error) | s / forward | memory ratio "
                "| time ratio | host GiB moved | output |\n|---|---|---|---|---|---|---|---|---|\n")

    def measure(x, t, c, config):
        to = synthetic.ade_transformer_options(2)
        if config is not None:
            synthetic.with_streamline(to, config)

        def forward():
            return unet(x, t, c, transformer_options=to)

        with torch.inference_mode():
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.synchronize()
                held = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                result = forward()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - held
            else:
                with LiveTensorMeter() as meter:
                    result = forward()
                peak = meter.peak_bytes
            times = []
            for _ in range(1 if args.quick else 2):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                forward()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return peak, statistics.median(times), result

    for (width, height, frames), chunks in cases:
        motion.set_video_length(frames, frames)
        batch = 2 * frames
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 4, height // 8, width // 8, generator=g).to(args.device, dtype)
        c = torch.randn(batch, 77, 768, generator=g).to(args.device, dtype)
        t = torch.full((batch,), 500.0, device=args.device)
        work = Workload(batch, frames, height // 8, width // 8, dtype_bytes=x.element_size())
        case = f"{width}x{height}x{frames}"
        variants = [("ComfyUI", None), (f"Streamline {chunks[0]}/{chunks[1]}", SliceConfig(*chunks)),
                    (f"Streamline {chunks[0]}/{chunks[1]} + offload", SliceConfig(*chunks, offload_skips=True)),
                    (f"Streamline {chunks[0]}/{chunks[1]} + offload with features",
                     SliceConfig(*chunks, offload_skips=True, offload_features=True))]
        base = sliced_out = None
        for name, config in variants:
            try:
                peak, seconds, result = measure(x, t, c, config)
            except torch.OutOfMemoryError:
                append(out, f"| {case} | {name} | OOM | | | | | | |\n")
                continue
            predicted = predict_peak_bytes(shape, work, config, laws)
            if base is None and config is None:
                base = (peak, seconds)
            ratios = (f"{base[0] / peak:.2f}x", f"{seconds / base[1]:.2f}x") if base else ("", "")
            moved = (offload_traffic(shape, work, config.offload_features).moved_bytes / 2**30
                     if config and config.offload_skips else 0.0)
            if config is not None and not config.offload_skips:
                sliced_out, verdict = result, "reference of the offload row"
            elif config is not None and sliced_out is not None:
                verdict = "bit-identical" if torch.equal(result, sliced_out) else "DIFFERS"
            else:
                verdict = ""
            append(out, f"| {case} | {name} | {peak / 2**30:.3f} | {predicted / 2**30:.3f} "
                        f"({predicted / max(peak, 1) - 1:+.1%}) | {seconds:.3f} | {ratios[0]} | {ratios[1]} | "
                        f"{moved:.2f} | {verdict} |\n")
            del result
        del x, c, t


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.offload_bench:
        return offload_bench(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = args.device
    try:
        import torch

        if device == "cuda" and torch.cuda.is_available():
            device = torch.cuda.get_device_name()
    except ImportError:
        pass
    chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    append(out, f"# GPU evidence, {datetime.datetime.now().isoformat(timespec='seconds')}, {device}"
                f"{' (quick)' if args.quick else ''}\n\n`python tools/gpu_evidence.py "
                f"{' '.join(sys.argv[1:] if argv is None else argv)}`; benchmarks: "
                f"{', '.join(b.name for b in chosen)}\n")
    started = time.monotonic()
    for bench in chosen:
        status = run_benchmark(bench, args, out)
        print(f"{bench.name}: {status}", flush=True)
    append(out, f"\nall done in {time.monotonic() - started:.0f} s\n")


if __name__ == "__main__":
    main()
