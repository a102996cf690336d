"""The main job: generate a clip with the pack's trained TinyVideo model through the pack's nodes,
with ComfyUI as it is and with Streamline Model Patch, and print time and peak memory side by side.

Graph (the same nodes a user drags in): Load TinyVideo -> [Streamline Model Patch] -> KSampler ->
TinyVideo Decode, prompts from TinyVideo Prompt. Saves both clips as GIFs and checks they are the same
video (Streamline is exact: the difference is float rounding).

    python tools/demo.py                         # CPU: 16 frames, 32x32
    python tools/demo.py --device cuda --frames 32 --size 64

Peak memory: on CUDA torch.cuda.max_memory_allocated above what was allocated before the run (the weights
are loaded first); on CPU the live-tensor counter (core/memtrace.py), tensors made during sampling.
Time: each run timed on its own, without the counter.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--prompt", default="red circle bounce")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=32, help="clip width and height (TinyVideo's latent is the clip)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frame-chunk", type=int, default=4, help="Streamline Model Patch frame_chunk (0 = automatic)")
    p.add_argument("--spatial-chunk", type=int, default=128, help="Streamline Model Patch spatial_chunk (0 = automatic)")
    p.add_argument("--out", type=Path, default=hostenv.REPO_ROOT / "output",
                   help="folder for the GIFs (default: output/ in the pack)")
    return p.parse_args(argv)


def run_graph(model, args, measure_memory: bool):
    """KSampler -> TinyVideo Decode, as the graph runs them. Returns (frames, seconds, peak bytes or None)."""
    import comfy.model_management
    import nodes as comfy_nodes
    import torch

    from comfyui_streamline.core.memtrace import LiveTensorMeter
    from comfyui_streamline.nodes.tinyvideo import TinyVideoDecode, TinyVideoPrompt

    positive = TinyVideoPrompt.execute(model, args.prompt).result[0]
    negative = TinyVideoPrompt.execute(model, "").result[0]
    latent = comfy_nodes.EmptyLatentImage().generate(args.size * 8, args.size * 8, args.frames)[0]

    def sample():
        return comfy_nodes.KSampler().sample(model, args.seed, args.steps, args.cfg, "euler", "normal",
                                             positive, negative, latent)[0]

    peak = None
    if args.device == "cuda":
        comfy.model_management.load_models_gpu([model])
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if measure_memory and args.device == "cpu":
        with LiveTensorMeter() as meter:
            samples = sample()
        peak = meter.peak_bytes
    else:
        samples = sample()
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - held
    seconds = time.perf_counter() - start
    frames = TinyVideoDecode.execute(samples, 8).result[0]
    return samples["samples"], frames, seconds, peak


def main(argv=None) -> None:
    args = parse_args(argv)
    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="demo")

    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch
    from comfyui_streamline.nodes.tinyvideo import TinyVideoLoader
    from comfyui_streamline.tinyvideo.media import save_gif

    model = TinyVideoLoader.execute().result[0]
    patched = StreamlineModelPatch.execute(model, args.frame_chunk, args.spatial_chunk).result[0]
    print(f'TinyVideo "{args.prompt}": {args.frames} frames at {args.size}x{args.size}, {args.steps} euler steps, '
          f"CFG {args.cfg}, seed {args.seed}, on {args.device}")
    results = {}
    for name, m in (("ComfyUI", model), ("Streamline", patched)):
        run_graph(m, args, measure_memory=False)  # warm-up: first-call allocations and kernel choice
        latent, frames, seconds, peak = run_graph(m, args, measure_memory=args.device == "cuda")
        if args.device == "cpu":
            peak = run_graph(m, args, measure_memory=True)[3]
        results[name] = (latent, frames, seconds, peak)
    print(f"{'':12s} {'time':>8s} {'peak memory':>12s}")
    base = results["ComfyUI"]
    for name, (_, _, seconds, peak) in results.items():
        ratio = "" if name == "ComfyUI" else (f"   {base[3] / peak:.2f}x less memory, {seconds / base[2]:.2f}x the time")
        print(f"{name:12s} {seconds:7.2f}s {peak / 2**20:9.1f} MiB{ratio}")
    difference = (results["Streamline"][0] - base[0]).abs().max() / base[0].abs().max()
    print(f"largest difference between the two clips (relative to the largest value): {difference.item():.1e}")
    slug = args.prompt.replace(" ", "_")
    for name, (_, frames, _, _) in results.items():
        path = save_gif(frames, args.out / f"tinyvideo_{slug}_{name.lower()}.gif")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
