"""The paper's metric: whole-process GPU memory of a whole ComfyUI + AnimateDiff-Evolved workflow.

Streamlined Inference states its result as the GPU memory of the whole process for AnimateDiff at
576x1024x16 with CFG 7.5 (41.7 GB -> 11 GB). This runs that workflow headless through ComfyUI's and ADE's
own nodes: CheckpointLoaderSimple (a random-weight SD1.5 checkpoint in the real format: UNet, VAE, CLIP),
ADE's Gen2 nodes with a random mm_sd_v15_v2 file, CLIPTextEncode, KSampler (euler, 25 steps, CFG 7.5)
and VAEDecode, once per variant, each variant in a process of its own (a process's peak is its own):

- comfyui: no patch;  streamline: Streamline Model Patch (automatic slices);
- offload: Streamline Model Patch with offload_skips;  budget4: Streamline Memory Budget at 4 GiB.

Per variant, each figure from one meter (core/meter.py), none of which resets a peak counter:
- NVML: what nvidia-smi shows for the process (CUDA context and cached segments included), polled every
  20 ms from before CUDA starts; the process's own entry where the driver lists it, else the device's used
  memory less what was used before the process started (the paper's reading);
- the allocator's active-bytes peak since the process started (and reserved, what the allocator holds);
- the UNet call window: the peak active bytes of each UNet call above what was held before it (a
  measurement wrapper around the diffusion model, for every variant alike; exact where the call set a
  new peak of the process, which the first call of a run does);
- time: the whole process, loading up to the first step, the median step after the first (the peak of
  a run is the peak of one step: every step's UNet call has the same shape, so --steps may be lowered
  without changing what is measured), decode, and from those what --estimate-steps steps would take.
On the CPU (--quick, the plumbing test) the peak resident set size and the live-tensor call window.

    python tools/paper_metric.py                          # GPU: 576x1024x16, 25 steps, the four variants
    python tools/paper_metric.py --steps 4 --limit-s 40   # the same peaks, ~20 s a variant on an H100
    python tools/paper_metric.py --variants comfyui streamline --dynamic-vram off on   # ComfyUI 0.33's DynamicVRAM
    python tools/paper_metric.py --device cpu --quick     # 64x64x2, 1 step, two variants

--dynamic-vram on starts a variant the way ComfyUI 0.33's main.py does on NVIDIA with torch >= 2.8 (its
default there: comfy-aimdo loaded before torch, its devices initialised, ComfyUI's dynamic ModelPatcher);
off is the estimate-based ModelPatcher (main.py --disable-dynamic-vram), what scripts importing ComfyUI get.

The paper's second model: `--model svd` runs the SVD img2vid workflow the same way (ImageOnlyCheckpointLoader
with a random-weight single-file checkpoint at SVD's own layout: UNet, video VAE, CLIP ViT-H vision;
SVD_img2vid_Conditioning on a random 1024x576 image, VideoLinearCFGGuidance, KSampler euler/karras at CFG
2.5, VAEDecode), 576x1024x14 by default, variants comfyui, streamline and budget4 (the paper: 39.49 ->
23.42 GB). `--prepare-only` writes the random-weight files into --work and stops (tools/gpu_evidence.py
writes them while the GPU runs other benchmarks).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
VARIANTS = ["comfyui", "streamline", "offload", "budget4"]
SVD_VARIANTS = ["comfyui", "streamline", "budget4"]  # skip offload is the UNet + ADE forward's
RESULT = "RESULT "


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default="animatediff", choices=["animatediff", "svd"])
    p.add_argument("--size", help="HEIGHTxWIDTHxFRAMES in pixels (the paper: 576x1024x16; SVD 576x1024x14)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--estimate-steps", type=int, default=25, help="the run length the time estimate is for")
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: all of the model's")
    p.add_argument("--dynamic-vram", nargs="+", choices=["off", "on"], default=["off"],
                   help="ComfyUI 0.33's DynamicVRAM for each variant: off, on, or both (each its own process)")
    p.add_argument("--limit-s", type=int, default=60, help="time limit per variant (its own process)")
    p.add_argument("--total-s", type=int, help="time limit for all the variants together (a variant gets what is left)")
    p.add_argument("--quick", action="store_true", help="64x64x2, 1 step, comfyui and offload (plumbing)")
    p.add_argument("--work", help="folder of the random-weight files (default: a new temporary folder)")
    p.add_argument("--prepare-only", action="store_true", help="write the random-weight files into --work, then stop")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # run one variant in this process
    p.add_argument("--mode", choices=["off", "on"], default="off", help=argparse.SUPPRESS)  # its DynamicVRAM
    return p.parse_args(argv)


def _atomic(path: Path, write) -> None:
    """Write through a temporary name, so a reader never sees half a file (gpu_evidence writes these
    files in the background while a variant may look for them)."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def files(work: Path, svd: bool, quick: bool) -> list[Path]:
    """The random-weight files a run reads."""
    if svd:
        return [work / "checkpoints" / ("random-svd-reduced.safetensors" if quick else "random-svd.safetensors")]
    return [work / "checkpoints" / "random-sd15.safetensors", work / "animatediff_models" / "random-mm.safetensors"]


