"""Quality report of the pack's small trained models (TinyVideo, TinyWan): did the shipped model learn the data?

Writes into tinyvideo/card/ (or tinywan/card/ with --model tinywan; the model card links these):
- samples.png / samples.gif: one clip per prompt (every colour, shape and motion), full sampling;
- data.png: clips from the data generator for the same prompts, to compare with;
- loss.png: the training loss curve (from loss.csv, written by tools/train_tinyvideo.py / train_tinywan.py);
- report.md: denoising loss of the shipped weights against the untrained model on held-out clips, per
  noise level, and the frame and video checks (tinyvideo/stats.py) of every sample.

    python tools/tinyvideo_report.py
    python tools/tinyvideo_report.py --model tinywan
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402

PROMPTS = ("red circle slide", "green square bounce", "blue triangle pulse", "yellow circle pan",
           "blue square slide", "yellow triangle bounce", "red square pulse", "green triangle pan",
           "green circle slide", "red triangle bounce", "yellow square pulse", "blue circle pan")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--model", default="tinyvideo", choices=["tinyvideo", "tinywan"])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, help="default: 5 for tinyvideo, 3 for tinywan (its model card)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", help="default: normal for tinyvideo, simple (Wan's) for tinywan")
    return p.parse_args(argv)


def model_spec(name: str) -> dict:
    """What differs between the two models: files, loaders, noise levels and labels."""
    from comfyui_streamline.nodes.tinyvideo import TinyVideoLoader, TinyWanLoader
    from comfyui_streamline.tinyvideo import model as tinyvideo
    from comfyui_streamline.tinywan import model as tinywan

    if name == "tinywan":
        return {"title": "TinyWan", "module": tinywan, "loader": TinyWanLoader, "scheduler": "simple", "cfg": 3.0,
                "sigmas": (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95),
                "loss_label": "TinyWan training loss (rectified-flow MSE, mean of 25 steps)"}
    return {"title": "TinyVideo", "module": tinyvideo, "loader": TinyVideoLoader, "scheduler": "normal", "cfg": 5.0,
            "sigmas": (0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 14.6),
            "loss_label": "TinyVideo training loss (v-prediction MSE, mean of 25 steps)"}


def main(argv=None) -> None:
    args = parse_args(argv)
    hostenv.enter_for_tool(args.comfy, cpu=True, tool="tinyvideo_report")
    import torch

    from comfyui_streamline.nodes.tinyvideo import decode, sample_clip
    from comfyui_streamline.tinyvideo import data, media, stats

    spec = model_spec(args.model)
    tinyvideo = spec["module"]
    scheduler = args.scheduler or spec["scheduler"]
    args.cfg = args.cfg if args.cfg is not None else spec["cfg"]
    card = tinyvideo.WEIGHTS_PATH.parent / "card"
    trained = spec["loader"].execute().result[0]
    untrained = tinyvideo.load_model_patcher(state_dict=tinyvideo.untrained_state_dict())
    from training import stages_of

    command = "python tools/tinyvideo_report.py" + (" --model tinywan" if args.model == "tinywan" else "")
    lines = [f"# {spec['title']} quality report", "", f"Made by `{command}` for "
             f"`{tinyvideo.WEIGHTS_PATH.name}` ({tinyvideo.WEIGHTS_PATH.stat().st_size / 2**20:.1f} MiB).", "",
             "Training (from the file's metadata):", ""]
    lines += [f"- stage {i}: " + ", ".join(f"{k} {v}" for k, v in stage.items())
              for i, stage in enumerate(stages_of(tinyvideo.WEIGHTS_PATH), start=1)]
    lines.append("")

    held_out = data.sample_batch(16, args.frames, args.size, torch.Generator().manual_seed(99))
    lines += ["## Denoising loss on held-out clips", "",
              "Mean squared error of the noise the model infers (from its denoised output) on 16 clips the training never saw (generator seed 99; training drew from "
              "seed 1), each noised at the given level. The untrained model is the same architecture at its "
              "initialisation (where training started).", "",
              "| sigma | shipped weights | untrained | ratio |", "|---|---|---|---|"]
    for sigma in spec["sigmas"]:
        a = tinyvideo.denoising_loss(trained, held_out.videos, held_out.words, torch.tensor([sigma]))
        b = tinyvideo.denoising_loss(untrained, held_out.videos, held_out.words, torch.tensor([sigma]))
        lines.append(f"| {sigma} | {a:.4f} | {b:.4f} | {b / a:.0f}x |")
        print(lines[-1], flush=True)

    ranges = stats.data_ranges(args.frames, args.size)
    lines += ["", "## Samples, the frame check and the video check", "",
              f"{args.frames} frames at {args.size}x{args.size}, {args.steps} euler steps, CFG {args.cfg}, seed "
              f"{args.seed}, scheduler {scheduler}. The frame check (tinyvideo/stats.py) asks for one saturated shape per frame in at least "
              "75% of frames, a foreground share in the data's range and the asked colour. On the generator's own "
              f"clips: foreground share {ranges.foreground_fraction[0]:.3f}..{ranges.foreground_fraction[1]:.3f} "
              f"(1st..99th percentile), motion {ranges.motion[0]:.2f}..{ranges.motion[1]:.2f} px/frame.", "",
              "The video check (same module) asks that the shape keep its colour in at least 75% of frames and "
              f"move no more than 1.5x the data's fastest shapes ({ranges.motion[1]:.2f} px/frame).", "",
              "| prompt | foreground | one shape in | colour | keeps colour | motion px/frame | frame check | video check |",
              "|---|---|---|---|---|---|---|---|"]
    sampled, reference = [], []
    g = torch.Generator().manual_seed(args.seed)
    frames_passed = videos_passed = 0
    for prompt in PROMPTS:
        frames = decode(sample_clip(trained, prompt, frames=args.frames, size=args.size, steps=args.steps,
                                    cfg=args.cfg, seed=args.seed, scheduler=scheduler))
        s = stats.clip_stats(frames.permute(0, 3, 1, 2))
        frame_problems = stats.frame_problems(s, ranges, prompt.split()[0])
        video_problems = stats.temporal_problems(s, ranges)
        frames_passed += not frame_problems
        videos_passed += not video_problems
        lines.append(f"| {prompt} | {s.foreground_fraction:.3f} | {s.single_shape_share:.0%} of frames | {s.colour} | "
                     f"{s.colour_consistency:.0%} | {s.motion:.2f} | {'; '.join(frame_problems) or 'pass'} | "
                     f"{'; '.join(video_problems) or 'pass'} |")
        print(lines[-1], flush=True)
        sampled.append(frames)
        words = torch.tensor([data.prompt_words(prompt)])
        reference.append(decode(data.render(words, args.frames, args.size, g)[0]))
    untrained_frames = decode(sample_clip(untrained, PROMPTS[0], frames=args.frames, size=args.size,
                                         steps=args.steps, cfg=args.cfg, seed=args.seed, scheduler=scheduler))
    untrained_problems = stats.frame_problems(stats.clip_stats(untrained_frames.permute(0, 3, 1, 2)), ranges, "red")
    lines += ["", f"Frame check: {frames_passed} of {len(PROMPTS)} samples pass; video check: {videos_passed} of "
              f"{len(PROMPTS)}. The untrained network's clip for \"{PROMPTS[0]}\", frame check: "
              f"{'; '.join(untrained_problems) or 'pass'}.", ""]

    def enlarge(clip, factor=4):
        return clip.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)

    media.save_strip([enlarge(c) for c in sampled], card / "samples.png")
    media.save_strip([enlarge(c) for c in reference], card / "data.png")
    media.save_gif(media.tile([enlarge(c) for c in sampled], columns=4), card / "samples.gif")
    with (card / "loss.csv").open() as f:
        rows = list(csv.DictReader(f))
    media.save_line_plot([float(r["step"]) for r in rows], [float(r["loss"]) for r in rows], card / "loss.png",
                         spec["loss_label"])
    lines += ["Rows of `samples.png` (and the grid of `samples.gif`, left to right, top to bottom) follow the "
              "table; `data.png` shows the generator's clips for the same prompts.", ""]
    (card / "report.md").write_text("\n".join(lines))
    print(f"wrote {card / 'report.md'}, samples.png, samples.gif, data.png, loss.png")


if __name__ == "__main__":
    main()
