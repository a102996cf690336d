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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402
import training  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_common_options(p, steps=6000, lr=4e-4, warmup=200, ema=0.998, save_every=250, model="TinyWan",
                                out=hostenv.REPO_ROOT / "tinywan" / "tinywan-v1.safetensors",
                                loss_csv=hostenv.REPO_ROOT / "tinywan" / "card" / "loss.csv")
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
    sampling = tinywan.model_sampling()
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    noise_gen = torch.Generator().manual_seed(args.seed + 2)
    parameters = sum(p.numel() for p in wan.parameters())
    print(f"TinyWan: {parameters / 1e6:.2f} M WanModel parameters, {args.batch} videos x {args.frames} frames x "
          f"{args.size}^2 per step, {args.steps} steps on {device}", flush=True)

    run = training.TrainingRun(args, [wan, prompt])
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

        run.optimise(step, loss)
        if run.saves_after(step):
            tinywan.save_checkpoint(args.out, *run.emas, run.metadata(step))
            run.write_curve()
    print(f"saved {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB), loss curve {args.loss_csv}")


if __name__ == "__main__":
    main()
