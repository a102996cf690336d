"""Every GPU benchmark of the pack in one command that ends inside its budget: each part in its own
process under its own time limit, each row appended to a markdown file (flushed) as soon as it is
measured, so an interrupted run keeps what it measured and one slow part cannot eat the rest.

    python tools/gpu_evidence.py --plan                                 # the parts, limits, expected GPU time
    python tools/gpu_evidence.py --out $OUT/gpu_evidence.md            # H100/H200: at most 500 s
    python tools/gpu_evidence.py --out $OUT/e.md --dynamic-vram        # the paper metric with DynamicVRAM off and on
    python tools/gpu_evidence.py --device cpu --quick --out /tmp/e.md  # the plumbing, tiny cases (tests)

Sizing (an H100; the expected times are estimates until the first run writes real ones): a part's
limit is what it really does (process start and ComfyUI import ~8 s, random SD1.5 weights ~10 s, its
forwards or steps) with room; the limits add up to at most GPU_TOTAL_S, and a part never gets more than
what is left of it. Peaks are per step (every step of a run has the same shape): the whole-process
parts run 3-4 steps and estimate 25 from the median step. The random checkpoints of the whole-process
parts (SD1.5 ~2 GB, SVD ~4.4 GB) are written by background CPU processes started first, while the GPU
runs the other parts (a part that needs them waits, inside its own limit).

A part's standard output (markdown rows) goes to --out; its standard error (logs, progress bars, which
write '\\r' without a newline) to --out with .log added, the last lines of it into --out when the part
fails. Output is read by threads and the limit is checked on a timer, so an open progress bar cannot hold
the deadline. The parts "check" (correctness on this device, first) and "offload" (one UNet forward:
ComfyUI, Streamline, Streamline + skip offload) are this file's own. Adding a part is one line in
BENCHMARKS; a script that does not exist (yet) is listed as skipped.
"""
from __future__ import annotations

import argparse
import codecs
import datetime
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from markdown_rows import append  # noqa: E402

WORK = "{work}"  # in a part's arguments: the run's folder of random-weight files (shared with the background jobs)


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str  # under tools/ ("gpu_evidence.py": this file's own parts), or an absolute path
    gpu_args: tuple[str, ...]
    quick_args: tuple[str, ...]
    limit_s: int  # on the GPU; --quick uses QUICK_LIMIT_S
    expected_s: int = 0  # what it should take on an H100 (--plan prints it)
    what: str = ""  # what it measures, and what its time goes to
    needs: str | None = None  # a background job (BACKGROUND) it waits for, inside its own limit
    markdown: bool = True  # its standard output is markdown (else fenced as text)


@dataclass(frozen=True)
class Background:
    """A CPU job started before the first part, for the parts that name it in `needs`."""

    name: str
    script: str
    args: tuple[str, ...]
    quick_args: tuple[str, ...]


RECORD = ("--methods", "Step Rehash key-step (13 full), extrapolate",
          "Step Rehash fixed (interval 2, warm-up 2, tail 1: 14 full), extrapolate", "DeepCache-style (every 2nd",
          "EasyCache (threshold 0.2)", "LazyCache (threshold 0.2)")
