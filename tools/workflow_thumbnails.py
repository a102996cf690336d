"""Draw the thumbnails ComfyUI's Templates browser shows for the pack's workflows: `workflows/<name>.jpg`.

ComfyUI lists every `workflows/*.json` of a custom node in the frontend's Templates browser (the Templates
button of the left sidebar), under the pack's folder name, and the frontend (1.49) asks for the picture
`/api/workflow_templates/<pack>/<name>.jpg`, which ComfyUI serves from the same folder. The card is square and
the frontend lays a "Node graph" badge over its top-left corner.

- TinyVideo / TinyWan graphs: the clip the graph makes, every frame, run through its API twin
  (`workflows/api/<name>_api.json`) on a running ComfyUI with this pack (`--server`);
- the graphs whose weights are downloaded (SD1.5 + AnimateDiff, SVD, Wan 2.1, LTX-2, HunyuanVideo 1.5): a card with
  the model, the clip's size and the node chain, from the API twin.

    python tools/workflow_thumbnails.py --server http://127.0.0.1:8188   # all eight
    python tools/workflow_thumbnails.py                                  # the cards only; clips kept as they are
"""
from __future__ import annotations

import argparse
import io
import json
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
SIZE = 512
TOP = 60  # the frontend's "Node graph" badge covers the card's top-left corner: nothing drawn above this
MAX_BYTES = 60_000
BACKGROUND, PANEL, TEXT, MUTED = (24, 27, 32), (38, 43, 50), (236, 238, 241), (150, 158, 168)
STREAMLINE = ((43, 106, 128), (31, 78, 95))  # web/streamline.js: the pack's node colours (bgcolor, color)
# name -> title (and for the cards, what the model makes); the rest (clip size, nodes, files) is from the API twin.
CLIPS = {"tinyvideo_streamline": "TinyVideo + Model Patch",
         "tinyvideo_budget_rehash": "TinyVideo + Budget + Rehash",
         "tinywan_rehash": "TinyWan + Budget + Rehash"}
CARDS = {"streamline_animatediff": ("SD1.5 + AnimateDiff v2", "text to video"),
         "svd_img2vid_streamline": ("SVD-XT image to video", "image to video"),
         "wan21_t2v_streamline": ("Wan 2.1 T2V 1.3B", "text to video"),
         "ltx2_t2v_streamline": ("LTX-2 19B T2V", "text to video + audio"),
         "hunyuan15_t2v_streamline": ("HunyuanVideo 1.5 T2V 720p", "text to video")}
SHORT_TITLES = {"ADE_AnimateDiffLoaderGen1": "AnimateDiff Loader", "ImageOnlyCheckpointLoader": "Load SVD Checkpoint",
                "VideoLinearCFGGuidance": "Video Linear CFG", "SaveAnimatedWEBP": "Save Animated WEBP",
                "StreamlineTinyVideoLoader": "Load TinyVideo", "StreamlineTinyWanLoader": "Load TinyWan",
                "StreamlineMemoryBudget": "Streamline Memory Budget",
                "StreamlineStepRehashSampler": "Step Rehash Sampler",
                "StreamlineTinyVideoDecode": "TinyVideo Decode", "UNETLoader": "Load Diffusion Model",
                "CheckpointLoaderSimple": "Load Checkpoint", "LoraLoaderModelOnly": "LoRA (distilled)",
                "VAEDecodeTiled": "VAE Decode (Tiled)"}
# Inputs followed upstream from the Save node to draw the chain: the frames, the latent, the model (a custom sampler's
# through its guider); LTX-2's split of its audio-video latent is passed through, not drawn.
CHAIN_INPUTS = ("images", "samples", "av_latent", "guider", "model")
NOT_DRAWN = {"LTXVSeparateAVLatent"}
LTXV_UPSCALE = 2  # LTXVLatentUpsampler: the spatial x2 upscaler's factor


def font(size: int, bold: bool = False):
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(f"/usr/share/fonts/truetype/dejavu/{name}", size)
    except OSError:
        return ImageFont.load_default(size)


