"""The main job: generate a clip with the pack's trained TinyVideo model through the pack's nodes,
with ComfyUI as it is and with Streamline Model Patch, and print time and peak memory side by side.

Graph (the same nodes a user drags in): Load TinyVideo -> [Streamline Model Patch] -> KSampler ->
TinyVideo Decode, prompts from TinyVideo Prompt. Saves both clips as GIFs in ComfyUI's output folder
and checks they are the same video (Streamline is exact: the difference is float rounding).

    python tools/demo.py                         # CPU: 16 frames, 32x32 (about half a minute on 2 cores)
    python tools/demo.py --device cuda --frames 32 --size 64

It runs in labelled stages: a one-step warm-up of each model (first-call allocations, kernel choice),
the two timed runs, and on the CPU one step of each under the memory counter (every step's UNet forward
has the same peak). Peak memory: on CUDA the allocator's active bytes above what was held before the run
(the weights are loaded first), read in the timed runs through core/meter.py's measure_peak, which resets
no counter; on CPU the live-tensor counter (core/memtrace.py): tensors made during sampling.
"""
from __future__ import annotations

import argparse
import logging
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
    p.add_argument("--frame-chunk", type=int, default=8, help="Streamline Model Patch frame_chunk (0 = automatic)")
    p.add_argument("--spatial-chunk", type=int, default=256, help="Streamline Model Patch spatial_chunk (0 = automatic)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the GIFs (default: ComfyUI's output folder, as Save nodes use it)")
    return p.parse_args(argv)


class Graph:
    """KSampler -> TinyVideo Decode on one model, as the graph runs them."""

    def __init__(self, model, args):
        import nodes as comfy_nodes

        from comfyui_streamline.nodes.tinyvideo import TinyVideoPrompt

        self.model, self.args = model, args
        self.positive = TinyVideoPrompt.execute(model, args.prompt).result[0]
        self.negative = TinyVideoPrompt.execute(model, "").result[0]
        self.latent = comfy_nodes.EmptyLatentImage().generate(args.size * 8, args.size * 8, args.frames)[0]

    def sample(self, steps: int):
        import nodes as comfy_nodes

        a = self.args
        return comfy_nodes.KSampler().sample(self.model, a.seed, steps, a.cfg, "euler", "normal", self.positive,
                                             self.negative, self.latent)[0]

    def timed(self):
        """The full run: (latent, frames, seconds, CUDA peak bytes or None)."""
        import comfy.model_management
        import torch

        from comfyui_streamline.core.meter import measure_peak
        from comfyui_streamline.nodes.tinyvideo import TinyVideoDecode

        cuda = self.args.device == "cuda"
        if not cuda:
            start = time.perf_counter()
            samples = self.sample(self.args.steps)
            seconds, peak = time.perf_counter() - start, None
            return samples["samples"], TinyVideoDecode.execute(samples, 8).result[0], seconds, peak
        comfy.model_management.load_models_gpu([self.model])
        # ballast: this process reads no whole-process figure, and every window is then exact
        with measure_peak(torch.device("cuda"), ballast=True) as window:
            start = time.perf_counter()
            samples = self.sample(self.args.steps)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        peak = window.peak.bytes
        return samples["samples"], TinyVideoDecode.execute(samples, 8).result[0], seconds, peak

    def counted_peak(self) -> int:
        """Peak bytes of tensors made during one sampling step (CPU live-tensor counter)."""
        from comfyui_streamline.core.memtrace import LiveTensorMeter

        with LiveTensorMeter() as meter:
            self.sample(1)
        return meter.peak_bytes


class ReportCatcher(logging.Handler):
    """Keeps the pack's per-run report (techniques/report.py) of the latest run."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.latest = ""

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Streamline Model Patch, this run"):
            self.latest = message


def output_folder(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    import folder_paths

    return Path(folder_paths.get_output_directory())


def main(argv=None) -> None:
    args = parse_args(argv)
    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="demo")

    from comfyui_streamline.host.log import logger

    # the pack's notices: warnings on the console; the per-run reports kept, the timed run's printed at the end
    catcher, console = ReportCatcher(), logging.StreamHandler()
    console.setLevel(logging.WARNING)
    saved = logger.level, logger.propagate
    logger.addHandler(catcher)
    logger.addHandler(console)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        run(args, catcher)
    finally:  # main() may run inside another program (the tests): leave its logging as it was
        logger.removeHandler(catcher)
        logger.removeHandler(console)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def run(args, catcher: "ReportCatcher") -> None:
    from comfyui_streamline.nodes.model_patch import StreamlineModelPatch
    from comfyui_streamline.nodes.tinyvideo import TinyVideoLoader
    from comfyui_streamline.tinyvideo.media import save_gif

    model = TinyVideoLoader.execute().result[0]
    patched = StreamlineModelPatch.execute(model, args.frame_chunk, args.spatial_chunk).result[0]
    graphs = {"ComfyUI": Graph(model, args), "Streamline": Graph(patched, args)}
    print(f'TinyVideo "{args.prompt}": {args.frames} frames at {args.size}x{args.size}, {args.steps} euler steps, '
          f"CFG {args.cfg}, seed {args.seed}, on {args.device}; Streamline Model Patch frame_chunk "
          f"{args.frame_chunk}, spatial_chunk {args.spatial_chunk}")
    passes = 4 if args.device == "cpu" else 3
    step = iter(range(1, passes + 1))

    def say(text: str) -> None:
        print(f"[{next(step)}/{passes}] {text}", flush=True)

    say("warm-up: one step of each (first-call allocations, kernel choice)")
    for graph in graphs.values():
        graph.sample(1)
    results, report = {}, ""
    for name, graph in graphs.items():
        say(f"{name}: {args.steps} steps, timed")
        results[name] = list(graph.timed())
        print(f"      {results[name][2]:.2f} s")
        if name == "Streamline":
            report = catcher.latest
    if args.device == "cpu":
        say("peak memory: one step of each under the live-tensor counter")
        for name, graph in graphs.items():
            results[name][3] = graph.counted_peak()

    print(f"\n{'':12s} {'time':>8s} {'peak memory':>12s}")
    base = results["ComfyUI"]
    for name, (_, _, seconds, peak) in results.items():
        ratio = "" if name == "ComfyUI" else f"   {base[3] / peak:.2f}x less memory, {seconds / base[2]:.2f}x the time"
        print(f"{name:12s} {seconds:7.2f}s {peak / 2**20:9.1f} MiB{ratio}")
    difference = (results["Streamline"][0] - base[0]).abs().max() / base[0].abs().max()
    print(f"largest difference between the two clips (relative to the largest value): {difference.item():.1e}")
    if report:
        print(f"\nWhat Streamline reported for its run (on the node, in ComfyUI):\n{report}")
    slug = args.prompt.replace(" ", "_")
    folder = output_folder(args.out)
    for name, (_, frames, _, _) in results.items():
        path = save_gif(frames, folder / f"tinyvideo_{slug}_{name.lower()}.gif")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