def prepare(work: Path) -> tuple[str, str]:
    """The checkpoint and motion-model files (random weights, real formats), written once per run."""
    checkpoint, motion = files(work, svd=False, quick=False)
    if checkpoint.exists() and motion.exists():
        return checkpoint.name, motion.name
    from safetensors.torch import save_file

    from comfyui_streamline.testing import synthetic, weights

    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        _atomic(checkpoint, lambda p: save_file(synthetic.sd15_checkpoint_state_dict(), str(p)))
    if not motion.exists():
        motion.parent.mkdir(parents=True, exist_ok=True)
        _atomic(motion, lambda p: save_file(synthetic.mm_sd15_v2_state_dict(pe_len=32), str(p)))
    return checkpoint.name, motion.name


def prepare_svd(work: Path, quick: bool) -> str:
    """A random-weight single-file SVD checkpoint (SVD's own widths; --quick: the reduced UNet)."""
    [checkpoint] = files(work, svd=True, quick=quick)
    if not checkpoint.exists():
        from comfyui_streamline.testing import model_families, synthetic

        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        _atomic(checkpoint, lambda p: synthetic.write_svd_checkpoint(p, unet=None if quick else model_families.svd_layout))
    return checkpoint.name


# -- ComfyUI 0.33's DynamicVRAM, as its main.py starts it -------------------------------------------------------


def dynamic_vram_before_torch() -> bool:
    """main.py, before torch is imported: comfy-aimdo's library loaded (its versions' call forms)."""
    try:
        import comfy_aimdo.control as control
    except ImportError:
        return False
    for kwargs in ({"simple_vram_headroom": None, "nvml_pressure": True}, {"simple_vram_headroom": None}, {}):
        try:
            return bool(control.init(**kwargs))
        except TypeError:
            continue
    return False