def chain(api: dict) -> list[str]:
    """The node types from the model loader to the Save node of the frames, along CHAIN_INPUTS."""
    save = next(k for k, v in api.items() if v["class_type"].startswith("Save") and "images" in v["inputs"])
    found, node = [], save
    while node:
        found.append(node)
        inputs = api[node]["inputs"]
        node = next((inputs[k][0] for k in CHAIN_INPUTS if isinstance(inputs.get(k), list)), None)
    return [api[k]["class_type"] for k in reversed(found) if api[k]["class_type"] not in NOT_DRAWN]


def clip_size(api: dict) -> tuple[int, int, int]:
    """(width, height, frames) of the clip the graph makes, from its latent node (TinyVideo's latent is the clip:
    the image size / 8; Wan's, LTX-2's and HunyuanVideo 1.5's latent length is video frames; LTX-2's first pass is
    at half the size, upscaled x2 for the second)."""
    upscale = LTXV_UPSCALE ** sum(node["class_type"] == "LTXVLatentUpsampler" for node in api.values())
    for node in api.values():
        i, kind = node["inputs"], node["class_type"]
        if kind == "EmptyLatentImage":
            return i["width"], i["height"], i["batch_size"]
        if kind in ("EmptyHunyuanLatentVideo", "EmptyHunyuanVideo15Latent"):
            return i["width"], i["height"], i["length"]
        if kind == "EmptyLTXVLatentVideo":
            return i["width"] * upscale, i["height"] * upscale, i["length"]
        if kind == "SVD_img2vid_Conditioning":
            return i["width"], i["height"], i["video_frames"]
    raise ValueError("no latent node")


def model_files(api: dict) -> list[str]:
    return list(dict.fromkeys(v for node in api.values() for v in node["inputs"].values()
                              if isinstance(v, str) and v.endswith(".safetensors")))


def title_of(kind: str, api: dict) -> str:
    if kind in SHORT_TITLES:
        return SHORT_TITLES[kind]
    titles = {v["class_type"]: v["_meta"]["title"] for v in api.values()}
    return titles.get(kind, kind)


