"""Train TinyVideo (tinyvideo/model.py) on procedural videos (tinyvideo/data.py). Seeded and reproducible.

v-prediction objective on SD1.5's discrete schedule (ComfyUI's ModelSamplingDiscrete), classifier-free
guidance dropout per word slot, AdamW with warm-up and cosine decay, EMA weights saved as safetensors
(fp16) with every training stage's settings in the file's metadata, and the loss curve as CSV.

    python tools/train_tinyvideo.py --device cuda --steps 3000 --batch 32   # the same training on a GPU (not timed yet)
    python tools/train_tinyvideo.py --device cpu --steps 2000 --batch 4     # about 50 minutes on 2 cores

A later stage starts from a file (--init, with another --seed so that it sees new clips): the file it
writes lists both stages, and its losses continue the loss curve of the first.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=4, help="videos per step")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--drop-word", type=float, default=0.1, help="chance that a word slot is left empty")
    p.add_argument("--drop-prompt", type=float, default=0.1, help="chance that the whole prompt is empty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=Path, help="start from these TinyVideo weights (a second training stage; give "
                   "it another --seed so it sees new clips)")
    p.add_argument("--save-every", type=int, default=300)
    p.add_argument("--out", type=Path, default=hostenv.REPO_ROOT / "tinyvideo" / "tinyvideo-v1.safetensors")
    p.add_argument("--loss-csv", type=Path, default=hostenv.REPO_ROOT / "tinyvideo" / "card" / "loss.csv")
    return p.parse_args(argv)


STAGE_KEYS = ("steps", "batch", "frames", "size", "seed", "lr", "warmup", "ema", "drop_word", "drop_prompt", "device",
              "final_loss", "seconds")


def stages_of(path: Path) -> list[dict]:
    """The training stages a TinyVideo file records (a file from a single run is one stage)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return metadata.get("stages") or [{k: metadata[k] for k in STAGE_KEYS if k in metadata}]


def read_loss_curve(path: Path) -> list[tuple[int, float, float]]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [(int(r["step"]), float(r["loss"]), float(r["seconds"])) for r in csv.DictReader(f)]


def learning_rate(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None) -> None:
    args = parse_args(argv)
    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="train_tinyvideo")
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True  # SDPA: faster training, same math

    import torch

    from comfyui_streamline.tinyvideo import data
    from comfyui_streamline.tinyvideo import model as tinyvideo

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    unet = tinyvideo.build_training_unet(args.seed).to(device).train()
    prompt = tinyvideo.PromptEncoder().to(device).train()
    if args.init:
        from safetensors.torch import load_file

        unet_sd, prompt_sd = tinyvideo.split_state_dict(load_file(str(args.init)))
        unet.load_state_dict({k: v.float() for k, v in unet_sd.items()})
        prompt.load_state_dict({k: v.float() for k, v in prompt_sd.items()})
    ema_unet, ema_prompt = copy.deepcopy(unet).eval(), copy.deepcopy(prompt).eval()
    params = list(unet.parameters()) + list(prompt.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    sampling = tinyvideo.model_sampling()
    sigmas = sampling.sigmas.to(device)
    tinyvideo.set_video_length(unet, args.frames)
    options = tinyvideo.motion_transformer_options()
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    noise_gen = torch.Generator().manual_seed(args.seed + 2)
    print(f"TinyVideo: {tinyvideo.count_parameters(unet) / 1e6:.2f} M UNet parameters (motion modules included), "
          f"{args.batch} videos x {args.frames} frames x {args.size}^2 per step, {args.steps} steps on {device}")

    args.loss_csv.parent.mkdir(parents=True, exist_ok=True)
    earlier = stages_of(args.init) if args.init else []
    step_offset = sum(stage["steps"] for stage in earlier)
    rows = read_loss_curve(args.loss_csv) if earlier else []
    if rows and rows[-1][0] != step_offset:
        print(f"{args.loss_csv} does not end where {args.init} stopped (step {step_offset}): starting a new curve")
        rows = []
    seconds_offset = rows[-1][2] if rows else 0.0
    window, start = [], time.time()
    for step in range(args.steps):
        batch = data.sample_batch(args.batch, args.frames, args.size, data_gen)
        words = batch.words.clone()
        words[torch.rand(words.shape, generator=data_gen) < args.drop_word] = data.NO_WORD
        words[torch.rand(args.batch, generator=data_gen) < args.drop_prompt] = data.NO_WORD
        x0 = batch.videos.flatten(0, 1).to(device)  # (videos*frames, 4, h, w), video-major as the motion modules expect
        t = torch.randint(0, len(sigmas), (args.batch,), generator=noise_gen).to(device)
        sigma = sigmas[t].repeat_interleave(args.frames)  # one noise level per video
        noise = torch.randn(x0.shape, generator=noise_gen).to(device)
        noisy = sampling.calculate_input(sigma, x0 + noise * sigma[:, None, None, None])
        context = prompt(words.to(device)).repeat_interleave(args.frames, dim=0)
        predicted = unet(noisy, sampling.timestep(sigma).float(), context=context, transformer_options=options)
        loss = torch.nn.functional.mse_loss(predicted.float(), tinyvideo.v_target(x0, noise, sigma))

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for model, ema in ((unet, ema_unet), (prompt, ema_prompt)):
                for p, e in zip(model.parameters(), ema.parameters()):
                    e.lerp_(p, 1 - decay)

        window.append(loss.item())
        if (step + 1) % 25 == 0:
            seconds = round(seconds_offset + time.time() - start, 1)
            rows.append((step_offset + step + 1, sum(window) / len(window), seconds))
            window = []
            print(f"step {rows[-1][0]:5d}  loss {rows[-1][1]:.4f}  {rows[-1][2]:.0f} s", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            stage = {"steps": step + 1, "batch": args.batch, "frames": args.frames, "size": args.size, "seed": args.seed,
                     "lr": args.lr, "warmup": args.warmup, "ema": args.ema, "drop_word": args.drop_word,
                     "drop_prompt": args.drop_prompt, "device": args.device,
                     "final_loss": rows[-1][1] if rows else None, "seconds": round(time.time() - start, 1)}
            metadata = {"format": "tinyvideo-v1", "steps": step_offset + step + 1, "final_loss": stage["final_loss"],
                        "stages": [*earlier, stage]}
            tinyvideo.save_checkpoint(args.out, ema_unet, ema_prompt, metadata)
            with args.loss_csv.open("w", newline="") as f:
                csv.writer(f).writerows([("step", "loss", "seconds"), *rows])
    print(f"saved {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB), loss curve {args.loss_csv}")


if __name__ == "__main__":
    main()