# fmt: off
BENCHMARKS = [
    Benchmark("check", "gpu_evidence.py", ("--check",), ("--check",), 60, 35,
              "correctness on this device first: skip offload bit-identical (torch.equal), sliced = unsliced "
              "(<= 1e-5, fp32, TF32 off), the out-of-memory retry under a real allocator cap and a forced one, "
              "the meters (a known 256 MiB window four ways, NVML); start+import 8 s, fp32 SD1.5 weights 12 s, "
              "~12 forwards at 256x256x16 ~5 s"),
    Benchmark("offload", "gpu_evidence.py", ("--offload-bench",), ("--offload-bench",), 70, 45,
              "one UNet forward, fp16: ComfyUI / Streamline / + skip offload / + features at 512x512x16, "
              "768x768x32, 512x512x128; exact active-bytes window, 1 timed forward each; 20 s setup, "
              "12 x 2 forwards of 0.2-2 s"),
    Benchmark("paper_metric", "paper_metric.py",
              ("--steps", "4", "--limit-s", "40", "--total-s", "115", "--work", WORK),
              ("--quick", "--work", WORK), 120, 85,
              "the paper's whole process, 576x1024x16, CFG 7.5: comfyui, streamline, offload, budget4, one "
              "process each (~20 s: start 8, load 4, 4 steps of ~0.5 s, decode 3); NVML, allocator and call "
              "peaks; 25 steps estimated from the median step", needs="files_sd15"),
    Benchmark("bench_rehash", "bench_rehash.py", ("--steps", "25") + RECORD, ("--prompts", "red circle bounce",
              "--steps", "2"), 60, 50,
              "Step Rehash against full sampling, EasyCache, LazyCache, DeepCache-style, SD1.5 shapes "
              "512x512x16, 25 steps: 21 s setup, 7 runs of 3-5 s", markdown=False),
    Benchmark("svd", "bench_svd.py", ("--frames", "14", "--repeats", "1"), ("--quick",), 40, 25,
              "SVD UNet per forward at 576x1024x14: ComfyUI / sliced / Memory Budget 4 GiB (3 forwards each "
              "of ~0.5 s), rehash FLOPs on the meta device; 15 s setup"),
    Benchmark("wan", "bench_wan.py", ("--repeats", "1"), ("--quick",), 35, 25,
              "Wan 2.1 1.3B 480x832x81 and 14B 720x1280x81, 2 blocks, ComfyUI vs token slices (3 forwards "
              "each, up to ~1.5 s at 14B), rehash FLOPs on the meta device"),
    Benchmark("dit", "bench_dit.py", ("--measure", "--repeats", "1"), ("--quick", "--measure", "--repeats", "1"),
              30, 25, "the video DiTs at real shapes: predicted table (meta device, ~2 s), then 2 real-dim blocks "
              "per family with laws, ComfyUI vs the 24 / 12 GiB plans (Wan 2.1 14B 720x1280x81 ~1.5 s a forward, "
              "Wan 2.2 5B 1280x704x121; 2 forwards each), 8 s start"),
    Benchmark("svd_process", "paper_metric.py",
              ("--model", "svd", "--steps", "3", "--limit-s", "35", "--total-s", "80", "--work", WORK),
              ("--model", "svd", "--quick", "--work", WORK), 85, 70,
              "the SVD img2vid workflow, whole process, 576x1024x14: comfyui, streamline, budget4 (~23 s "
              "each: start 8, 4.4 GB checkpoint load 5, 3 steps of ~1 s, video VAE decode 5)",
              needs="files_svd"),
]
# not in the default run (--with NAME adds one, --only runs it): they do not fit the budget beside the above
OPTIONAL = [
    Benchmark("bench", "bench.py", ("--cases", "512x512x16", "768x768x32", "512x512x128", "--chunks", "8/2048",
              "4/512", "0/0", "--repeats", "1"), ("--cases", "64x64x4", "--chunks", "2/16", "--repeats", "1"), 60, 50,
              "per-forward calibration rows (three slicings per case, predicted against measured): 20 s setup, "
              "12 x 2 forwards", markdown=False),
    Benchmark("rehash_cost", "rehash_cost.py", ("--size", "512x512x16"), ("--size", "64x64x2"), 60, 45,
              "FLOPs of a rehash step (device-independent: a CPU measures them) and UNet call times",
              markdown=False),
]
BACKGROUND = [
    Background("files_sd15", "paper_metric.py", ("--prepare-only", "--work", WORK),
               ("--prepare-only", "--quick", "--work", WORK)),
    Background("files_svd", "paper_metric.py", ("--prepare-only", "--model", "svd", "--work", WORK),
               ("--prepare-only", "--model", "svd", "--quick", "--work", WORK)),
]
# fmt: on
QUICK_LIMIT_S = 240
MIN_PART_S = 10  # a part is not started with less of the budget left
GPU_TOTAL_S = 500  # the budget the limits above add up to at most (an H100/H200; one device call is 600 s)
DYNAMIC_VRAM_ARGS = ("--variants", "comfyui", "streamline", "--dynamic-vram", "off", "on")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="markdown file the rows are appended to (its log: the same name with .log added)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny cases (the plumbing test on the CPU)")
    p.add_argument("--only", nargs="+", help="run only these parts (names in BENCHMARKS or OPTIONAL)")
    p.add_argument("--with", dest="extra", nargs="+", default=[], help="add these OPTIONAL parts")
    p.add_argument("--dynamic-vram", action="store_true",
                   help="the paper metric's rows with ComfyUI 0.33's DynamicVRAM off and on (comfyui and "
                        "streamline, each in both modes; instead of its four variants)")
    p.add_argument("--budget-s", type=int, help=f"all parts together (default {GPU_TOTAL_S} on the GPU, none with --quick)")
    p.add_argument("--plan", "--dry-run", action="store_true",
                   help="print the parts, their limits and expected GPU times, and stop")
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--work", help=argparse.SUPPRESS)  # the random-weight files' folder (default: a new one)
    p.add_argument("--offload-bench", action="store_true", help=argparse.SUPPRESS)  # the "offload" part itself
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)  # the "check" part itself
    args = p.parse_args(argv)
    if not (args.plan or args.out):
        p.error("--out is required (or --plan)")
    return args


