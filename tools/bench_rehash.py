"""Benchmark: end-to-end AnimateDiff sampling with Step Rehash against full sampling, ComfyUI's
EasyCache and LazyCache, and a DeepCache-style fixed interval, on the same seed and conditioning.

Prints wall time, speedup over full sampling (measured side by side in this run) and fidelity against
full sampling: PSNR and SSIM of the final latents and, for TinyVideo, of the decoded frames, plus how
many clips still pass the TinyVideo frame check (one shape of the asked colour, tinyvideo/stats.py).

Three models:
- tinyvideo (default on cpu): the pack's trained model (tinyvideo/), so fidelity means something; the
  numbers are averaged over several prompts.
- tinywan: the pack's trained Wan-architecture model (tinywan/: ComfyUI's WanModel, rectified flow), the
  same prompts and checks; Step Rehash splits it at its first and last blocks.
- sd15-random (default on cuda): SD1.5 UNet + mm_sd_v15_v2 shapes with random weights, for speed at real
  sizes; its fidelity numbers say little about a trained model and are printed with that caveat.

    python tools/bench_rehash.py --device cpu                          # TinyVideo 32x32x8, 4 prompts
    python tools/bench_rehash.py --device cpu --model tinywan          # TinyWan 32x32x8, 4 prompts
    python tools/bench_rehash.py --device cuda                         # SD1.5 shapes 512x512x16, 25 steps
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", choices=["tinyvideo", "tinywan", "sd15-random"],
                   help="default: tinyvideo on cpu, sd15-random on cuda")
    p.add_argument("--size", help="WIDTHxHEIGHTxFRAMES in pixels (default: 32x32x8 for tinyvideo, whose latent is "
                   "the clip; 512x512x16 for sd15-random on cuda, 64x64x8 on cpu)")
    p.add_argument("--prompts", nargs="+", default=["red circle bounce", "blue square slide",
                                                      "green triangle pulse", "yellow circle pan"],
                   help="TinyVideo prompts (fidelity is averaged over them)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--full-steps", type=int, default=13, help="key-step search: steps computed in full (paper: 13)")
    p.add_argument("--threshold", type=float, default=0.15, help="adaptive Step Rehash threshold (also run at twice this)")
    p.add_argument("--easycache-threshold", type=float, default=0.2)
    p.add_argument("--easycache-sweep", type=float, nargs="*", default=[],
                   help="more EasyCache and LazyCache thresholds to run (to compare at equal speed)")
    p.add_argument("--fixed-intervals", type=int, nargs="*", default=[],
                   help="more fixed Step Rehash intervals to run (warm-up 2, tail 1, extrapolate)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", help="default: normal (simple, Wan's, for tinywan)")
    p.add_argument("--cfg", type=float, help="default: 5 for tinyvideo, 3 for tinywan (its model card), 7.5 for sd15-random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-block", type=int, default=-1,
                   help="Step Rehash cache point: output block whose output is cached (-1 = default, the second-to-last)")
    p.add_argument("--streamline", action="store_true", help="also apply Streamline Model Patch (automatic chunks)")
    p.add_argument("--methods", nargs="+", metavar="PREFIX",
                   help="run only the methods whose names start with one of these (full sampling always runs, "
                        "first; a cond/uncond unbatched row only when its prefix says unbatched): a short GPU run")
    return p.parse_args(argv)


def selected(name: str, prefixes: list[str]) -> bool:
    """--methods: the name starts with one of the prefixes; an unbatched row only when its prefix says so."""
    return any(name.startswith(p) and ("unbatched" not in name or "unbatched" in p) for p in prefixes)


def build_model_and_cases(args, work: Path):
    """The MODEL and the sampling cases [(label, positive, negative, latent)] for --model."""
    import torch

    width, height, frames = (int(v) for v in args.size.split("x"))
    if args.model in ("tinyvideo", "tinywan"):
        from comfyui_streamline.nodes.tinyvideo import TinyVideoLoader, TinyVideoPrompt, TinyWanLoader

        model = (TinyWanLoader if args.model == "tinywan" else TinyVideoLoader).execute().result[0]
        negative = TinyVideoPrompt.execute(model, "").result[0]
        latent = {"samples": torch.zeros(1, 4, frames, height, width) if args.model == "tinywan" else
                  torch.zeros(frames, 4, height, width)}
        return model, [(p, TinyVideoPrompt.execute(model, p).result[0], negative, latent) for p in args.prompts]

    from comfyui_streamline.testing import synthetic

    model = synthetic.ade_model_patcher(work / "animatediff_models", pe_len=max(32, frames))
    positive, negative = synthetic.random_conds()
    return model, [("random prompt", positive, negative, {"samples": torch.zeros(frames, 4, height // 8, width // 8)})]


class CacheStepCounter:
    """The steps ComfyUI's EasyCache and LazyCache computed in full, from the line each logs at the end of a
    run ("EasyCache - skipped 12/25 steps"); with several prompts, the mean."""

    PATTERN = r"(EasyCache|LazyCache) - skipped (\d+)/(\d+) steps"

    def __init__(self):
        self.runs: list[tuple[int, int]] = []

    @classmethod
    def install(cls) -> "CacheStepCounter":
        import logging
        import re

        counter = cls()

        class Handler(logging.Handler):
            def emit(self, record):
                found = re.search(cls.PATTERN, record.getMessage())
                if found:
                    counter.runs.append((int(found[3]) - int(found[2]), int(found[3])))

        logging.getLogger().addHandler(Handler(logging.INFO))
        if logging.getLogger().level > logging.INFO:
            logging.getLogger().setLevel(logging.INFO)
        return counter

    def clear(self) -> None:
        self.runs.clear()

    @property
    def last(self) -> str | None:
        if not self.runs:
            return None
        full = sum(f for f, _ in self.runs) / len(self.runs)
        return f"{full:g}/{self.runs[0][1]}" + (" (mean)" if len({f for f, _ in self.runs}) > 1 else "")


def main(argv=None) -> None:
    args = parse_args(argv)
    args.model = args.model or ("tinyvideo" if args.device == "cpu" else "sd15-random")
    args.scheduler = args.scheduler or ("simple" if args.model == "tinywan" else "normal")
    args.size = args.size or ("32x32x8" if args.model in ("tinyvideo", "tinywan") else
                              "512x512x16" if args.device == "cuda" else "64x64x8")
    args.cfg = args.cfg if args.cfg is not None else {"tinyvideo": 5.0, "tinywan": 3.0}.get(args.model, 7.5)
    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="bench_rehash")

    import nodes
    import torch
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    from comfyui_streamline.core.fidelity import psnr, ssim
    from comfyui_streamline.core.rehash import RehashConfig, fixed_full_steps
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.techniques.slicing import apply_streamline
    from comfyui_streamline.host.options import REHASH_KEY as STATE_KEY
    from comfyui_streamline.techniques.rehash import apply_rehash
    from comfyui_streamline.nodes.tinyvideo import decode
    from comfyui_streamline.tinyvideo import stats

    work = Path(tempfile.mkdtemp(prefix="streamline-bench-"))
    model, cases = build_model_and_cases(args, work)
    if args.streamline:
        model = apply_streamline(model, SliceConfig())
    tinyvideo = args.model in ("tinyvideo", "tinywan")  # both make TinyVideo clips: decoded and checked
    frames = int(args.size.split("x")[2])
    ranges = stats.data_ranges(frames, int(args.size.split("x")[0])) if tinyvideo else None

    def sample(m, case) -> tuple[torch.Tensor, float]:
        _, positive, negative, latent = case
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            (out,) = nodes.common_ksampler(m, args.seed, args.steps, args.cfg, args.sampler, args.scheduler,
                                           positive, negative, latent)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out["samples"].float().cpu(), time.perf_counter() - start

    def rehash(**kw):
        return apply_rehash(model, RehashConfig(split_point=args.cache_block, **kw), keystep_store=work / "keysteps.json")

    def last_report(m):
        state = m.model_options["transformer_options"].get(STATE_KEY)
        return state.last.report if state is not None else None

    cache_counts = CacheStepCounter.install()

    def full_count(m) -> str:
        report = last_report(m)
        if report:
            return f"{report.full}/{report.steps}"
        return cache_counts.last or "-"

    def call_ms(m) -> str:
        """Mean UNet call time of full and of rehash steps, as Step Rehash measured them."""
        report = last_report(m)
        if not report or not report.calls_full:
            return "-"
        rehash = f"{1000 * report.rehash_call_seconds / report.calls_rehashed:.0f}" if report.calls_rehashed else "-"
        return f"{1000 * report.full_call_seconds / report.calls_full:.0f} / {rehash}"

    def sampler_ms(m, seconds: float) -> str:
        """Time per step outside the UNet calls (sampler, CFG, ADE's per-step work) in the last run; a
        rehash step cannot be cheaper than this."""
        report = last_report(m)
        if not report or not report.steps:
            return "-"
        unet_seconds = report.full_call_seconds + report.rehash_call_seconds
        return f"{1000 * (seconds - unet_seconds) / report.steps:.0f}"

    def unbatched(m):
        """cond and uncond run as separate UNet calls: ComfyUI batches them only when the estimate fits."""
        m = m.clone()
        m.add_object_patch("memory_required", lambda *a, **kw: 1 << 60)
        return m

    def input_copied(m):
        """ComfyUI's EasyCache (0.3.64) adds its cached difference to the diffusion model's input in place; on
        a flow (CONST) model whose input ComfyUI does not cast (fp32, as on this CPU), that input is the
        sampler's own x, so the in-place add corrupts the denoised result. A Wan in bf16 or fp16 gets a cast
        copy and does not see this. Here an outer wrapper hands EasyCache a copy: EasyCache as it runs there."""
        import comfy.patcher_extension

        def copy_input(executor, x, *args, **kwargs):
            return executor(x.clone(), *args, **kwargs)

        m = m.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_copy_input", copy_input)
        return m

    def easycache_as_on_gpu(t):
        """EasyCache with its input copied, cond and uncond unbatched (ComfyUI 0.3.64's EasyCache adds every
        cond's cached difference to the whole batch when they run batched)."""
        return unbatched(EasyCacheNode.execute(input_copied(model), t, 0.15, 0.95, False).result[0])

    def full_of(interval, warmup, tail) -> int:
        return len(fixed_full_steps(args.steps, interval, warmup, tail))

    k = args.full_steps
    methods = [
        ("full sampling", model),
        (f"Step Rehash key-step ({k} full), extrapolate", rehash(mode="keystep", full_steps=k)),
        (f"Step Rehash key-step ({k} full), hold (paper)", rehash(mode="keystep", full_steps=k, reuse="hold")),
        (f"Step Rehash fixed (interval 2, warm-up 2, tail 1: {full_of(2, 2, 1)} full), extrapolate",
         rehash(mode="fixed", interval=2, warmup=2, tail=1)),
        (f"Step Rehash fixed (interval 2, warm-up 2, tail 1: {full_of(2, 2, 1)} full), hold",
         rehash(mode="fixed", interval=2, warmup=2, tail=1, reuse="hold")),
        (f"Step Rehash fixed (interval 3, warm-up 2, tail 1: {full_of(3, 2, 1)} full), extrapolate",
         rehash(mode="fixed", interval=3, warmup=2, tail=1)),
        (f"Step Rehash fixed (interval 4, warm-up 2, tail 1: {full_of(4, 2, 1)} full), extrapolate",
         rehash(mode="fixed", interval=4, warmup=2, tail=1)),
        (f"Step Rehash adaptive (threshold {args.threshold}), extrapolate", rehash(mode="adaptive", threshold=args.threshold)),
        (f"Step Rehash adaptive (threshold {2 * args.threshold:g}), extrapolate",
         rehash(mode="adaptive", threshold=2 * args.threshold)),
        ("DeepCache-style (every 2nd step full)", rehash(mode="fixed", interval=2, warmup=0, tail=0, reuse="hold")),
        ("DeepCache-style (every 3rd step full)", rehash(mode="fixed", interval=3, warmup=0, tail=0, reuse="hold")),
        (f"EasyCache (threshold {args.easycache_threshold})", EasyCacheNode.execute(model, args.easycache_threshold, 0.15, 0.95, False).result[0]),
        (f"LazyCache (threshold {args.easycache_threshold})", LazyCacheNode.execute(model, args.easycache_threshold, 0.15, 0.95, False).result[0]),
        *((f"Step Rehash fixed (interval {i}, warm-up 2, tail 1: {full_of(i, 2, 1)} full), extrapolate",
           rehash(mode="fixed", interval=i, warmup=2, tail=1)) for i in args.fixed_intervals),
        *((f"{node.__name__[:-4]} (threshold {t})", node.execute(model, t, 0.15, 0.95, False).result[0])
          for t in args.easycache_sweep for node in (EasyCacheNode, LazyCacheNode)),
        ("full sampling, cond/uncond unbatched", unbatched(model)),
        (f"EasyCache (threshold {args.easycache_threshold}), cond/uncond unbatched",
         unbatched(EasyCacheNode.execute(model, args.easycache_threshold, 0.15, 0.95, False).result[0])),
        *((f"EasyCache (threshold {t}), input copied, cond/uncond unbatched", easycache_as_on_gpu(t))
          for t in sorted({args.easycache_threshold, *args.easycache_sweep})),
    ]
    if args.methods:
        methods = [methods[0]] + [(name, m) for name, m in methods[1:] if selected(name, args.methods)]
    print(f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, model {args.model}, "
          f"{args.size}, {args.steps} steps {args.sampler}/{args.scheduler}, cfg {args.cfg}, seed {args.seed}, "
          f"{len(cases)} prompt(s), Streamline slicing {'on' if args.streamline else 'off'}, "
          f"Step Rehash cache block {args.cache_block if args.cache_block >= 0 else 'default'}")
    keystep = [m for _, m in methods if getattr(m.model_options["transformer_options"].get(STATE_KEY), "config", None)
               is not None and m.model_options["transformer_options"][STATE_KEY].config.mode == "keystep"]
    if not keystep:  # else the first calibration run (every step in full) is the warm-up
        sample(model, cases[0])  # warm-up (kernels, allocator, ADE injection caches)
    # key-step calibration: the first run of each key-step model computes every step and saves the key
    # steps (per model, sampler, schedule and settings, not per prompt); the timed runs below reuse them
    for name, m in methods:
        state = m.model_options["transformer_options"].get(STATE_KEY)
        if state is not None and state.config.mode == "keystep":
            calibration_s = sample(m, cases[0])[1]
            print(f"{name}: calibration run {calibration_s:.2f} s; {last_report(m).note}")
    header = (f"{'method':>72} | {'full steps':>10} | {'UNet ms full/rehash':>19} | {'other ms/step':>13} | {'time s':>7} | "
              f"{'speedup':>7} | {'latent PSNR':>11} | "
              f"{'SSIM':>5}" + (f" | {'frames PSNR':>11} | {'SSIM':>5} | {'frame check':>11}" if tinyvideo else ""))
    print(header)
    print("-" * len(header))
    references, reference_s, unbatched_s = None, None, None
    for name, m in methods:
        try:
            cache_counts.clear()
            outs, times = zip(*(sample(m, case) for case in cases))
        except Exception as e:  # a method that cannot run this case is reported, not fatal
            print(f"{name:>72} | failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}", flush=True)
            continue
        seconds = sum(times)
        if references is None:
            references, reference_s = outs, seconds
        if name.startswith("full sampling, cond/uncond unbatched"):
            unbatched_s = seconds
        # unbatched rows are timed against unbatched full sampling; fidelity is always against the first row
        baseline_s = unbatched_s if "unbatched" in name and unbatched_s else reference_s

        def mean(metric, transform=lambda t: t):
            return sum(metric(transform(o), transform(r)) for o, r in zip(outs, references)) / len(outs)

        line = (f"{name:>72} | {full_count(m):>10} | {call_ms(m):>19} | {sampler_ms(m, times[-1]):>13} | {seconds:>7.2f} | "
                f"{baseline_s / seconds:>6.2f}x | "
                f"{mean(psnr):>11.2f} | {mean(ssim):>5.3f}")
        if tinyvideo:
            frames_of = lambda latent: decode(latent).permute(0, 3, 1, 2)  # noqa: E731
            passed = sum(not stats.frame_problems(stats.clip_stats(frames_of(o)), ranges, case[0].split()[0])
                         for o, case in zip(outs, cases))
            line += f" | {mean(psnr, frames_of):>11.2f} | {mean(ssim, frames_of):>5.3f} | {passed:>4}/{len(outs)} pass"
        print(line, flush=True)
    print("Speedups of the unbatched rows are against full sampling unbatched; fidelity is against the first row.")
    if not tinyvideo:
        print("Fidelity (PSNR/SSIM of final latents vs full sampling) is measured on random weights: it does not "
              "predict quality on a trained model (use --model tinyvideo for that).")


if __name__ == "__main__":
    main()