def dynamic_vram_after_host() -> str:
    """main.py once comfy.model_management is up: aimdo's devices, ComfyUI's dynamic ModelPatcher. Returns
    "on", or why it stays off."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return "off (this ComfyUI has no DynamicVRAM)"
    if mm.torch_version_numeric < (2, 8):
        return "off (torch < 2.8)"
    try:
        import comfy_aimdo.control as control
    except ImportError:
        return "off (comfy-aimdo is not installed)"
    devices = mm.get_all_torch_devices()
    try:
        ok = control.init_devices((d.index, 0) for d in devices)
    except TypeError:  # comfy-aimdo 0.4.9
        ok = control.init_devices(d.index for d in devices)
    if not ok:
        return "off (comfy-aimdo did not start)"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return "on"


# -- one variant, in its own process ---------------------------------------------------------------------------


class CallMeter:
    """A DIFFUSION_MODEL wrapper that measures every UNet call (core/meter.py's window: allocator counters
    on CUDA, never reset; live tensors on the CPU) and times it, for every variant alike."""

    def __init__(self):
        self.calls = []  # (timestep, start s, end s, Peak)

    def __call__(self, executor, *args, **kwargs):
        from comfyui_streamline.core.meter import measure_peak, synchronized_seconds

        x = args[0] if args else kwargs["x"]
        t = args[1] if len(args) > 1 else kwargs.get("timesteps")
        start = synchronized_seconds(x.device)
        with measure_peak(x.device) as window:
            out = executor(*args, **kwargs)
        self.calls.append((float(t.flatten()[0]) if t is not None else None, start,
                           synchronized_seconds(x.device), window.peak))
        return out

    def install(self, model):
        import comfy.patcher_extension

        model = model.clone()
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "paper_metric_meter", self)
        return model

    def summary(self) -> dict:
        exact = [p.bytes for *_, p in self.calls if p.exact]
        steps = {}  # timestep: (first call's start, last call's end); CFG unbatched: two calls share one
        for t, start, end, _ in self.calls:
            steps[t] = (steps.get(t, (start,))[0], end)
        spans = sorted(steps.values())
        # a step lasts from its first call to the next step's (the sampler's own work included), the last
        # to its last call's end; the first step (kernel warm-up) is left out of the median
        durations = sorted([b[0] - a[0] for a, b in zip(spans[1:], spans[2:])] + [spans[-1][1] - spans[-1][0]]
                           if len(spans) > 1 else [])
        return {"calls": len(self.calls), "call_peak": max(exact) if exact else None, "call_exact": len(exact),
                "first_step_at": spans[0][0] - STARTED if spans else None,
                "step_seconds": durations[len(durations) // 2] if durations else None}


def run_svd_variant(args: argparse.Namespace, meter: CallMeter):
    """The SVD img2vid workflow through ComfyUI's core nodes: the decoded frames."""
    import comfy_extras.nodes_video_model as video_model
    import folder_paths
    import nodes
    import torch

    from comfyui_streamline.nodes.memory_budget import MemoryBudget
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch

    work = Path(args.work)
    checkpoint = prepare_svd(work, args.quick)
    folder_paths.add_model_folder_path("checkpoints", str(work / "checkpoints"))
    height, width, frames = (int(v) for v in args.size.lower().split("x"))
    with torch.inference_mode():
        model, clip_vision, vae = video_model.ImageOnlyCheckpointLoader().load_checkpoint(checkpoint, False)[:3]
        image = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(0))
        positive, negative, latent = video_model.SVD_img2vid_Conditioning().encode(
            clip_vision, image, vae, width, height, frames, 127, 6, 0.0)
        model = video_model.VideoLinearCFGGuidance().patch(model, 1.0)[0]
        if args.variant == "streamline":
            model = StreamlineModelPatch.execute(model, frame_chunk=0, spatial_chunk=0).result[0]
        elif args.variant == "budget4":
            model = MemoryBudget.execute(model, budget_gb=4.0, width=width, height=height, frames=frames).result[0]
        samples = nodes.common_ksampler(meter.install(model), 0, args.steps, 2.5, "euler", "karras", positive,
                                        negative, latent)[0]
        return nodes.VAEDecode().decode(vae, samples)[0]