def plan(args: argparse.Namespace) -> list[Benchmark]:
    """The parts this command runs, in order, with the options applied."""
    every = {b.name: b for b in BENCHMARKS + OPTIONAL}
    unknown = [n for n in (args.only or []) + args.extra if n not in every]
    if unknown:
        raise SystemExit(f"gpu_evidence: no part named {', '.join(unknown)} (parts: {', '.join(every)})")
    chosen = [b for b in BENCHMARKS + OPTIONAL
              if (b.name in args.only if args.only else b in BENCHMARKS or b.name in args.extra)]
    if args.dynamic_vram:
        chosen = [replace(b, gpu_args=b.gpu_args + DYNAMIC_VRAM_ARGS, quick_args=b.quick_args + DYNAMIC_VRAM_ARGS,
                          what=b.what + "; --dynamic-vram: comfyui and streamline, DynamicVRAM off and on")
                  if b.name == "paper_metric" else b for b in chosen]
    return chosen


def budget(args: argparse.Namespace) -> int | None:
    return args.budget_s if args.budget_s is not None else (None if args.quick else GPU_TOTAL_S)


def plan_text(args: argparse.Namespace) -> str:
    parts = plan(args)
    limit = (lambda b: QUICK_LIMIT_S) if args.quick else (lambda b: b.limit_s)
    lines = ["| part | expected on an H100 s | limit s | what it measures, where its time goes |",
             "|---|---|---|---|"]
    lines += [f"| {b.name} | {b.expected_s} | {limit(b)} | {b.what} |" for b in parts]
    total = sum(limit(b) for b in parts)
    cap = budget(args)
    lines.append(f"| all | {sum(b.expected_s for b in parts)} | {total} | "
                 f"{'budget ' + str(cap) + ' s' if cap else 'no budget (--quick)'}"
                 f"{' (over it: later parts get what is left)' if cap and total > cap else ''} |")
    return "\n".join(lines) + "\n"


# -- running one part ---------------------------------------------------------------------------------------


class _Lines:
    """Bytes from a pipe as terminal lines: '\\r' starts the line over (progress bars), '\\n' ends it."""

    def __init__(self):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.line = self.pending = ""  # the line being written; the last one a '\r' started over

    def feed(self, data: bytes) -> list[str]:
        done = []
        for char_run in _split_keep(self.decoder.decode(data)):
            if char_run == "\n":  # "text\r\n" ends "text"
                done.append((self.line or self.pending) + "\n")
                self.line = self.pending = ""
            elif char_run == "\r":
                self.pending, self.line = self.line, ""
            else:
                self.line += char_run
        return done

    def rest(self) -> str:
        """What an unfinished line (an open progress bar) shows now."""
        return self.line or self.pending


def _split_keep(text: str) -> list[str]:
    out, start = [], 0
    for i, c in enumerate(text):
        if c in "\r\n":
            if i > start:
                out.append(text[start:i])
            out.append(c)
            start = i + 1
    if start < len(text):
        out.append(text[start:])
    return out


def _pump(stream, name: str, chunks: queue.Queue) -> None:
    """A reader thread: whatever the pipe has, as soon as it has it (never waits for a newline)."""
    fd = stream.fileno()
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        chunks.put((name, data))
        if not data:
            return


