"""The paper's metric: whole-process GPU memory of a whole ComfyUI + AnimateDiff-Evolved workflow.

Streamlined Inference states its result as the GPU memory of the whole process for AnimateDiff at
576x1024x16 with CFG 7.5 (41.7 GB -> 11 GB). This runs that workflow headless through ComfyUI's and ADE's
own nodes: CheckpointLoaderSimple (a random-weight SD1.5 checkpoint in the real format: UNet, VAE, CLIP),
ADE's Gen2 nodes with a random mm_sd_v15_v2 file, CLIPTextEncode, KSampler (euler, 25 steps, CFG 7.5)
and VAEDecode, once per variant, each variant in a process of its own (a process's peak is its own):

- comfyui: no patch;  streamline: Streamline Model Patch (automatic slices);
- offload: Streamline Model Patch with offload_skips;  budget4: Streamline Memory Budget at 4 GiB.

Per variant: torch.cuda.max_memory_allocated and max_memory_reserved over the whole process, the
process's memory as NVML sees it (CUDA context included; when pynvml is installed), and wall time. On
the CPU (--quick, the plumbing test) the peak resident set size instead.

    python tools/paper_metric.py                          # GPU: 576x1024x16, 25 steps, the four variants
    python tools/paper_metric.py --device cpu --quick     # 64x64x2, 1 step, two variants

The paper's second model: `--model svd` runs the SVD img2vid workflow the same way (ImageOnlyCheckpointLoader
with a random-weight single-file checkpoint at SVD's own layout: UNet, video VAE, CLIP ViT-H vision;
SVD_img2vid_Conditioning on a random 1024x576 image, VideoLinearCFGGuidance, KSampler euler/karras at CFG
2.5, VAEDecode), 576x1024x14 by default, variants comfyui, streamline and budget4 (the paper: 39.49 ->
23.42 GB). The peak of a run is the peak of one step (every step's UNet call is the same shape), so
--steps may be lowered to save time without changing what is measured.
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

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
VARIANTS = ["comfyui", "streamline", "offload", "budget4"]
SVD_VARIANTS = ["comfyui", "streamline", "budget4"]  # skip offload is the UNet + ADE forward's


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default="animatediff", choices=["animatediff", "svd"])
    p.add_argument("--size", help="HEIGHTxWIDTHxFRAMES in pixels (the paper: 576x1024x16; SVD 576x1024x14)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: all of the model's")
    p.add_argument("--limit-s", type=int, default=60, help="time limit per variant (its own process)")
    p.add_argument("--quick", action="store_true", help="64x64x2, 1 step, comfyui and offload (plumbing)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # run one variant in this process
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(work: Path) -> tuple[str, str]:
    """The checkpoint and motion-model files (random weights, real formats), written once per run."""
    from safetensors.torch import save_file

    from comfyui_streamline.tools import synthetic

    checkpoint, motion = work / "checkpoints" / "random-sd15.safetensors", work / "animatediff_models" / "random-mm.safetensors"
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_file(synthetic.sd15_checkpoint_state_dict(), str(checkpoint))
    if not motion.exists():
        motion.parent.mkdir(parents=True, exist_ok=True)
        save_file(synthetic.mm_sd15_v2_state_dict(pe_len=32), str(motion))
    return checkpoint.name, motion.name


def prepare_svd(work: Path, quick: bool) -> str:
    """A random-weight single-file SVD checkpoint (SVD's own widths; --quick: the reduced UNet)."""
    from comfyui_streamline.tools import model_families, synthetic

    checkpoint = work / "checkpoints" / ("random-svd-reduced.safetensors" if quick else "random-svd.safetensors")
    if not checkpoint.exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        synthetic.write_svd_checkpoint(checkpoint, unet=None if quick else model_families.svd_layout)
    return checkpoint.name


def run_svd_variant(args: argparse.Namespace) -> tuple:
    """The SVD img2vid workflow through ComfyUI's core nodes: (decoded frames, seconds)."""
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
    start = time.perf_counter()
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
        samples = nodes.common_ksampler(model, 0, args.steps, 2.5, "euler", "karras", positive, negative, latent)[0]
        images = nodes.VAEDecode().decode(vae, samples)[0]
    return images, time.perf_counter() - start


def run_variant(args: argparse.Namespace) -> dict:
    import folder_paths
    import nodes
    import torch

    from comfyui_streamline.nodes.memory_budget import MemoryBudget
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch
    from comfyui_streamline.tools import synthetic

    if args.model == "svd":
        images, seconds = run_svd_variant(args)
        return measured(args, images, seconds)
    work = Path(args.work)
    checkpoint, motion_file = prepare(work)
    folder_paths.add_model_folder_path("checkpoints", str(work / "checkpoints"))
    ade_nodes = synthetic.ade_module("nodes").NODE_CLASS_MAPPINGS
    utils_model = synthetic.ade_module("utils_model")
    folder_paths.add_model_folder_path(utils_model.Folders.ANIMATEDIFF_MODELS, str(work / "animatediff_models"))

    def ade(name, **inputs):
        cls = ade_nodes[name]
        return getattr(cls(), cls.FUNCTION)(**inputs)[0]

    height, width, frames = (int(v) for v in args.size.lower().split("x"))
    start = time.perf_counter()
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
        samples = nodes.common_ksampler(model, 0, args.steps, args.cfg, "euler", "normal", positive, negative, latent)[0]
        images = nodes.VAEDecode().decode(vae, samples)[0]
    return measured(args, images, time.perf_counter() - start)


def measured(args: argparse.Namespace, images, seconds: float) -> dict:
    """What one variant's process reports: its peaks over the whole run."""
    import torch

    result = {"variant": args.variant, "size": args.size, "steps": args.steps, "seconds": seconds,
              "frames_decoded": int(images.shape[0])}
    if args.device == "cuda":
        result["allocated_peak"] = torch.cuda.max_memory_allocated()
        result["reserved_peak"] = torch.cuda.max_memory_reserved()
        result["nvml"] = nvml_process_bytes()
    else:
        import resource

        result["rss_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def nvml_process_bytes() -> int | None:
    """This process's GPU memory as the driver counts it (CUDA context included), if pynvml is installed."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == os.getpid():
                return int(process.usedGpuMemory)
    except Exception:  # containers often hide other pids; the torch figures remain
        return None
    return None


def gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f} GB ({value / 2**30:.2f} GiB)"


def main(argv=None) -> None:
    args = parse_args(argv)
    svd = args.model == "svd"
    args.size = args.size or ("576x1024x14" if svd else "576x1024x16")
    args.variants = args.variants or (SVD_VARIANTS if svd else VARIANTS)
    if args.quick:
        args.size, args.steps = ("64x64x4", 1) if svd else ("64x64x2", 1)
        args.variants = ["comfyui", "streamline"] if svd else ["comfyui", "offload"]
    import hostenv

    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="paper_metric")
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="streamline-paper-metric-"))
    if svd:  # the random-weight files, before the variants' time limits start
        prepare_svd(work, args.quick)
        print(f"paper metric, SVD: whole ComfyUI img2vid workflow, {args.size} (HxWxF), CFG 2.5 (video linear), "
              f"{args.steps} steps, VAE decode, random SVD weights (UNet, video VAE, CLIP ViT-H), {args.device}; "
              "one process per variant", flush=True)
    else:
        prepare(work)
        print(f"paper metric: whole ComfyUI + ADE workflow, {args.size} (HxWxF), CFG {args.cfg}, {args.steps} steps, "
              f"VAE decode, random SD1.5 + mm_sd_v15_v2 weights, {args.device}; one process per variant", flush=True)
    columns = "allocated peak | reserved peak | NVML (process)" if args.device == "cuda" else "peak RSS (CPU)"
    print(f"| variant | {columns} | seconds |", flush=True)
    for variant in args.variants:
        command = [sys.executable, __file__, "--variant", variant, "--work", str(work), "--device", args.device,
                   "--size", args.size, "--steps", str(args.steps), "--cfg", str(args.cfg), "--model", args.model]
        if args.quick:
            command.append("--quick")
        if args.comfy:
            command += ["--comfy", args.comfy]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.limit_s)
        except subprocess.TimeoutExpired:
            print(f"| {variant} | stopped at its limit ({args.limit_s} s) | |", flush=True)
            continue
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            print(f"| {variant} | failed: {tail[0][:200]} | |", flush=True)
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        cells = (f"{gb(r['allocated_peak'])} | {gb(r['reserved_peak'])} | {gb(r['nvml'])}" if args.device == "cuda"
                 else gb(r["rss_peak"]))
        print(f"| {variant} | {cells} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
