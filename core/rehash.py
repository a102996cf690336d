"""Step Rehash: which denoising steps compute the deep UNet path, and which reuse its cached output.

Adjacent steps have very similar deep features (Streamlined Inference observes it at the output of
the temporal layers in the up-blocks). On a rehash step the UNet runs only its shallow path (the
input blocks down to the cache point and the output blocks after it) and takes the deep feature
cached at the last full step. This module decides which steps are full:

- fixed:    a warm-up and a tail computed in full, every `interval`-th step in between;
- adaptive: per step, the predicted relative change of the deep feature since the last full step
            against a threshold: the change of the shallow feature (which a rehash step computes
            anyway) times how much the deep feature changed per shallow change between the last two
            full steps (the transformation-rate idea of EasyCache, applied to the cached feature);
- keystep:  the paper's key-step search: from one calibration run with every step in full, a sketch
            of the cached deep feature at each step; choose the K full steps that minimise the error
            the rehash steps would make, measured against the true feature of each step (dynamic
            programming, exact).

And what a rehash step reuses (`reuse`):
- hold:        the feature of the last full step, as is (the paper, DeepCache);
- extrapolate: the line through the features of the last two full steps, followed in sigma to the
               step's own sigma (first-order; deep features drift smoothly along the noise schedule).
               Same cost per step, one more cached feature; on the pack's trained model it brings
               rehashed samples several times closer to full sampling (README, Step Rehash).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

MODES = ("off", "fixed", "adaptive", "keystep")
REUSE_MODES = ("extrapolate", "hold")


class RehashConfigError(ValueError):
    """A Step Rehash setting that cannot be honoured."""

    # ComfyUI names an error in its dialog by module and class; it imports this pack under its folder's
    # path, which would make the module a file path.
    __module__ = "comfyui_streamline"


@dataclass(frozen=True)
class RehashConfig:
    """mode: one of MODES.
    split_point: where a call splits into the shallow path (every step) and the deep one (cached), as the
        family reads it (Step Rehash's cache_block input): on a UNet the output block whose output (after its
        temporal layer) is cached, -1 = the default (the second-to-last output block: a rehash step then runs
        only the first input block and the last output block at full resolution; resolve_output_block); on
        a DiT the count of shallow blocks at each end of its block stack, -1 = one (families/dit/rehash.py
        shallow_blocks).
    interval, warmup, tail: the fixed schedule (warm-up and tail steps are always full).
    threshold: adaptive mode; a step is computed in full once the predicted relative L1 change of the
        deep feature since the last full step reaches it (see predicted_deep_change).
    full_steps: keystep mode; how many steps the search computes in full.
    reuse: what a rehash step takes, one of REUSE_MODES (see the module's docstring).
    start_percent, end_percent: rehash only between these fractions of the sampling schedule.
    """

    mode: str = "fixed"
    split_point: int = -1
    interval: int = 2
    warmup: int = 2
    tail: int = 1
    threshold: float = 0.15
    full_steps: int = 13
    start_percent: float = 0.0
    end_percent: float = 1.0
    reuse: str = "extrapolate"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RehashConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.reuse not in REUSE_MODES:
            raise RehashConfigError(f"reuse must be one of {REUSE_MODES}, got {self.reuse!r}")
        if self.split_point < -1:
            raise RehashConfigError(f"cache_block must be >= 0 (or -1 = default), got {self.split_point}")
        for name in ("interval", "full_steps"):
            if getattr(self, name) < 1:
                raise RehashConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "tail"):
            if getattr(self, name) < 0:
                raise RehashConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.threshold >= 0:
            raise RehashConfigError(f"threshold must be >= 0, got {self.threshold}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise RehashConfigError("need 0 <= start_percent <= end_percent <= 1, got "
                                    f"{self.start_percent}, {self.end_percent}")


def resolve_output_block(split_point: int, output_blocks: int) -> int:
    """The output block index to cache after, from RehashConfig.split_point; the last output block cannot be a
    cache point (nothing would be left to compute)."""
    resolved = output_blocks - 2 if split_point == -1 else split_point
    if not 0 <= resolved <= output_blocks - 2:
        raise RehashConfigError(f"cache_block {split_point} is out of range for a UNet with {output_blocks} "
                                f"output blocks (0..{output_blocks - 2}, or -1 for the default)")
    return resolved


def fixed_full_steps(steps: int, interval: int, warmup: int, tail: int) -> list[int]:
    """Step indices computed in full by the fixed schedule."""
    full = []
    for i in range(steps):
        if i < warmup or i >= steps - tail or (i - warmup) % interval == 0:
            full.append(i)
    return full


def relative_l1(a: Tensor, b: Tensor) -> float:
    """mean|a - b| / mean|b|, in float32."""
    return relative_l1_on_device(a, b).item()


def relative_l1_on_device(a: Tensor, b: Tensor) -> Tensor:
    """relative_l1 as a 0-d float32 tensor on the inputs' device (nothing read on the host)."""
    a, b = a.float(), b.float()
    return (a - b).abs().mean() / b.abs().mean().clamp_min(1e-12)


# How far past the last full step's feature extrapolation may go, in units of the distance between the
# last two: the line is a local estimate. On TinyVideo (every 4th step full, 25 steps) capping at 1
# measured 35.4 dB against full sampling, 34.5 dB uncapped and 33.9 dB capped at 0.5.
MAX_EXTRAPOLATION = 1.0


def extrapolation_reach(sigma: float, earlier_sigma: float, last_sigma: float) -> float:
    """Where `sigma` lies on the line through the last two full steps: 0 at the last, 1 one span past it."""
    return (sigma - last_sigma) / (last_sigma - earlier_sigma)


def reused_feature(history: Sequence[tuple[float, Tensor]], sigma: float, reuse: str) -> Tensor:
    """What a rehash step at `sigma` takes from the deep features of the last full calls.

    history: (sigma, feature) of the last full calls, oldest first; only the last two are read.
    hold: the last feature. extrapolate: the line through the last two, in sigma, at `sigma`
    (the last feature alone while there is only one, or both were taken at the same sigma), followed
    at most as far past the last feature as the two lie apart.
    """
    last_sigma, last = history[-1]
    if reuse == "hold" or len(history) < 2 or history[-2][0] == last_sigma:
        return last
    earlier_sigma, earlier = history[-2]
    beyond = min(extrapolation_reach(sigma, earlier_sigma, last_sigma), MAX_EXTRAPOLATION)
    return torch.lerp(earlier, last, 1.0 + beyond)  # last + beyond * (last - earlier), one allocation


def change_rate(deep: Tensor, earlier_deep: Tensor, shallow: Tensor, earlier_shallow: Tensor) -> float:
    """Relative change of the deep feature per relative change of the shallow feature, between two
    full calls."""
    return relative_l1(deep, earlier_deep) / max(relative_l1(shallow, earlier_shallow), 1e-8)


def change_rate_on_device(deep: Tensor, earlier_deep: Tensor, shallow: Tensor, earlier_shallow: Tensor) -> Tensor:
    """change_rate as a 0-d float32 tensor on the features' device: a full call stores it without a read."""
    return relative_l1_on_device(deep, earlier_deep) / relative_l1_on_device(shallow, earlier_shallow).clamp_min(1e-8)


def predicted_deep_change(rate: float | Tensor, shallow: Tensor, reference_shallow: Tensor) -> float:
    """The relative change of the deep feature since the call that computed `reference_shallow`,
    predicted from the shallow feature's change and the last measured change rate (a float, or
    change_rate_on_device's tensor: then the prediction is read from the device once)."""
    if isinstance(rate, Tensor):
        return (rate * relative_l1_on_device(shallow, reference_shallow)).item()
    return rate * relative_l1(shallow, reference_shallow)


def feature_sketch(feature: Tensor, max_values: int = 1 << 14, to_cpu: bool = True) -> Tensor:
    """A fixed, evenly strided subsample of `feature` (float32, CPU): enough to measure relative
    error between steps without keeping every step's full deep feature alive. to_cpu=False: a copy of
    its own on the feature's device (no host-device sync; sketches_to_cpu moves a run's at once)."""
    flat = feature.detach().flatten()
    stride = max(1, flat.numel() // max_values)
    sketch = flat[::stride][:max_values].float()
    return sketch.cpu() if to_cpu else sketch.clone()


def sketches_to_cpu(sketches: Sequence[Tensor]) -> list[Tensor]:
    """The sketches on the CPU, read from the device in one copy where they share one."""
    if not sketches:
        return []
    if len({s.device for s in sketches}) > 1:
        return [s.cpu() for s in sketches]
    return list(torch.cat([s.flatten() for s in sketches]).cpu().split([s.numel() for s in sketches]))


def reuse_costs(sketches: Sequence[Tensor], sigmas: Sequence[float], reuse: str) -> Tensor:
    """costs[p + 1, s, t] for p < s < t: the relative L1 error of step t's deep feature when step t is
    rehashed and the last two full steps are p and s (p = -1: s is the only full step so far),
    from a calibration run's feature sketches (one per step) and the sigma of each step."""
    features = torch.stack([sk.double() for sk in sketches])  # (steps, values)
    steps = features.shape[0]
    scale = features.abs().mean(1).clamp_min(1e-12)  # (steps,)
    sigma = torch.tensor([float(v) for v in sigmas], dtype=torch.float64)
    costs = torch.zeros(steps + 1, steps, steps, dtype=torch.float64)
    for s in range(steps - 1):
        later = features[s + 1:]
        hold = (later - features[s]).abs().mean(1) / scale[s + 1:]
        costs[:, s, s + 1:] = hold
        if reuse == "hold":
            continue
        for p in range(s):
            if sigma[s] == sigma[p]:
                continue  # as reused_feature: hold
            beyond = extrapolation_reach(sigma[s + 1:], sigma[p], sigma[s]).clamp(max=MAX_EXTRAPOLATION)[:, None]
            line = features[s] + beyond * (features[s] - features[p])
            costs[p + 1, s, s + 1:] = (later - line).abs().mean(1) / scale[s + 1:]
    return costs


def keystep_search(costs: Tensor, full_steps: int) -> list[int]:
    """The key-step search: the `full_steps` step indices (step 0 included: it has nothing to reuse)
    that minimise the total error of the rehash steps, each charged costs[p + 1, s, t] with s and p
    the last two full steps before it (see reuse_costs). Exact, by dynamic programming over the last
    two full steps: O(full_steps x steps^3) tensor work."""
    steps = costs.shape[1]
    if steps == 0:
        return []
    k = min(full_steps, steps)
    later = torch.triu(torch.ones(steps, steps, dtype=torch.bool), diagonal=1)  # [s, t]: t > s
    # segment[p + 1, s, end]: steps s+1 .. end-1 are rehashed after full steps p and s
    segment = torch.zeros(steps + 1, steps, steps + 1, dtype=torch.float64)
    segment[:, :, 1:] = torch.cumsum(costs.double() * later, dim=2)
    # best[p + 1, s]: least cost of the steps after s, s full with p before it, j full steps left to place
    best = segment[:, :, steps].clone()
    choices = []
    for _ in range(1, k):
        # through[p + 1, s, nxt] = segment[p + 1, s, nxt] + best[s + 1, nxt]
        through = segment[:, :, :steps] + best[1:, :].unsqueeze(0)
        through = through.masked_fill(~later, math.inf)
        best, choice = through.min(dim=2)
        choices.append(choice)
    full, prev, s = [0], -1, 0
    for choice in reversed(choices):
        prev, s = s, int(choice[prev + 1, s])
        full.append(s)
    return full


@dataclass(frozen=True)
class KeystepRecord:
    """A key-step search result, saved so that the same model/sampler/steps reuse it."""

    key: str
    steps: int
    full_steps: list[int]
    changes: list[float]


class KeystepStore:
    """Key-step search results in one JSON file, keyed by the model/sampler/steps key (store_key)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def get(self, key: str) -> KeystepRecord | None:
        entry = self._read().get(key)
        return KeystepRecord(**entry) if entry else None

    def put(self, record: KeystepRecord) -> None:
        data = self._read()
        data[record.key] = asdict(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)


def store_key(*parts) -> str:
    """A stable key from the parts (str() of each): what the key-step store files a search under."""
    import hashlib

    return hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


def tensor_key(t: Tensor) -> str:
    """A short content hash of a (weight) tensor, to tell models apart."""
    import hashlib

    sample = t.detach().flatten()[:4096].float().cpu().numpy().tobytes()
    return hashlib.sha1(sample).hexdigest()[:12]


def step_index(sample_sigmas: Tensor | Sequence[float] | None, sigma: float) -> int:
    """The sampling step a model call belongs to: the last schedule sigma >= the call's sigma (samplers
    that evaluate the model more than once per step map their extra calls onto that step). The schedule
    as host floats (StepClock's) reads nothing from the device."""
    if sample_sigmas is None:
        return 0
    if isinstance(sample_sigmas, Tensor):
        sample_sigmas = sample_sigmas.detach().float().cpu().tolist()
    bound = sigma * (1 - 1e-6)
    return next((i for i in range(len(sample_sigmas) - 1, -1, -1) if sample_sigmas[i] >= bound), 0)


_NO_EVALUATION = object()


class StepClock:
    """Which sampling step, and at which sigma, each model evaluation of a run is, found on the host.

    The run's schedule is read once (`sigmas`, host floats). The sampler reports every finished step i
    through its callback (`step_done`); `begin` marks each model evaluation (one sampler call of the model,
    all its UNet calls: cond and uncond, context windows). The first evaluation after step i's report is step
    i + 1 at sigmas[i + 1] for samplers that evaluate the model once per step (euler, dpmpp_2m, lms, uni_pc,
    ...) and for the heun family (their second evaluation, after the report, is at sigmas[i + 1]). The clock
    takes it from the host once the first evaluations after steps 0 and 1 were read at exactly sigmas[1] and
    sigmas[2] (CONFIRMATIONS); one read elsewhere (sa_solver_pece re-evaluates the reported step) and it never
    does for the run. Every other evaluation (before that, the extra ones of samplers with several per step)
    reads its sigma once, `read()`, and maps it with step_index.
    """

    CONFIRMATIONS = 2

    def __init__(self, sigmas: Sequence[float] | None = None):
        self.sigmas = None if sigmas is None else list(sigmas)
        self.done = 0  # steps the sampler reported finished
        self.since_done = 0  # evaluations begun since the last report
        self.confirmed = 0  # first evaluations after a report read at the sigma the count gives
        self.refuted = False  # one was not: every evaluation of the run reads its sigma
        self.marker: object = _NO_EVALUATION  # the current evaluation (its sigma tensor, kept alive: `is` holds)
        self.first_after_done = False
        self.current: tuple[int, float] | None = None
        self.reads = 0  # sigmas read from the device (one per evaluation at most)

    @property
    def trusted(self) -> bool:
        return self.confirmed >= self.CONFIRMATIONS and not self.refuted

    def step_done(self, step: int) -> None:
        self.done, self.since_done = step + 1, 0

    def begin(self, marker) -> None:
        """A model evaluation begins, known by `marker` (the same object for all its calls)."""
        if marker is self.marker:
            return
        self.marker, self.current = marker, None
        self.first_after_done = self.since_done == 0
        self.since_done += 1

    def locate(self, read) -> tuple[int, float]:
        """The current evaluation's (step, sigma); read() -> its sigma, called at most once per evaluation."""
        if self.current is None:
            self.current = self._locate(read)
        return self.current

    def _locate(self, read) -> tuple[int, float]:
        sigmas = self.sigmas or []
        if self.trusted and self.first_after_done and self.done < len(sigmas) - 1:
            return self.done, sigmas[self.done]
        sigma = read()
        self.reads += 1
        step = step_index(sigmas, sigma) if sigmas else 0
        if self.first_after_done and 1 <= self.done < len(sigmas) - 1 and not self.trusted:
            if step == self.done and math.isclose(sigma, sigmas[self.done], rel_tol=1e-6):
                self.confirmed += 1
            else:
                self.refuted = True
        return step, sigma

    def release(self) -> None:
        self.marker, self.current = _NO_EVALUATION, None


def schedule_steps(sample_sigmas: Tensor | None) -> int:
    return 0 if sample_sigmas is None else max(len(sample_sigmas) - 1, 0)

