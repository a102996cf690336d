"""Step Rehash: which denoising steps compute the deep UNet path, and which reuse its cached output.

Adjacent steps have very similar deep features (Streamlined Inference observes it at the output of
the temporal layers in the up-blocks). On a rehash step the UNet runs only its shallow path (the
input blocks down to the cache point and the output blocks after it) and takes the deep feature
cached at the last full step. This module decides which steps are full:

- fixed:    a warm-up and a tail computed in full, every `interval`-th step in between;
- adaptive: per step, from the accumulated relative change of the shallow feature (which a rehash
            step computes anyway) since the last full step, against a threshold;
- keystep:  the paper's key-step search: from one calibration run with every step in full, the
            per-step change of the cached deep feature; choose the K full steps that minimise the
            accumulated change the rehash steps reuse (dynamic programming, exact).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from torch import Tensor

MODES = ("off", "fixed", "adaptive", "keystep")


class RehashConfigError(ValueError):
    """A Step Rehash setting that cannot be honoured."""


@dataclass(frozen=True)
class RehashConfig:
    """mode: one of MODES.
    cache_block: output block whose output (after its temporal layer) is cached; -1 = the default
        (the second-to-last output block: a rehash step then runs only the first input block and the
        last output block at full resolution).
    interval, warmup, tail: the fixed schedule (warm-up and tail steps are always full).
    threshold: adaptive mode; a step is computed in full once the accumulated relative L1 change of
        the shallow feature since the last full step reaches it.
    full_steps: keystep mode; how many steps the search computes in full.
    start_percent, end_percent: rehash only between these fractions of the sampling schedule.
    """

    mode: str = "fixed"
    cache_block: int = -1
    interval: int = 2
    warmup: int = 2
    tail: int = 1
    threshold: float = 0.15
    full_steps: int = 13
    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RehashConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.cache_block < -1:
            raise RehashConfigError(f"cache_block must be >= 0 (or -1 = default), got {self.cache_block}")
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


def resolve_cache_block(cache_block: int, output_blocks: int) -> int:
    """The output block index to cache after; the last output block cannot be a cache point (nothing
    would be left to compute)."""
    resolved = output_blocks - 2 if cache_block == -1 else cache_block
    if not 0 <= resolved <= output_blocks - 2:
        raise RehashConfigError(f"cache_block {cache_block} is out of range for a UNet with {output_blocks} "
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
    a, b = a.float(), b.float()
    return ((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12)).item()


def keystep_search(changes: Sequence[float], full_steps: int) -> list[int]:
    """The paper's key-step search.

    changes[t]: relative change of the cached deep feature from step t-1 to step t (changes[0] is
    ignored: step 0 is always full). A rehash step t that reuses the feature of the last full step s
    is charged the accumulated change changes[s+1] + ... + changes[t]. Returns the `full_steps` step
    indices (step 0 included) that minimise the total charge, by dynamic programming.
    """
    steps = len(changes)
    if steps == 0:
        return []
    k = min(full_steps, steps)
    prefix = [0.0]
    for t in range(1, steps):
        prefix.append(prefix[-1] + float(changes[t]))

    def segment_cost(s: int, end: int) -> float:
        # steps s+1 .. end-1 reuse step s's feature
        return sum(prefix[t] - prefix[s] for t in range(s + 1, end))

    # best[j][s]: minimal cost of steps s.. with step s full and j more full steps to place after it
    inf = math.inf
    best = [[inf] * steps for _ in range(k)]
    choice = [[-1] * steps for _ in range(k)]
    for s in range(steps):
        best[0][s] = segment_cost(s, steps)
    for j in range(1, k):
        for s in range(steps):
            for nxt in range(s + 1, steps):
                cost = segment_cost(s, nxt) + best[j - 1][nxt]
                if cost < best[j][s]:
                    best[j][s], choice[j][s] = cost, nxt
    full, s, j = [0], 0, k - 1
    while j > 0 and choice[j][s] != -1:
        s = choice[j][s]
        full.append(s)
        j -= 1
    return full


@dataclass(frozen=True)
class KeystepRecord:
    """A key-step search result, saved so that the same model/sampler/steps reuse it."""

    key: str
    steps: int
    full_steps: list[int]
    changes: list[float]


class KeystepStore:
    """Key-step search results in one JSON file, keyed by the model/sampler/steps fingerprint."""

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


def fingerprint(*parts) -> str:
    """A stable key from the parts (str() of each)."""
    import hashlib

    return hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


def tensor_fingerprint(t: Tensor) -> str:
    """A short content hash of a (weight) tensor, to tell models apart."""
    import hashlib

    sample = t.detach().flatten()[:4096].float().cpu().numpy().tobytes()
    return hashlib.sha1(sample).hexdigest()[:12]


def step_index(sample_sigmas: Tensor | None, sigma: float) -> int:
    """The sampling step a model call belongs to: the last schedule sigma >= the call's sigma (samplers
    that evaluate the model more than once per step map their extra calls onto that step)."""
    if sample_sigmas is None:
        return 0
    sigmas = sample_sigmas.detach().float().cpu()
    at_or_above = (sigmas >= sigma * (1 - 1e-6)).nonzero()
    return int(at_or_above[-1]) if len(at_or_above) else 0


def schedule_steps(sample_sigmas: Tensor | None) -> int:
    return 0 if sample_sigmas is None else max(len(sample_sigmas) - 1, 0)

