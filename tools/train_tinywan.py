"""Train TinyWan (tinywan/model.py: ComfyUI's WanModel at reduced size) on TinyVideo's procedural clips.

Rectified flow as Wan (x = (1 - sigma) x0 + sigma noise, target noise - x0; sigmas drawn uniformly and
shifted as sampling shifts them), classifier-free guidance dropout per word slot, AdamW with warm-up and
cosine decay, EMA weights saved as safetensors (fp16) with every setting in the file's metadata, and the
loss curve as CSV. The file is written every --save-every steps, so a stopped run leaves usable weights.

    python tools/train_tinywan.py                                   # CPU defaults (the shipped weights)
    python tools/train_tinywan.py --device cuda --batch 32          # the same training on a GPU (not timed)
"""
from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402
from train_tinyvideo import learning_rate, read_loss_curve, stages_of  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=4, help="videos per step")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--drop-word", type=float, default=0.1, help="chance that a word slot is left empty")
    p.add_argument("--drop-prompt", type=float, default=0.1, help="chance that the whole prompt is empty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=Path, help="start from these TinyWan weights (a second stage; give it another --seed)")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--out", type=Path, default=hostenv.REPO_ROOT / "tinywan" / "tinywan-v1.safetensors")
    p.add_argument("--loss-csv", type=Path, default=hostenv.REPO_ROOT / "tinywan" / "card" / "loss.csv")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="train_tinywan")
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True  # SDPA: faster training, same math

    import torch

    from comfyui_streamline.tinyvideo import data
    from comfyui_streamline.tinyvideo.model import PromptEncoder, split_state_dict
    from comfyui_streamline.tinywan import model as tinywan

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    wan = tinywan.build_training_model(args.seed).to(device).train()
    prompt = PromptEncoder().to(device).train()
    if args.init:
        from safetensors.torch import load_file

        wan_sd, prompt_sd = split_state_dict(load_file(str(args.init)))
        wan.load_state_dict({k: v.float() for k, v in wan_sd.items()})
        prompt.load_state_dict({k: v.float() for k, v in prompt_sd.items()})
    ema_wan, ema_prompt = copy.deepcopy(wan).eval(), copy.deepcopy(prompt).eval()
    params = list(wan.parameters()) + list(prompt.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    sampling = tinywan.model_sampling()
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    noise_gen = torch.Generator().manual_seed(args.seed + 2)
    parameters = sum(p.numel() for p in wan.parameters())
    print(f"TinyWan: {parameters / 1e6:.2f} M WanModel parameters, {args.batch} videos x {args.frames} frames x "
          f"{args.size}^2 per step, {args.steps} steps on {device}", flush=True)

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
        x0 = tinywan.to_wan_layout(batch.videos).to(device)  # (videos, 4, frames, h, w)
        sigma = tinywan.shifted_sigmas(torch.rand(args.batch, generator=noise_gen)).clamp_min(1e-3).to(device)
        noise = torch.randn(x0.shape, generator=noise_gen).to(device)
        noisy = sampling.noise_scaling(sigma, noise, x0)
        predicted = wan(noisy, sampling.timestep(sigma).float(), prompt(words.to(device)))
        loss = torch.nn.functional.mse_loss(predicted.float(), tinywan.flow_target(x0, noise))

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for model, ema in ((wan, ema_wan), (prompt, ema_prompt)):
                for p, e in zip(model.parameters(), ema.parameters()):
                    e.lerp_(p, 1 - decay)

        window.append(loss.item())
        if (step + 1) % 25 == 0:
            seconds = round(seconds_offset + time.time() - start, 1)
            rows.append((step_offset + step + 1, sum(window) / len(window), seconds))
            window = []
            print(f"step {rows[-1][0]:5d}  loss {rows[-1][1]:.4f}  {rows[-1][2]:.0f} s", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            stage = {"steps": step + 1, "planned_steps": args.steps, "batch": args.batch, "frames": args.frames,
                     "size": args.size, "seed": args.seed, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
                     "drop_word": args.drop_word, "drop_prompt": args.drop_prompt, "device": args.device,
                     "threads": torch.get_num_threads(), "final_loss": rows[-1][1] if rows else None,
                     "seconds": round(time.time() - start, 1)}
            metadata = {"steps": step_offset + step + 1, "final_loss": stage["final_loss"], "stages": [*earlier, stage]}
            tinywan.save_checkpoint(args.out, ema_wan, ema_prompt, metadata)
            with args.loss_csv.open("w", newline="") as f:
                csv.writer(f).writerows([("step", "loss", "seconds"), *rows])
    print(f"saved {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB), loss curve {args.loss_csv}")


if __name__ == "__main__":
    main()