def run_benchmark(bench: Benchmark, args: argparse.Namespace, out: Path, limit: int | None = None,
                  background: dict | None = None) -> str:
    """Run one part in its own process group under its time limit: its standard output appended to `out`
    as it comes (markdown rows), its standard error to `out`.log; killed at the deadline, which a timer
    checks whatever the child writes."""
    script = Path(bench.script) if os.path.isabs(bench.script) else TOOLS / bench.script
    if not script.exists():
        append(out, f"\n## {bench.name}\n\nskipped: tools/{bench.script} does not exist yet\n")
        return "skipped"
    work = getattr(args, "work", None) or ""
    extra = [work if a == WORK else a for a in (bench.quick_args if args.quick else bench.gpu_args)]
    if bench.script == "gpu_evidence.py":
        extra += ["--out", str(out)] + (["--quick"] if args.quick else [])
    command = [sys.executable, str(script), "--device", args.device] + extra
    if args.comfy:
        command += ["--comfy", args.comfy]
    limit = limit if limit is not None else (QUICK_LIMIT_S if args.quick else bench.limit_s)
    fence = "" if bench.markdown else "```\n"
    shown = " ".join(["python", "tools/" + script.name] + command[2:])
    append(out, f"\n## {bench.name}\n\n`{shown}` (limit {limit} s{f', expected {bench.expected_s} s' if bench.expected_s and not args.quick else ''})\n\n{fence}")
    log = Path(str(out) + ".log")
    append(log, f"\n===== {bench.name}: {shown}\n")
    start = time.monotonic()
    deadline = start + limit
    status = None
    job = (background or {}).get(bench.needs)
    if job is not None and job.poll() is None:  # its files are still being written: wait, inside the limit
        while job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if job.poll() is None:
            status = f"stopped at its limit ({limit} s) waiting for {bench.needs}"
    if status is None:
        status = _run(command, out, log, deadline, limit, fence)
    append(out, f"{fence}\n{bench.name}: {status}, {time.monotonic() - start:.0f} s\n")
    return status