def run_variant(args: argparse.Namespace, meter: CallMeter):
    """The AnimateDiff workflow (or SVD's): the decoded frames."""
    import folder_paths
    import nodes
    import torch

    from comfyui_streamline.nodes.memory_budget import MemoryBudget
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch
    from comfyui_streamline.testing import synthetic, weights

    if args.model == "svd":
        return run_svd_variant(args, meter)
    work = Path(args.work)
    checkpoint, motion_file = prepare(work)
    folder_paths.add_model_folder_path("checkpoints", str(work / "checkpoints"))
    ade_nodes = weights.ade_module("nodes").NODE_CLASS_MAPPINGS
    utils_model = weights.ade_module("utils_model")
    folder_paths.add_model_folder_path(utils_model.Folders.ANIMATEDIFF_MODELS, str(work / "animatediff_models"))

    def ade(name, **inputs):
        cls = ade_nodes[name]
        return getattr(cls(), cls.FUNCTION)(**inputs)[0]

    height, width, frames = (int(v) for v in args.size.lower().split("x"))
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(checkpoint)[:3]
        m_models = ade("ADE_ApplyAnimateDiffModelSimple", motion_model=ade("ADE_LoadAnimateDiffModel", model_name=motion_file))
        model = ade("ADE_UseEvolvedSampling", model=model, beta_schedule=utils_model.BetaSchedules.AUTOSELECT,
                    m_models=m_models)
        if args.variant == "streamline":
            model = StreamlineModelPatch.execute(model, frame_chunk=0, spatial_chunk=0).result[0]
        elif args.variant == "offload":
            model = StreamlineModelPatch.execute(model, frame_chunk=0, spatial_chunk=0, offload_skips=True).result[0]
        elif args.variant == "budget4":
            model = MemoryBudget.execute(model, budget_gb=4.0, width=width, height=height, frames=frames).result[0]
        encode = nodes.CLIPTextEncode()
        positive = encode.encode(clip, "a red fox running through snow, cinematic")[0]
        negative = encode.encode(clip, "blurry, low quality")[0]
        latent = nodes.EmptyLatentImage().generate(width, height, frames)[0]
        samples = nodes.common_ksampler(meter.install(model), 0, args.steps, args.cfg, "euler", "normal", positive,
                                        negative, latent)[0]
        return nodes.VAEDecode().decode(vae, samples)[0]


