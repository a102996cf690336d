"""Benchmark: the video DiT families at their real shapes, ComfyUI's forward against the pack's automatic plan
for a 24 GiB and a 12 GiB activation budget, per forward.

Each model is ComfyUI's own class with the config ComfyUI's detection (comfy/model_detection.py) gives the
released checkpoint, built on the meta device (no weights: shapes only, instant); its latent is what ComfyUI's
empty-latent node makes at the clip's size, CFG batched (cond and uncond in one call, batch 2) where ComfyUI
batches them. The numbers are the family adapters' own (families/registry.py family_of, plan_for, peaks_for):
ComfyUI's predicted peak activation of one call, and the pack's at the plan Memory Budget makes for the budget
(its token slice, its predicted peak, the ratio). The laws are those of PyTorch SDPA, ComfyUI's attention on
CUDA. A family the pack has no adapter for, or whose adapter has no laws yet, is a row that says so.

--measure (a CUDA device): one forward of --layers real-dim blocks (random weights, bf16), ComfyUI's against
the automatic plans', side by side: peak activation (core/meter.py measure_peak), seconds per forward, the
ratios, the largest difference and the laws' prediction. Every block has the same shapes, so a forward's peak is
that of these blocks; its time grows with the block count.

    python tools/bench_dit.py                                 # the prediction table (any machine, seconds)
    python tools/bench_dit.py --measure --device cuda          # 2 real-dim blocks per family, measured
    python tools/bench_dit.py --quick [--measure --device cpu] # tiny shapes: the plumbing (tests)
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostenv  # noqa: E402
from markdown_rows import Rows  # noqa: E402

GiB = 2**30
BUDGETS_GIB = (24, 12)
QUICK_BUDGETS_GIB = (12 / 1024, 8 / 1024)  # 12 and 8 MiB
CFG_BATCH = 2  # cond and uncond in one call (ComfyUI's calc_cond_batch, memory allowing)


# -- the models, as ComfyUI's detection builds them ------------------------------------------------------------


def wan(dim: int, ffn_dim: int, layers: int, in_dim: int = 16, out_dim: int = 16):
    """WanModel as detection configures Wan 2.1 / 2.2 t2v (heads = dim // 128)."""
    def build(num_layers, device, dtype, operations):
        from comfy.ldm.wan.model import WanModel

        return WanModel(model_type="t2v", patch_size=(1, 2, 2), dim=dim, ffn_dim=ffn_dim, freq_dim=256,
                        num_heads=max(1, dim // 128), num_layers=num_layers or layers, window_size=(-1, -1),
                        qk_norm=True, cross_attn_norm=True, eps=1e-6, in_dim=in_dim, out_dim=out_dim,
                        device=device, dtype=dtype, operations=operations)
    return build


def ltxav(layers: int = 48, head_dim: int = 128, **config):
    """LTX-2's LTXAVModel: detection reads the layer count and attn2's width (32 heads, head dim = width // 32,
    cross-attention 4096 wide); the rest is the model file's "config" metadata, whose values for the 19B are
    LTXAVModel's defaults. config: a tiny model's sizes (--quick)."""
    def build(num_layers, device, dtype, operations):
        from comfy.ldm.lightricks.av_model import LTXAVModel

        return LTXAVModel(num_layers=num_layers or layers, attention_head_dim=head_dim, num_attention_heads=32,
                          cross_attention_dim=32 * head_dim, use_keyframes_abs_pos_embedding=False,
                          device=device, dtype=dtype, operations=operations, **config)
    return build


def hunyuan15(layers: int = 54):
    """HunyuanVideo 1.5 (720p): detection's config of the released checkpoint (hidden 2048, 16 heads, 54 double
    blocks, no single blocks, 65 input channels, Qwen2.5-VL 7B context, byT5, SigLIP vision tokens)."""
    def build(num_layers, device, dtype, operations):
        from comfy.ldm.hunyuan_video.model import HunyuanVideo

        return HunyuanVideo(image_model="hunyuan_video", in_channels=65, out_channels=32, vec_in_dim=None,
                            context_in_dim=3584, hidden_size=2048, mlp_ratio=4.0, num_heads=16,
                            depth=num_layers or layers, depth_single_blocks=0, axes_dim=[16, 56, 56], theta=256,
                            patch_size=[1, 1, 1], qkv_bias=True, guidance_embed=False, byt5=True, meanflow=False,
                            use_cond_type_embedding=True, vision_in_dim=1152, meanflow_sum=True,
                            device=device, dtype=dtype, operations=operations)
    return build


def minimax_h3(layers: int = 50):
    """MiniMaxH3Model: its defaults are the released H3's (hidden 5376, 56 heads of 128, FFN 14336)."""
    def build(num_layers, device, dtype, operations):
        from comfy.ldm.minimax.model import MiniMaxH3Model

        return MiniMaxH3Model(num_layers=num_layers or layers, device=device, dtype=dtype, operations=operations)
    return build


# -- a call's inputs, as sampling hands them to the diffusion model ------------------------------------------------


def wan_latent(channels: int, scale: int):
    """EmptyHunyuanLatentVideo (Wan 2.1: 16 channels, 8x) / Wan22ImageToVideoLatent (48 channels, 16x)."""
    return lambda w, h, f: (channels, 1 + (f - 1) // 4, h // scale, w // scale)


def ltx_latent(w, h, f):
    """EmptyLTXVLatentVideo: 128 channels, 32x spatial, 8x temporal."""
    return (128, 1 + (f - 1) // 8, h // 32, w // 32)


def hunyuan15_latent(w, h, f):
    """EmptyHunyuanVideo15Latent: 32 channels, 16x spatial, 4x temporal."""
    return (32, 1 + (f - 1) // 4, h // 16, w // 16)


def minimax_latent(w, h, f):
    """EmptyMiniMaxH3LatentAV's video part: 24 channels, 16x spatial, its 17k+5 frame grid."""
    from comfy_extras.nodes_minimax_h3 import temporal_shape

    return (24, temporal_shape(f)[1], h // 16, w // 16)


def wan_call(case, model, latent, device, dtype, generator):
    import torch

    x = torch.randn(latent, device=device, dtype=dtype, generator=generator)
    context = torch.randn(latent[0], case.text_tokens, 4096, device=device, dtype=dtype, generator=generator)
    return (x, torch.full((latent[0],), 500.0, device=device), context), {}


def ltxav_call(case, model, latent, device, dtype, generator):
    """[video, audio] latents (LTXVEmptyLatentAudio: 25 audio latents a second at 25 fps, 16 bins), the
    connector-ready context (2 x caption channels wide) and its mask."""
    import torch

    b, frames = latent[0], case.frames
    video = torch.randn(latent, device=device, dtype=dtype, generator=generator)
    audio = torch.randn(b, 8, frames, 16, device=device, dtype=dtype, generator=generator)
    text = case.text_tokens or 128
    context = torch.randn(b, text, 2 * model.caption_channels if hasattr(model, "caption_channels") else 7680,
                          device=device, dtype=dtype, generator=generator)
    mask = torch.ones(b, text, dtype=torch.long, device=device)
    return ([video, audio], torch.full((b,), 0.5, device=device), context, mask), {"frame_rate": 25}


@dataclass(frozen=True)
class Case:
    name: str
    width: int
    height: int
    frames: int
    build: Callable  # (layers or None for all, device, dtype, operations) -> the diffusion model
    latent: Callable  # (width, height, frames) -> the latent's shape after its batch
    tokens: Callable  # (model, latent shape) -> the tokens one sample runs through the blocks
    text_tokens: int | None = None  # context tokens (None: the family's default)
    call: Callable | None = None  # (case, model, latent, device, dtype, generator) -> (args, kwargs); None: unmeasured
    batch: int = CFG_BATCH
    note: str = ""

    @property
    def shape(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"

    def latent_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.latent(self.width, self.height, self.frames))


def patched_tokens(patch: tuple[int, int, int]):
    return lambda model, s: -(-s[-3] // patch[0]) * -(-s[-2] // patch[1]) * -(-s[-1] // patch[2])


def minimax_tokens(text: int):
    def tokens(model, s):
        from comfy.ldm.minimax.model import PackedLayout
        from comfy_extras.nodes_minimax_h3 import temporal_shape

        p = model.patch_size
        _, _, audio_t = temporal_shape(MINIMAX_FRAMES)
        return PackedLayout(text, s[-3], -(-s[-2] // p[1]) * p[1], -(-s[-1] // p[2]) * p[2], audio_t).seq_len
    return tokens


def hunyuan_call(case, model, latent, device, dtype, generator):
    """HunyuanVideo 1.5's latent (65 channels: the video's 32, the image condition's 33) and its Qwen2.5-VL context."""
    import torch

    b = latent[0]
    x = torch.randn(latent, device=device, dtype=dtype, generator=generator)
    context = torch.randn(b, case.text_tokens, 3584, device=device, dtype=dtype, generator=generator)
    return (x, torch.full((b,), 500.0, device=device), context), {}


def minimax_call(case, model, latent, device, dtype, generator):
    """EmptyMiniMaxH3LatentAV's [video, audio] (audio: 32 channels x 2 x its frames) and the text context."""
    import torch
    from comfy_extras.nodes_minimax_h3 import temporal_shape

    b = latent[0]
    video = torch.randn(latent, device=device, dtype=dtype, generator=generator)
    audio = torch.randn(b, 32, 2, temporal_shape(case.frames)[2], device=device, dtype=dtype, generator=generator)
    context = torch.randn(b, case.text_tokens, 5120, device=device, dtype=dtype, generator=generator)
    return ([video, audio], torch.full((b,), 0.5, device=device), context), {}


MINIMAX_FRAMES = 124  # EmptyMiniMaxH3LatentAV's default length (1344x768, 24 fps, ~5 s)
MINIMAX_TEXT = 256  # an assumed prompt length (Qwen3-VL tokens vary with the prompt)

CASES = [
    Case("Wan 2.1 14B t2v", 1280, 720, 81, wan(5120, 13824, 40), wan_latent(16, 8), patched_tokens((1, 2, 2)),
         512, wan_call),
    Case("Wan 2.2 5B ti2v", 1280, 704, 121, wan(3072, 14336, 30, 48, 48), wan_latent(48, 16),
         patched_tokens((1, 2, 2)), 512, wan_call),
    Case("LTX-2 19B (video + audio)", 1920, 1088, 241, ltxav(), ltx_latent, patched_tokens((1, 1, 1)), None,
         ltxav_call),
    Case("HunyuanVideo 1.5 720p", 1280, 720, 121, hunyuan15(), hunyuan15_latent, patched_tokens((1, 1, 1)), 256,
         hunyuan_call),
    Case("MiniMax H3", 1344, 768, MINIMAX_FRAMES, minimax_h3(), minimax_latent, minimax_tokens(MINIMAX_TEXT),
         MINIMAX_TEXT, minimax_call, batch=1, note=f"packed text ({MINIMAX_TEXT} tokens assumed) + audio + video rows, one sequence a call"),
]
QUICK = [
    Case("tiny Wan", 256, 256, 9, wan(256, 1024, 4), wan_latent(16, 8), patched_tokens((1, 2, 2)), 32, wan_call),
    Case("tiny LTX-2", 256, 128, 9, ltxav(4, 4, audio_cross_attention_dim=64, audio_attention_head_dim=2,
                                          audio_num_attention_heads=32, caption_channels=8,
                                          connector_attention_head_dim=4, connector_num_attention_heads=2,
                                          connector_num_layers=1),
         ltx_latent, patched_tokens((1, 1, 1)), 8, ltxav_call),
]


# -- predictions -----------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    case: Case
    tokens: int
    family: str = ""
    comfy: int | None = None  # ComfyUI's predicted peak bytes
    plans: dict = field(default_factory=dict)  # budget bytes -> Plan, or the BudgetError's text
    automatic: tuple | None = None  # (tokens per slice, predicted peak bytes): Model Patch left automatic
    why: str | None = None  # why there are no numbers (no adapter, no laws)


@contextlib.contextmanager
def cuda_attention():
    """The laws of the attention ComfyUI runs on CUDA (PyTorch SDPA), whatever this process chose."""
    import comfy.ldm.modules.attention as attention

    chosen = attention.optimized_attention
    attention.optimized_attention = attention.attention_pytorch
    try:
        yield
    finally:
        attention.optimized_attention = chosen


def meta_model(case: Case, layers: int | None = None):
    import comfy.ops
    import torch

    return case.build(layers, "meta", torch.bfloat16, comfy.ops.disable_weight_init)


def predict(case: Case, budgets: tuple[int, ...], dtype_bytes: int = 2) -> Prediction:
    """The family adapter's plan for each budget, and ComfyUI's peak, for one call of the case's latent."""
    from comfyui_streamline.core.plan_search import BudgetError
    from comfyui_streamline.families.registry import family_of, plan_for, unsupported_reason

    model = meta_model(case)
    latent = case.latent_shape()
    found = Prediction(case, case.tokens(model, latent))
    family = family_of(model)
    if family is None:
        found.why = f"no adapter on this branch ({unsupported_reason(model, 'plan')})"
        return found
    found.family = family.name
    found.why = family.reason(model, "plan")
    if found.why is not None:
        return found
    x, context = call_input(case, family, model, latent)
    for budget in budgets:
        try:
            if x is None:
                plan = plan_for(family, model, latent, dtype_bytes, budget, context_tokens=case.text_tokens)
            else:
                plan = family.plan(model, x, context, budget, 0, budget, False, None, lambda: False)
        except NotImplementedError:
            found.why = f"the {family} adapter has no memory laws yet"
            return found
        except BudgetError as e:
            found.plans[budget] = str(e)
            continue
        found.plans[budget] = plan
        found.comfy = plan.baseline_peak_bytes
    if x is not None:  # Streamline Model Patch with its slices left automatic (the family's laws choose them)
        from comfyui_streamline.core.slicing import SliceConfig

        auto = family.call_slicing(model, x, context, SliceConfig())
        found.automatic = (auto.token_chunk, family.peaks(model, x, context, auto)[0])
    return found


def call_input(case: Case, family, model, latent: tuple[int, ...]):
    """(what stands for one call of the case's latent to the family's laws, its context) on the meta device, as
    the family reads a real call (Family.call_input); (None, None) for a case without a call."""
    import torch

    if case.call is None:
        return None, None
    args, kwargs = case.call(case, model, latent, "meta", torch.bfloat16, None)
    return family.call_input(model, args, kwargs), args[2]


def prediction_rows(rows: Rows, cases: list[Case], budgets: tuple[int, ...]) -> list[Prediction]:
    from comfyui_streamline.core.plan_search import format_bytes

    gib = format_bytes

    rows.line("| family | shape (WxHxF, batch) | tokens | ComfyUI predicted peak | Model Patch (automatic): slice "
              "| peak | ratio | " + " | ".join(f"Memory Budget {gib(b)}: slice | peak | ratio" for b in budgets) + " |")
    rows.line("|---|---|---|---|---|---|---|" + "---|---|---|" * len(budgets))
    found = []
    with cuda_attention():
        for case in cases:
            p = predict(case, budgets)
            found.append(p)
            head = f"| {case.name} | {case.shape}, batch {case.batch} | {p.tokens} |"
            if p.why is not None:
                rows.line(f"{head} {p.why} |" + " | | |" * (len(budgets) + 1))
                continue
            cells = ["not measured | | " if p.automatic is None else
                     f"{p.automatic[0]} | {format_bytes(p.automatic[1])} | {p.comfy / p.automatic[1]:.2f}x less"]
            for b in budgets:
                plan = p.plans[b]
                if isinstance(plan, str):
                    cells.append(f"does not fit: {plan} | | ")
                    continue
                chunk = plan.config.token_chunk
                cells.append(f"{'whole' if chunk >= p.tokens else chunk} | {format_bytes(plan.predicted_peak_bytes)} | "
                             f"{p.comfy / plan.predicted_peak_bytes:.2f}x less")
            rows.line(f"{head} {format_bytes(p.comfy) if p.comfy else ''} | " + " | ".join(cells) + " |")
    notes = [f"{c.name}: {c.note}" for c in cases if c.note]
    if notes:
        rows.line("\n" + "; ".join(notes) + ".")
    rows.line("")
    return found


# -- measured ----------------------------------------------------------------------------------------------------


def patched_options(family, model, token_chunk: int | None) -> dict:
    """transformer_options as sampling hands them to the diffusion model, with the family's slicing installed on a
    ModelPatcher around it (its block hooks and call wrapper, as Streamline Model Patch installs them)."""
    import comfy.model_patcher
    import torch

    if token_chunk is None:
        return {}
    holder = torch.nn.Module()
    holder.diffusion_model = model
    device = next(model.parameters()).device
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device=device, offload_device=device)
    family.install_slicing(patcher, lambda to, x, tokens_per_frame: token_chunk)
    return {**patcher.model_options["transformer_options"], "wrappers": patcher.wrappers}


def timed_forward(model, args, kwargs, options, device, repeats: int):
    """(output, peak activation bytes, best seconds) of the forward with these transformer_options."""
    import torch

    from comfyui_streamline.core.meter import measure_peak

    def forward():
        return model(*[list(a) if isinstance(a, list) else a for a in args], transformer_options=options, **kwargs)

    with torch.no_grad():
        forward()  # warm-up
        with measure_peak(device, ballast=True) as window:  # core/meter.py: exact, never reset
            out = forward()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return out, window.peak.bytes, min(seconds)


def first_tensor(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def measure_rows(rows: Rows, cases: list[Case], budgets: tuple[int, ...], args) -> None:
    """One forward of args.layers real-dim blocks per case: ComfyUI's, then each budget's automatic plan."""
    import comfy.ops
    import torch

    from comfyui_streamline.core.plan_search import BudgetError, format_bytes
    from comfyui_streamline.core.slicing import SliceConfig
    from comfyui_streamline.families.registry import family_of, peaks_for, plan_for

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    operations = comfy.ops.manual_cast if device.type == "cuda" else comfy.ops.disable_weight_init
    rows.line(f"| family | shape | blocks | variant | peak activation | predicted | s / forward | memory ratio | "
              f"time ratio | max diff |")
    rows.line("|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        head = f"| {case.name} | {case.shape} | {args.layers} |"
        family = family_of(meta_model(case, args.layers))
        why = "no adapter" if family is None else family.reason(meta_model(case, args.layers), "plan")
        if why is not None or case.call is None:
            rows.line(f"{head} not measured: {why or 'no call inputs here'} | | | | | | |")
            continue
        generator = torch.Generator(device).manual_seed(0)
        torch.manual_seed(0)
        model = case.build(args.layers, device, dtype, operations)
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.normal_(0, 0.02)
        latent = case.latent_shape()
        call_args, kwargs = case.call(case, model, latent, device, dtype, generator)
        x = call_args[0][0] if isinstance(call_args[0], list) else call_args[0]
        variants = [("ComfyUI", None)]
        for budget in budgets:
            try:
                chunk = plan_for(family, model, latent, x.element_size(), budget,
                                 context_tokens=case.text_tokens).config.token_chunk
            except BudgetError as e:
                rows.line(f"{head} plan at {format_bytes(budget)} | {e} | | | | | |")
                continue
            if chunk not in [c for _, c in variants]:
                variants.append((f"plan at {format_bytes(budget)}, slice {chunk}", chunk))
        base = None
        for label, chunk in variants:
            try:
                out, peak, seconds = timed_forward(model, call_args, kwargs, patched_options(family, model, chunk),
                                                   device, args.repeats)
            except torch.OutOfMemoryError:
                rows.line(f"{head} {label} | OOM | | | | | |")
                continue
            context = call_args[2]
            sliced, whole = peaks_for(family, model, call_args[0], context, SliceConfig(token_chunk=chunk or 0))
            predicted = whole if chunk is None else sliced
            out = first_tensor(out)
            if base is None and chunk is None:
                base = (out, peak, seconds)
                rows.line(f"{head} {label} | {format_bytes(peak)} | {format_bytes(predicted)} "
                          f"({predicted / peak - 1:+.1%}) | {seconds:.3f} | | | |")
                continue
            ratios = "| | |" if base is None else (
                f"| {base[1] / peak:.2f}x less | {seconds / base[2]:.2f}x | "
                f"{((out.float() - base[0].float()).abs().max() / base[0].float().abs().max()).item():.1e} |")
            rows.line(f"{head} {label} | {format_bytes(peak)} | {format_bytes(predicted)} "
                      f"({predicted / peak - 1:+.1%}) | {seconds:.3f} {ratios}")
        model = base = out = None  # free the weights before the next case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows.line("")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI folder (default: $COMFYUI_PATH, ../.. of this pack, ~/comfy/ComfyUI)")
    p.add_argument("--device", default="cpu", choices=["cuda", "cpu"], help="--measure's device")
    p.add_argument("--measure", action="store_true", help="also measure --layers real-dim blocks per family")
    p.add_argument("--quick", action="store_true", help="tiny shapes and budgets (the plumbing; used by the tests)")
    p.add_argument("--layers", type=int, default=2, help="blocks built for --measure (all have the same shapes)")
    p.add_argument("--repeats", type=int, default=2, help="timed forwards per variant (after one warm-up)")
    p.add_argument("--markdown", help="append each row to this markdown file as it is made")
    return p.parse_args(argv)


def main(argv=None) -> list[Prediction]:
    args = parse_args(argv)
    hostenv.enter_for_tool(args.comfy, cpu=args.device == "cpu", tool="bench_dit")
    cases = QUICK if args.quick else CASES
    budgets = tuple(int(g * GiB) for g in (QUICK_BUDGETS_GIB if args.quick else BUDGETS_GIB))
    rows = Rows(args.markdown)
    found = prediction_rows(rows, cases, budgets)
    if args.measure:
        measure_rows(rows, cases, budgets, args)
    return found


if __name__ == "__main__":
    main()