def _run(command: list[str], out: Path, log: Path, deadline: float, limit: int, fence: str) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                               start_new_session=True)  # its own process group: killed whole at the deadline
    chunks: queue.Queue = queue.Queue()
    readers = [threading.Thread(target=_pump, args=(s, n, chunks), daemon=True)
               for s, n in ((process.stdout, "out"), (process.stderr, "err"))]
    for reader in readers:
        reader.start()
    lines, tail, open_streams, status = {"out": _Lines(), "err": _Lines()}, [], 2, "ok"
    try:
        while open_streams:
            left = deadline - time.monotonic()
            if left <= 0:
                status = f"stopped at its limit ({limit} s)"
                break
            try:
                name, data = chunks.get(timeout=min(left, 0.25))
            except queue.Empty:
                continue
            if not data:
                open_streams -= 1
                continue
            for line in lines[name].feed(data):
                if name == "out":
                    append(out, line)
                else:
                    _log(log, line)
                    tail = (tail + [line])[-8:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the part's own process group, started above
        process.wait()
        for reader in readers:
            reader.join(timeout=2)
    while not chunks.empty():  # what came before the end
        name, data = chunks.get_nowait()
        for line in lines[name].feed(data) if data else []:
            (append(out, line) if name == "out" else _log(log, line))
    for name in ("out", "err"):
        rest = lines[name].rest()
        if rest:
            (append(out, rest + "\n") if name == "out" else _log(log, rest + " [unfinished line]\n"))
            if name == "err":
                tail = (tail + [rest + "\n"])[-8:]
    if status == "ok" and process.returncode != 0:
        status = f"failed (exit {process.returncode})"
    if status != "ok" and tail:  # why, in the markdown too (inside the text fence, or in one of its own)
        append(out, f"\n--- its standard error ended:\n{''.join(tail)}" if fence else
                    f"\nits standard error ended:\n\n```\n{''.join(tail)}```\n")
    return status


def _log(log: Path, line: str) -> None:
    with open(log, "a") as f:
        f.write(line)


# -- the "check" part: correctness on this device before anything is measured -----------------------------------


def check(args: argparse.Namespace) -> None:
    """Rows | check | verdict | detail |; exits 1 if one failed."""
    import paper_metric

    cuda = args.device == "cuda"
    sampler = paper_metric.standalone_gpu_memory_sampler() if cuda else None
    import hostenv

    hostenv.enter_for_tool(args.comfy, cpu=not cuda, tool="gpu_evidence")
    import torch

    failed = []

    def row(name: str, ok: bool | None, detail: str) -> None:
        verdict = "ok" if ok else ("FAIL" if ok is False else "-")
        if ok is False:
            failed.append(name)
        print(f"| {name} | {verdict} | {detail} |", flush=True)

    print("| check | verdict | detail |\n|---|---|---|", flush=True)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 exactness: TF32 would round the products
        torch.backends.cudnn.allow_tf32 = False
        row("device", None, f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    check_meters(args.device, row, sampler)
    check_forwards(args, row)
    if failed:
        raise SystemExit(f"check: {len(failed)} failed: {', '.join(failed)}")


def check_meters(device: str, row, sampler) -> None:
    """core/meter.py on this device: a window of a known 256 MiB (CPU: 4 MiB) tensor, measured four ways."""
    import torch
    from comfyui_streamline.core.meter import measure_peak, process_peaks

    size = (256 if device == "cuda" else 4) * 2**20

    def window(**kw):
        with measure_peak(device, **kw) as w:
            a = torch.ones(size, dtype=torch.uint8, device=device)
            b = a + 1  # an op after it: the samples see both
            del a, b
        return w.peak

    first = window()
    row("meter: window", first.bytes >= size and first.exact, f"{first.text()}; {size // 2**20} MiB tensor + its copy")
    if device != "cuda":
        return
    big = torch.ones(8 * size, dtype=torch.uint8, device=device)  # a higher peak of the process
    del big
    under = window()
    row("meter: under an earlier peak", not under.exact and (under.upper or 0) >= 2 * size,
        f"{under.text()} (the counters cannot see it, and say so)")
    sampled = window(sample=True)
    row("meter: op-boundary samples", sampled.bytes >= 2 * size, sampled.text())
    ballast = window(ballast=True)
    row("meter: ballast", ballast.exact and ballast.bytes == first.bytes, ballast.text())
    peaks = process_peaks()
    sampler.read()
    row("meter: whole process", peaks["active_peak"] >= 8 * size,
        f"allocator active peak {peaks['active_peak'] / 2**30:.2f} GiB, reserved {peaks['reserved_peak'] / 2**30:.2f} "
        f"GiB; NVML {'-' if sampler.peak is None else f'{sampler.peak / 2**30:.2f} GiB'} [{sampler.source}], "
        f"{sampler.samples} samples")


def check_forwards(args: argparse.Namespace, row) -> None:
    """ComfyUI's forward against Streamline's (<= 1e-5), the skip offload against no offload (torch.equal),
    and the out-of-memory retry, fp32 on this device."""
    import torch
    from comfyui_streamline.core.budget import Workload, predict_peak_bytes
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.host.attention import attention_laws
    from comfyui_streamline.techniques.slicing import StreamlineState
    from comfyui_streamline.families.unet.structure import unet_shape
    from comfyui_streamline.testing import synthetic

    device, cuda = args.device, args.device == "cuda"
    (width, height, frames), chunks = ((64, 64, 4), (2, 16)) if args.quick else ((256, 256, 16), (4, 256))
    start = time.perf_counter()
    channels = synthetic.NARROW if args.quick else synthetic.SD15_WIDTH  # --quick: SD1.5's layout, narrow
    unet = synthetic.sd15_unet(dtype=torch.float32, device=device, seed=0, width=channels)
    motion = synthetic.sd15_motion_model(pe_len=32, dtype=torch.float32, device=device, seed=1, width=channels)
    synthetic.inject(unet, motion)
    motion.set_video_length(frames, frames)
    batch = 2 * frames
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, height // 8, width // 8, generator=g).to(device)
    c = torch.randn(batch, 77, 768, generator=g).to(device)
    t = torch.full((batch,), 500.0, device=device)
    row("model", None, f"SD1.5 + mm_sd_v15_v2 shapes (model_channels {channels}), random, fp32, "
                       f"{width}x{height}x{frames} (batch {batch}), "
                       f"built in {time.perf_counter() - start:.1f} s")

    def forward(config=None, state=None):
        to = synthetic.ade_transformer_options(2)
        if config is not None or state is not None:
            synthetic.with_streamline(to, config=config, state=state)
        with torch.inference_mode():
            return unet(x, t, c, transformer_options=to)

    def rel(a, b) -> float:
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    reference = forward()
    sliced_config = SliceConfig(*chunks)
    sliced = forward(sliced_config)
    diff = rel(sliced, reference)
    row("sliced = unsliced", diff <= 1e-5, f"Streamline {chunks[0]}/{chunks[1]} against ComfyUI's forward: max "
                                           f"relative difference {diff:.1e} (bound 1e-5)")
    for name, config in (("skip offload", SliceConfig(*chunks, offload_skips=True)),
                         ("skip + feature offload", SliceConfig(*chunks, offload_skips=True, offload_features=True))):
        moved = forward(config)
        row(f"{name} bit-identical", torch.equal(moved, sliced),
            f"torch.equal against the same slicing without offload{' (side-stream copies)' if cuda else ''}")
        del moved

    shape, laws = unet_shape(unet), attention_laws()
    work = Workload(batch, frames, height // 8, width // 8, dtype_bytes=4)
    whole = SliceConfig(frame_chunk=batch, spatial_chunk=(height // 8) * (width // 8))  # one slice: no slicing

    def retried(state, label: str, how: str) -> None:
        out = forward(state=state)
        settled = state.config_for(unet, x, c)
        diff = rel(out, reference)
        if settled == whole:  # no out-of-memory error came: nothing retried (the forced check still runs)
            row(f"out-of-memory retry ({label})", None if label == "allocator cap" else False,
                f"{how}: the forward fit, nothing to retry; against ComfyUI's forward {diff:.1e}")
            return
        row(f"out-of-memory retry ({label})", diff <= 1e-5,
            f"{how}: started at {whole.frame_chunk}/{whole.spatial_chunk}, settled at {settled.frame_chunk}/"
            f"{settled.spatial_chunk}; against ComfyUI's forward {diff:.1e}")

    if cuda:  # a real allocator cap: the process may hold what it holds now plus half the unsliced forward
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        predicted = predict_peak_bytes(shape, work, whole, laws)
        cap = torch.cuda.memory_reserved() + predicted // 2
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
        try:
            retried(StreamlineState(whole), "allocator cap",
                    f"set_per_process_memory_fraction: held + {predicted / 2 / 2**30:.2f} GiB, half the predicted "
                    "unsliced peak")
        except torch.OutOfMemoryError as e:
            row("out-of-memory retry (allocator cap)", False, f"the retry did not settle: {str(e).splitlines()[0][:160]}")
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    # a forced one on any device: the first per-frame block refuses more than `most` samples at once
    most = max(1, chunks[0] // 2)

    def refuse(module, inputs):
        if inputs[0].shape[0] > most:
            raise torch.OutOfMemoryError(f"forced: {inputs[0].shape[0]} samples > {most}")

    hook = unet.input_blocks[1][0].register_forward_pre_hook(refuse)
    try:
        retried(StreamlineState(whole), "forced", f"torch.OutOfMemoryError above {most} samples in input block 1")
    except torch.OutOfMemoryError as e:
        row("out-of-memory retry (forced)", False, f"the retry did not settle: {e}")
    finally:
        hook.remove()


# -- the "offload" part: one UNet forward, ComfyUI vs Streamline vs Streamline + skip offload ---------------------

GPU_CASES = [((512, 512, 16), (2, 512)), ((768, 768, 32), (4, 1024)), ((512, 512, 128), (0, 0))]
QUICK_CASES = [((64, 64, 4), (2, 16))]


def offload_bench(args: argparse.Namespace) -> None:
    import hostenv

    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="gpu_evidence")
    import torch
    from comfyui_streamline.core.budget import Workload, offload_traffic, predict_peak_bytes
    from comfyui_streamline.core.meter import measure_peak
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.host.attention import attention_laws
    from comfyui_streamline.families.unet.structure import unet_shape
    from comfyui_streamline.testing import synthetic

    cuda = args.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    cases = QUICK_CASES if args.quick else GPU_CASES
    channels = synthetic.NARROW if args.quick else synthetic.SD15_WIDTH  # --quick: SD1.5's layout, narrow
    unet = synthetic.sd15_unet(dtype=dtype, device=args.device, seed=0, width=channels)
    motion = synthetic.sd15_motion_model(pe_len=max(32, max(c[0][2] for c in cases)), dtype=dtype, device=args.device,
                                         seed=1, width=channels)
    synthetic.inject(unet, motion)
    shape, laws = unet_shape(unet), attention_laws()
    meter = "CUDA active bytes above the forward's start, exact" if cuda else "live tensors"
    print(f"| case (WxHxF, CFG) | variant | peak activation GiB ({meter}) | predicted (error) | s / forward | "
          "memory ratio | time ratio | host GiB moved | output |\n|---|---|---|---|---|---|---|---|---|", flush=True)

    def measure(x, t, c, config):
        to = synthetic.ade_transformer_options(2)
        if config is not None:
            synthetic.with_streamline(to, config)

        def forward():
            return unet(x, t, c, transformer_options=to)

        with torch.inference_mode():
            with measure_peak(args.device, ballast=True) as window:  # core/meter.py, never reset
                result = forward()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            forward()  # one timed forward after the measured one (which warmed the kernels)
            if cuda:
                torch.cuda.synchronize()
        return window.peak, time.perf_counter() - start, result

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
                print(f"| {case} | {name} | OOM | | | | | | |", flush=True)
                continue
            predicted = predict_peak_bytes(shape, work, config, laws)
            if base is None and config is None:
                base = (peak.bytes, seconds)
            ratios = (f"{base[0] / max(peak.bytes, 1):.2f}x", f"{seconds / base[1]:.2f}x") if base else ("", "")
            moved = (offload_traffic(shape, work, config.offload_features).moved_bytes / 2**30
                     if config and config.offload_skips else 0.0)
            if config is not None and not config.offload_skips:
                sliced_out, verdict = result, "reference of the offload row"
            elif config is not None and sliced_out is not None:
                verdict = "bit-identical" if torch.equal(result, sliced_out) else "DIFFERS"
            else:
                verdict = ""
            print(f"| {case} | {name} | {'' if peak.exact else '~'}{peak.bytes / 2**30:.3f} | {predicted / 2**30:.3f} "
                  f"({predicted / max(peak.bytes, 1) - 1:+.1%}) | {seconds:.3f} | {ratios[0]} | {ratios[1]} | "
                  f"{moved:.2f} | {verdict} |", flush=True)
            del result
        del x, c, t, sliced_out


# -- the command ------------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    """The GPU's name without starting CUDA here (a context in this process would sit in every NVML figure)."""
    if device != "cuda":
        return "cpu"
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "cuda"
    except (OSError, subprocess.TimeoutExpired):
        return "cuda"


def start_background(parts: list[Benchmark], args: argparse.Namespace, log: Path) -> dict:
    """The CPU jobs the parts need, started now, niced, without the GPU (CUDA_VISIBLE_DEVICES empty)."""
    jobs = {}
    for job in BACKGROUND:
        if not any(b.needs == job.name for b in parts):
            continue
        command = [sys.executable, str(TOOLS / job.script), "--device", "cpu"]
        command += [args.work if a == WORK else a for a in (job.quick_args if args.quick else job.args)]
        if args.comfy:
            command += ["--comfy", args.comfy]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"),
                   PYTHONUNBUFFERED="1")
        with open(log, "a") as f:
            f.write(f"\n===== background {job.name}: {' '.join(command)}\n")
            f.flush()
            jobs[job.name] = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True, preexec_fn=lambda: os.nice(10))
    return jobs


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.offload_bench:
        return offload_bench(args)
    if args.check:
        return check(args)
    if args.plan:
        print(plan_text(args), end="")
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = Path(str(out) + ".log")
    parts = plan(args)
    args.work = args.work or tempfile.mkdtemp(prefix="streamline-evidence-")
    cap = budget(args)
    append(out, f"# GPU evidence, {datetime.datetime.now().isoformat(timespec='seconds')}, {device_name(args.device)}"
                f"{' (quick)' if args.quick else ''}\n\n`python tools/gpu_evidence.py "
                f"{' '.join(sys.argv[1:] if argv is None else argv)}`; parts: {', '.join(b.name for b in parts)}"
                f"{f'; budget {cap} s' if cap else ''}; logs: {log.name}\n\n{plan_text(args)}")
    started = time.monotonic()
    jobs = start_background(parts, args, log)
    try:
        for bench in parts:
            limit = QUICK_LIMIT_S if args.quick else bench.limit_s
            if cap is not None:
                limit = min(limit, int(cap - (time.monotonic() - started)))
                if limit < MIN_PART_S:
                    append(out, f"\n## {bench.name}\n\nnot started: the budget ({cap} s) is spent\n")
                    print(f"{bench.name}: not started (budget spent)", flush=True)
                    continue
            print(f"{bench.name}: started at {time.monotonic() - started:.0f} s, limit {limit} s", flush=True)
            status = run_benchmark(bench, args, out, limit, jobs)
            print(f"{bench.name}: {status}", flush=True)
    finally:
        for job in jobs.values():
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)  # our own background job's process group
            job.wait()
    append(out, f"\nall done in {time.monotonic() - started:.0f} s\n")


if __name__ == "__main__":
    main()