def variant_process(args: argparse.Namespace) -> dict:
    """One variant in this process: NVML polled from before CUDA starts, DynamicVRAM as asked, the workflow."""
    dynamic = "off"
    if args.mode == "on":  # before torch is imported, as main.py does
        dynamic = "off (CPU)" if args.device == "cpu" else ("pending" if dynamic_vram_before_torch() else
                                                             "off (comfy-aimdo did not load)")
    sampler = standalone_gpu_memory_sampler() if args.device == "cuda" else None  # before CUDA starts: NVML's baseline
    import hostenv

    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="paper_metric")
    if dynamic == "pending":
        dynamic = dynamic_vram_after_host()
    import torch

    meter = CallMeter()
    images = run_variant(args, meter)
    if args.device == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter() - STARTED
    result = {"variant": args.variant, "dynamic_vram": dynamic, "size": args.size, "steps": args.steps,
              "seconds": end, "frames_decoded": int(images.shape[0]), **meter.summary()}
    if result["step_seconds"] is not None:  # this process, and the steps it did not run at the median step
        result["estimate_seconds"] = end + (args.estimate_steps - args.steps) * result["step_seconds"]
    if args.device == "cuda":
        from comfyui_streamline.core.meter import process_peaks

        result.update(process_peaks())
        result.update(sampler.stop().as_dict())
    else:
        import resource

        result["rss_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def standalone_gpu_memory_sampler():
    """core/meter.py's GpuMemorySampler started before the host (and CUDA) are: the pack is not loaded yet,
    so the file is loaded on its own (it needs torch, which loads no CUDA context at import)."""
    import importlib.util
    import types

    package = types.ModuleType("_streamline_core")
    package.__path__ = [str(TOOLS.parent / "core")]
    sys.modules.setdefault("_streamline_core", package)
    for name in ("memtrace", "meter"):
        spec = importlib.util.spec_from_file_location(f"_streamline_core.{name}", TOOLS.parent / "core" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["_streamline_core.meter"].GpuMemorySampler().start()


# -- the parent: one process per variant -----------------------------------------------------------------------


def gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f} GB ({value / 2**30:.2f} GiB)"


def seconds(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def row(r: dict, device: str, wall: float) -> str:
    call = ("-" if r.get("call_peak") is None else
            f"{gb(r['call_peak'])}, exact in {r['call_exact']}/{r['calls']} calls")
    if device == "cuda":
        nvml = "-" if r.get("nvml_peak") is None else f"{gb(r['nvml_peak'])} [{r['nvml_source']}]"
        memory = f"{nvml} | {gb(r.get('active_peak'))} | {gb(r.get('reserved_peak'))} | {call}"
    else:
        memory = f"{gb(r['rss_peak'])} | {call}"
    return (f"| {r['variant']} | {r['dynamic_vram']} | {memory} | {wall:.1f} ({r['steps']} steps) | "
            f"{seconds(r.get('step_seconds'))} | {seconds(r.get('estimate_seconds'))} |")


def main(argv=None) -> None:
    args = parse_args(argv)
    svd = args.model == "svd"
    args.size = args.size or ("576x1024x14" if svd else "576x1024x16")
    if args.quick:
        args.size, args.steps = ("64x64x4", 1) if svd else ("64x64x2", 1)
        args.variants = args.variants or (["comfyui", "streamline"] if svd else ["comfyui", "offload"])
    args.variants = args.variants or (SVD_VARIANTS if svd else VARIANTS)
    if args.variant:
        print(RESULT + json.dumps(variant_process(args)), flush=True)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="streamline-paper-metric-"))
    started = time.monotonic()
    if not all(p.exists() for p in files(work, svd, args.quick)):  # else no host needed in this process
        import hostenv

        hostenv.enter_for_tool(args.comfy, cpu=True, tool="paper_metric")  # files only: no CUDA in this process
    prepare_svd(work, args.quick) if svd else prepare(work)  # the random-weight files, before the variants' limits
    if args.prepare_only:
        print(f"paper metric: random-weight files ready in {work} ({time.monotonic() - started:.0f} s)", flush=True)
        return
    what = (f"SVD: whole ComfyUI img2vid workflow, {args.size} (HxWxF), CFG 2.5 (video linear), {args.steps} steps, "
            "VAE decode, random SVD weights (UNet, video VAE, CLIP ViT-H)" if svd else
            f"whole ComfyUI + ADE workflow, {args.size} (HxWxF), CFG {args.cfg}, {args.steps} steps, VAE decode, "
            "random SD1.5 + mm_sd_v15_v2 weights")
    print(f"paper metric{', ' + what if svd else ': ' + what}, {args.device}; one process per variant "
          f"(files {time.monotonic() - started:.0f} s)", flush=True)
    if args.device == "cuda":
        columns = ("NVML peak (nvidia-smi: process, or device less its use before) | allocator active peak (process) "
                   "| allocator reserved peak | UNet call window (active bytes above the call's start)")
    else:
        columns = "peak RSS (CPU) | UNet call window (live tensors)"
    print(f"| variant | DynamicVRAM | {columns} | process s | s / step (after the first) | "
          f"{args.estimate_steps} steps s (estimate) |", flush=True)
    print("|---|---|" + "---|" * columns.count("|") + "---|---|---|---|", flush=True)
    for mode in args.dynamic_vram:
        for variant in args.variants:
            limit = args.limit_s
            if args.total_s is not None:
                limit = min(limit, int(args.total_s - (time.monotonic() - started)))
            if limit < 5:
                print(f"| {variant} | {mode} | not started: the part's {args.total_s} s are spent | |", flush=True)
                continue
            command = [sys.executable, __file__, "--variant", variant, "--mode", mode, "--work", str(work),
                       "--device", args.device, "--size", args.size, "--steps", str(args.steps), "--cfg", str(args.cfg),
                       "--model", args.model, "--estimate-steps", str(args.estimate_steps)]
            if args.quick:
                command.append("--quick")
            if args.comfy:
                command += ["--comfy", args.comfy]
            begin = time.monotonic()
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
            except subprocess.TimeoutExpired:
                print(f"| {variant} | {mode} | stopped at its limit ({limit} s) | |", flush=True)
                continue
            lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
            if not lines:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                print(f"| {variant} | {mode} | failed: {tail[0][:200]} | |", flush=True)
                continue
            print(row(json.loads(lines[-1][len(RESULT):]), args.device, time.monotonic() - begin), flush=True)


if __name__ == "__main__":
    main()
