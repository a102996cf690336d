"""What the pack's two trainers (train_tinyvideo.py, train_tinywan.py) share: the options, the learning-rate
schedule, the optimiser step with EMA weights, and the loss curve with the training stages a file records.
Each trainer keeps only what is its own: the model, its noise parameterisation and its checkpoint format."""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import time
from pathlib import Path

STAGE_KEYS = ("steps", "batch", "frames", "size", "seed", "lr", "warmup", "ema", "drop_word", "drop_prompt", "device",
              "final_loss", "seconds")
LOG_EVERY = 25  # steps per loss-curve point


def add_common_options(p: argparse.ArgumentParser, *, steps: int, lr: float, warmup: int, ema: float,
                       save_every: int, out: Path, loss_csv: Path, model: str) -> None:
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=4, help="videos per step")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--ema", type=float, default=ema)
    p.add_argument("--drop-word", type=float, default=0.1, help="chance that a word slot is left empty")
    p.add_argument("--drop-prompt", type=float, default=0.1, help="chance that the whole prompt is empty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=Path, help=f"start from these {model} weights (a second training stage; give it "
                   "another --seed so it sees new clips)")
    p.add_argument("--save-every", type=int, default=save_every)
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--loss-csv", type=Path, default=loss_csv)


def stages_of(path: Path) -> list[dict]:
    """The training stages a TinyVideo / TinyWan file records (a file from a single run is one stage)."""
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
    """Linear warm-up, then cosine decay to 10% of args.lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class TrainingRun:
    """One training stage of `models`: AdamW (betas 0.9/0.99, weight decay 0.01, gradient clip 1) on the
    schedule above, EMA copies of the models (what is saved), and the loss curve, continued from the file
    given with --init."""

    def __init__(self, args, models: list):
        import torch

        self.args, self.models = args, models
        self.emas = [copy.deepcopy(m).eval() for m in models]
        self.params = [p for m in models for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
        args.loss_csv.parent.mkdir(parents=True, exist_ok=True)
        self.earlier = stages_of(args.init) if args.init else []
        self.step_offset = sum(stage["steps"] for stage in self.earlier)
        self.rows = read_loss_curve(args.loss_csv) if self.earlier else []
        if self.rows and self.rows[-1][0] != self.step_offset:
            print(f"{args.loss_csv} does not end where {args.init} stopped (step {self.step_offset}): starting a new curve")
            self.rows = []
        self.seconds_offset = self.rows[-1][2] if self.rows else 0.0
        self.window: list[float] = []
        self.start = time.time()

    def optimise(self, step: int, loss) -> None:
        """One optimiser step on `loss`, then the EMA update and the loss curve."""
        import torch

        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, self.args)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        with torch.no_grad():
            decay = min(self.args.ema, (1 + step) / (10 + step))
            for model, ema in zip(self.models, self.emas):
                for p, e in zip(model.parameters(), ema.parameters()):
                    e.lerp_(p, 1 - decay)
        self.window.append(loss.item())
        if (step + 1) % LOG_EVERY == 0:
            seconds = round(self.seconds_offset + time.time() - self.start, 1)
            self.rows.append((self.step_offset + step + 1, sum(self.window) / len(self.window), seconds))
            self.window = []
            print(f"step {self.rows[-1][0]:5d}  loss {self.rows[-1][1]:.4f}  {self.rows[-1][2]:.0f} s", flush=True)

    def saves_after(self, step: int) -> bool:
        return (step + 1) % self.args.save_every == 0 or step + 1 == self.args.steps

    def metadata(self, step: int) -> dict:
        """The file's training record after `step`: this stage's settings appended to the earlier stages."""
        import torch

        a = self.args
        stage = {"steps": step + 1, "planned_steps": a.steps, "batch": a.batch, "frames": a.frames, "size": a.size,
                 "seed": a.seed, "lr": a.lr, "warmup": a.warmup, "ema": a.ema, "drop_word": a.drop_word,
                 "drop_prompt": a.drop_prompt, "device": a.device, "threads": torch.get_num_threads(),
                 "final_loss": self.rows[-1][1] if self.rows else None, "seconds": round(time.time() - self.start, 1)}
        return {"steps": self.step_offset + step + 1, "final_loss": stage["final_loss"], "stages": [*self.earlier, stage]}

    def write_curve(self) -> None:
        with self.args.loss_csv.open("w", newline="") as f:
            csv.writer(f).writerows([("step", "loss", "seconds"), *self.rows])