def draw_caption(draw: ImageDraw.ImageDraw, title: str, subtitle: str, notes: list[str]) -> int:
    """The title, the clip in words and small notes in a band at the bottom (the frontend lays its "Node graph"
    badge over the card's top-left corner); returns the band's top."""
    small = font(14)
    for note in notes:
        while draw.textlength(note, font=small) > SIZE - 40 and small.size > 9:
            small = font(small.size - 1)
    top = SIZE - 14 - 18 * len(notes) - 26 - 36 - 12
    draw.rectangle((0, top, SIZE, SIZE), fill=PANEL)
    draw.rectangle((0, top, SIZE, top + 3), fill=STREAMLINE[0])
    size = 28
    while draw.textlength(title, font=font(size, bold=True)) > SIZE - 40 and size > 16:
        size -= 1
    draw.text((20, top + 12 + (28 - size) // 2), title, font=font(size, bold=True), fill=TEXT)
    draw.text((20, top + 48), subtitle, font=font(18), fill=(190, 196, 204))
    for i, note in enumerate(notes):
        draw.text((20, top + 76 + 18 * i), note, font=small, fill=MUTED)
    return top


def draw_chain(draw: ImageDraw.ImageDraw, kinds: list[str], api: dict, top: int, bottom: int) -> None:
    """The node chain as a column of boxes, the pack's nodes in its colours."""
    gap = 10
    height = min(44, (bottom - top - gap * (len(kinds) - 1)) // len(kinds))
    text_font = font(min(20, height - 18), bold=True)
    y = top + (bottom - top - len(kinds) * height - (len(kinds) - 1) * gap) // 2
    for i, kind in enumerate(kinds):
        ours = kind.startswith("Streamline")
        fill, outline = STREAMLINE if ours else (PANEL, (70, 78, 88))
        box = (56, y, SIZE - 56, y + height)
        draw.rounded_rectangle(box, radius=8, fill=fill, outline=outline, width=2)
        label = title_of(kind, api)
        width = draw.textlength(label, font=text_font)
        draw.text(((SIZE - width) / 2, y + (height - text_font.size) / 2 - 2), label, font=text_font,
                  fill=TEXT if ours else (205, 210, 216))
        if i + 1 < len(kinds):
            cx, y0, y1 = SIZE // 2, y + height, y + height + gap
            draw.line((cx, y0, cx, y1 - 1), fill=MUTED, width=2)
            draw.polygon(((cx - 5, y1 - 5), (cx + 5, y1 - 5), (cx, y1)), fill=MUTED)
        y += height + gap


def card(name: str, api: dict) -> Image.Image:
    title, what = CARDS[name]
    width, height, frames = clip_size(api)
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    notes = [f"\u2193 {file}" for file in model_files(api)]
    bottom = draw_caption(draw, title, f"{what}, {width}\u00d7{height}, {frames} frames", notes)
    draw_chain(draw, chain(api), api, TOP, bottom - 14)
    return image


def frame_grid(name: str, api: dict, frames: list[Image.Image]) -> Image.Image:
    """Every frame of the clip, in rows of four, over the caption."""
    title = CLIPS[name]
    prompt = next(v["inputs"]["text"] for v in api.values()
                  if v["class_type"] == "StreamlineTinyVideoPrompt" and v["inputs"]["text"])
    width, height = frames[0].size
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    kinds = [k for k in chain(api) if k != "SaveAnimatedWEBP"]
    line = " \u2192 ".join(title_of(k, api).removeprefix("Streamline ") for k in kinds)
    bottom = draw_caption(draw, title, f"\u201c{prompt}\u201d, {width}\u00d7{height}, {len(frames)} frames", [line])
    columns, gap = 4, 5
    rows = -(-len(frames) // columns)
    cell = min((SIZE - 40 - gap * (columns - 1)) // columns, (bottom - TOP - 12 - gap * (rows - 1)) // rows)
    x0 = (SIZE - columns * cell - (columns - 1) * gap) // 2
    y0 = TOP + (bottom - 12 - TOP - rows * cell - (rows - 1) * gap) // 2
    for i, frame in enumerate(frames):
        r, c = divmod(i, columns)
        resample = Image.NEAREST if cell >= frame.size[0] else Image.LANCZOS
        image.paste(frame.convert("RGB").resize((cell, cell), resample),
                    (x0 + c * (cell + gap), y0 + r * (cell + gap)))
    return image


def run_clip(server: str, api: dict) -> list[Image.Image]:
    """Queue the API graph on a running ComfyUI and read back the frames of its Save node's clip."""
    body = json.dumps({"prompt": api, "client_id": str(uuid.uuid4())}).encode()
    request = urllib.request.Request(f"{server}/prompt", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        prompt_id = json.loads(r.read())["prompt_id"]
    save = next(k for k, v in api.items() if v["class_type"].startswith("Save"))
    deadline = time.time() + 900
    while time.time() < deadline:
        with urllib.request.urlopen(f"{server}/history/{prompt_id}", timeout=30) as r:
            history = json.loads(r.read())
        if prompt_id in history:
            entry = history[prompt_id]
            if entry["status"]["status_str"] != "success":
                raise SystemExit(f"the graph failed: {entry['status']}")
            (out,) = entry["outputs"][save]["images"]
            query = urllib.parse.urlencode({k: out[k] for k in ("filename", "subfolder", "type")})
            with urllib.request.urlopen(f"{server}/view?{query}", timeout=30) as r:
                clip = Image.open(io.BytesIO(r.read()))
            frames = []
            for i in range(getattr(clip, "n_frames", 1)):
                clip.seek(i)
                frames.append(clip.convert("RGB"))
            return frames
        time.sleep(1)
    raise SystemExit("the graph did not finish in 15 minutes")


def save(image: Image.Image, path: Path) -> None:
    for quality in (90, 85, 80, 75, 70, 60):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality, optimize=True, progressive=True)
        if buffer.tell() <= MAX_BYTES:
            path.write_bytes(buffer.getvalue())
            print(f"{path.name}: {image.size[0]}x{image.size[1]}, {buffer.tell() / 1000:.1f} kB (quality {quality})")
            return
    raise SystemExit(f"{path.name}: over {MAX_BYTES} bytes even at quality 60")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", help="a running ComfyUI with this pack, to make the TinyVideo/TinyWan clips")
    args = p.parse_args(argv)
    for name in [*CLIPS, *CARDS]:
        api = json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text())
        if name in CARDS:
            save(card(name, api), WORKFLOWS / f"{name}.jpg")
        elif args.server:
            save(frame_grid(name, api, run_clip(args.server.rstrip("/"), api)), WORKFLOWS / f"{name}.jpg")
        else:
            print(f"{name}.jpg: kept (its clip needs --server)")


if __name__ == "__main__":
    main()
