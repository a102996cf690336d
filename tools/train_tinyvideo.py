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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402
import training  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_common_options(p, steps=2000, lr=5e-4, warmup=100, ema=0.995, save_every=300, model="TinyVideo",
                                out=hostenv.REPO_ROOT / "tinyvideo" / "tinyvideo-v1.safetensors",
                                loss_csv=hostenv.REPO_ROOT / "tinyvideo" / "card" / "loss.csv")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="train_tinyvideo")
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True  # SDPA: faster training, same math

    import torch

    from comfyui_streamline.tinyvideo import data
    from comfyui_streamline.tinyvideo import model as tinyvideo

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    unet = tinyvideo.build_training_unet(args.seed).to(device).train()
    prompt = tinyvideo.PromptEncoder().to(device).train()
    if args.init:
        from safetensors.torch import load_file

        unet_sd, prompt_sd = tinyvideo.split_state_dict(load_file(str(args.init)))
        unet.load_state_dict({k: v.float() for k, v in unet_sd.items()})
        prompt.load_state_dict({k: v.float() for k, v in prompt_sd.items()})
    sampling = tinyvideo.model_sampling()
    sigmas = sampling.sigmas.to(device)
    tinyvideo.set_video_length(unet, args.frames)
    options = tinyvideo.motion_transformer_options()
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    noise_gen = torch.Generator().manual_seed(args.seed + 2)
    print(f"TinyVideo: {tinyvideo.count_parameters(unet) / 1e6:.2f} M UNet parameters (motion modules included), "
          f"{args.batch} videos x {args.frames} frames x {args.size}^2 per step, {args.steps} steps on {device}")

    run = training.TrainingRun(args, [unet, prompt])
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

        run.optimise(step, loss)
        if run.saves_after(step):
            tinyvideo.save_checkpoint(args.out, *run.emas, {"format": "tinyvideo-v1", **run.metadata(step)})
            run.write_curve()
    print(f"saved {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB), loss curve {args.loss_csv}")


if __name__ == "__main__":
    main()
