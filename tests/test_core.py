"""core/ alone: plain PyTorch, no host."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from comfyui_streamline.core.grouping import run_frame_chunked
from comfyui_streamline.core.groupnorm import group_norm_apply, group_norm_stats
from comfyui_streamline.core.memtrace import LiveTensorMeter
from comfyui_streamline.core.slicing import (
    SliceConfig, SliceConfigError, chunk_ranges, frame_chunk_size, spatial_chunk_size,
)
from comfyui_streamline.core.temporal import TemporalTransformerParts, temporal_transformer_sliced


def test_chunk_ranges_cover_exactly_once():
    assert list(chunk_ranges(10, 3)) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(chunk_ranges(4, 10)) == [(0, 4)]
    with pytest.raises(SliceConfigError):
        list(chunk_ranges(4, 0))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_config_rejects_impossible_sizes(bad):
    with pytest.raises(SliceConfigError, match="frame_chunk"):
        SliceConfig(frame_chunk=bad)
    with pytest.raises(SliceConfigError, match="spatial_chunk"):
        SliceConfig(spatial_chunk=bad)


def test_chunks_grow_at_deeper_levels_only_when_scaling():
    top = 320 * 64 * 64
    scaled, fixed = SliceConfig(2, 256), SliceConfig(2, 256, scale_with_level=False)
    assert frame_chunk_size(scaled, 32, top, top) == 2
    assert frame_chunk_size(scaled, 32, 640 * 32 * 32, top) == 4
    assert frame_chunk_size(scaled, 32, 1280 * 8 * 8, top) == 32  # deep levels: one chunk, no slicing
    assert frame_chunk_size(fixed, 32, 1280 * 8 * 8, top) == 2
    assert spatial_chunk_size(scaled, 32, 1024, 640, 320) == 128
    assert spatial_chunk_size(fixed, 32, 1024, 640, 320) == 256
    assert spatial_chunk_size(scaled, 32, 64, 1280, 320) == 64  # never more than the positions


def test_auto_sizes_slice_large_features_and_leave_small_ones_whole():
    auto = SliceConfig()
    top = 320 * 64 * 64
    assert 1 <= frame_chunk_size(auto, 32, top, top) < 32
    assert frame_chunk_size(auto, 8, 320 * 16 * 16, 320 * 16 * 16) == 8
    assert 1 <= spatial_chunk_size(auto, 32, 4096, 320, 320) < 4096


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_pass_group_norm_matches_group_norm_on_any_position_slice(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, 5, 7, generator=g, dtype=dtype) * 3 + 1
    weight, bias = torch.randn(64, generator=g, dtype=dtype), torch.randn(64, generator=g, dtype=dtype)
    ref = F.group_norm(x, 32, weight, bias, eps=1e-6).reshape(6, 64, 35)
    mean, rstd = group_norm_stats(x, 32, 1e-6, batch_chunk=4)
    flat = x.reshape(6, 64, 35)
    for start, end in [(0, 35), (3, 10), (34, 35)]:
        part = group_norm_apply(flat[:, :, start:end], mean, rstd, weight, bias, 32)
        torch.testing.assert_close(part, ref[:, :, start:end], rtol=1e-5, atol=1e-5)


class ToyTemporal(nn.Module):
    """A reference temporal transformer: GroupNorm per frame, then attention across frames per position."""

    def __init__(self, channels=32, frames=4):
        super().__init__()
        self.frames = frames
        self.norm = nn.GroupNorm(8, channels, eps=1e-6)
        self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        self.attn = nn.MultiheadAttention(channels, 4, batch_first=True)

    def blocks(self, h):  # (b*f, d, c): attend over f at each position d
        bf, d, c = h.shape
        t = h.reshape(bf // self.frames, self.frames, d, c).permute(0, 2, 1, 3).reshape(-1, self.frames, c)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return t.reshape(bf // self.frames, d, self.frames, c).permute(0, 2, 1, 3).reshape(bf, d, c)

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(b, hh * ww, c)
        h = self.proj_out(self.blocks(self.proj_in(h)))
        return h.reshape(b, hh, ww, c).permute(0, 3, 1, 2) + x

    def parts(self):
        return TemporalTransformerParts(self.norm.weight, self.norm.bias, 8, 1e-6, self.proj_in, self.blocks, self.proj_out)


@pytest.mark.parametrize("chunk", [1, 7, 20, 1000])
@pytest.mark.parametrize("in_place", [False, True])
def test_spatially_sliced_temporal_transformer_is_exact(chunk, in_place):
    torch.manual_seed(0)
    module = ToyTemporal().eval()
    x = torch.randn(8, 32, 4, 5)
    with torch.no_grad():
        ref = module(x)
        buf = x.clone()
        out = temporal_transformer_sliced(buf, module.parts(), chunk, out=buf if in_place else None)
        assert (out is buf) == in_place
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        half = temporal_transformer_sliced(x, module.parts(), chunk, effect=0.5)
        torch.testing.assert_close(half, x * 0.5 + ref * 0.5, rtol=1e-5, atol=1e-5)


def test_sliced_temporal_needs_whole_frame_statistics():
    """Guard for the test above: per-slice statistics would give a different result."""
    torch.manual_seed(0)
    module = ToyTemporal().eval()
    x = torch.randn(8, 32, 4, 5)
    with torch.no_grad():
        ref = module(x)
        wrong = torch.cat([module(x[..., i : i + 1]) for i in range(5)], dim=-1)
    assert (wrong - ref).abs().max() > 1e-2


def test_frame_chunked_group_matches_whole_batch_and_stitches_in_order():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(7, 3, 6, 6)
    calls = []

    def group(start, end):
        calls.append((start, end))
        return conv(x[start:end])

    with torch.no_grad():
        out = run_frame_chunked(group, 7, 3)
        torch.testing.assert_close(out, conv(x))
    assert calls == [(0, 3), (3, 6), (6, 7)]


def test_live_tensor_meter_counts_activations_not_inputs():
    w = torch.randn(256, 256)
    with LiveTensorMeter() as meter:
        a = torch.randn(256, 256)  # 256 KiB
        b = a @ w
        view = b[:3]
        del a
        c = b.relu()
        del b
        assert meter.live_bytes == 2 * 256 * 256 * 4  # b (held by `view`) and c
        del view, c
    assert meter.peak_bytes == 2 * 256 * 256 * 4
    assert meter.live_bytes == 0


@pytest.mark.parametrize("mode", [torch.enable_grad, torch.no_grad, torch.inference_mode])
def test_live_tensor_meter_does_not_count_views_of_tensors_made_outside(mode):
    """Slicing the conditioning per chunk (context[start:end]) allocates nothing; inside a dispatch
    mode a view's _base is not set yet, so aliases are recognised by their storage."""
    context = torch.randn(64, 1024)  # made before the meter: 256 KiB
    with mode():
        with LiveTensorMeter() as meter:
            chunk = context[8:16]
            flat = context.view(-1)
            k = chunk @ torch.ones(1024, 4)  # the only allocations: ones (16 KiB) and k (128 B)
            context.mul_(1.0)  # in place on an outside tensor: no allocation either
            del chunk, flat, k
    assert meter.peak_bytes == 1024 * 4 * 4 + 8 * 4 * 4
    assert meter.live_bytes == 0


def test_fidelity_metrics():
    from comfyui_streamline.core.fidelity import psnr, ssim

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 4, 16, 16, generator=g)
    assert psnr(ref, ref) == float("inf") and ssim(ref, ref) == pytest.approx(1.0)
    slightly, badly = ref + 0.01 * torch.randn(ref.shape, generator=g), torch.randn(ref.shape, generator=g)
    assert psnr(slightly, ref) > 40 > psnr(badly, ref)
    assert ssim(slightly, ref) > 0.99 and ssim(badly, ref) < 0.1


def test_ssim_scores_a_wan_layout_video_as_its_frames():
    from comfyui_streamline.core.fidelity import ssim

    g = torch.Generator().manual_seed(1)
    ref = torch.randn(2, 4, 3, 16, 16, generator=g)  # (videos, channels, frames, h, w)
    noisy = ref + 0.3 * torch.randn(ref.shape, generator=g)
    frames = lambda v: v.movedim(2, 1).flatten(0, 1)  # noqa: E731
    assert ssim(noisy, ref) == pytest.approx(ssim(frames(noisy), frames(ref)))
    assert 0.2 < ssim(noisy, ref) < 0.99
