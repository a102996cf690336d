"""One plan search for every family: candidate slicings, each one's predicted peak, the cheapest that fits.

A family's laws give the peak of one candidate; this module knows nothing of what a candidate is (a UNet's
SliceConfig, a DiT's tokens per slice). Two ways to be cheapest:
- by a cost (`cost` given): every candidate's peak is predicted; the lowest cost among those that fit wins,
  ties to the lower peak, then to the earlier candidate (a UNet: chunks counted, offload's traffic added);
- by order (`cost` None): the candidates come from coarse (cheapest) to fine and, after the first, their peaks
  do not grow along that order, so the first that fits is found by bisection (a DiT's tokens per slice: all
  tokens, ComfyUI's block, then slices whose laws' peak grows with the slice).
When none fits, BudgetError says the smallest budget that would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

Candidate = TypeVar("Candidate")

# Share of a budget a plan may fill with predicted live tensors: PyTorch's caching allocator needs
# headroom for fragmentation. Measured on an H100 with the process capped at weights + 4 GiB: a plan
# predicted at 3.94 GiB (98.5%) ran out of memory at 512x512x128; plans at 87% and below ran.
ALLOCATOR_HEADROOM = 0.9


def format_bytes(n: float) -> str:
    """A size as the pack prints it: GiB from 1 GiB up, MiB below (a budget of 0.05 GiB is 51.2 MiB, not 0.05 GiB)."""
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


class BudgetError(ValueError):
    """No slicing fits the budget; the message says the smallest budget that would."""

    __module__ = "comfyui_streamline"  # ComfyUI imports the pack under its folder path; its error dialog shows this


@dataclass(frozen=True)
class PlanSearch:
    """What a plan must fit: `headroom` of `budget_bytes` (ALLOCATOR_HEADROOM for a device budget; 1.0 for a
    bound on predicted peaks themselves). `what`: the work, as the error names it ("2 samples at 64x64 latent")."""

    budget_bytes: float
    what: str
    headroom: float = ALLOCATOR_HEADROOM

    @property
    def usable_bytes(self) -> float:
        return self.budget_bytes * self.headroom


@dataclass(frozen=True)
class Fit(Generic[Candidate]):
    """The candidate chosen and its predicted peak (bytes)."""

    candidate: Candidate
    peak_bytes: float


def cheapest_fit(candidates: Sequence[Candidate], peak: Callable[[Candidate], float], search: PlanSearch,
                 cost: Callable[[Candidate], float] | None = None) -> Fit[Candidate]:
    """The cheapest candidate whose predicted peak fits `search` (see the module's docstring for `cost`).
    Raises BudgetError when none does."""
    if not candidates:
        raise ValueError("cheapest_fit needs at least one candidate")
    found, smallest = (_by_order if cost is None else _by_cost)(candidates, peak, search.usable_bytes, cost)
    if found is None:
        raise BudgetError(f"no slicing fits {format_bytes(search.budget_bytes)} of activation memory for "
                          f"{search.what}; the minimum feasible budget is {format_bytes(smallest / search.headroom)} "
                          f"(a predicted peak of {format_bytes(smallest)} with {1 - search.headroom:.0%} headroom "
                          "for the allocator)")
    return found


def _by_cost(candidates, peak, usable: float, cost) -> tuple[Fit | None, float]:
    best, best_cost, smallest = None, 0.0, None
    for candidate in candidates:
        p = peak(candidate)
        smallest = p if smallest is None else min(smallest, p)
        if p <= usable:
            c = cost(candidate)
            if best is None or c < best_cost or (c == best_cost and p < best.peak_bytes):
                best, best_cost = Fit(candidate, p), c
    return best, smallest


def _by_order(candidates, peak, usable: float, cost=None) -> tuple[Fit | None, float]:
    """The coarsest candidate first (often the unsliced forward, which may hold less than the coarsest slices),
    then bisection for the first that fits among the rest: `low` never fits, `high` always does."""
    coarsest = peak(candidates[0])
    if coarsest <= usable:
        return Fit(candidates[0], coarsest), coarsest
    finest = peak(candidates[-1])
    if finest > usable:
        return None, min(coarsest, finest)
    low, high, high_peak = 0, len(candidates) - 1, finest
    while high - low > 1:
        mid = (low + high) // 2
        p = peak(candidates[mid])
        if p <= usable:
            high, high_peak = mid, p
        else:
            low = mid
    return Fit(candidates[high], high_peak), finest


# The automatic slice of a DiT block (a user who leaves the slice at 0): the largest candidate slice whose
# predicted peak is at most this share above the smallest slice's. Slices that save little more cost time.
AUTO_PEAK_CLOSENESS = 0.05


def automatic_slice(candidates: Sequence[Candidate], peak: Callable[[Candidate], float]) -> Fit[Candidate]:
    """The coarsest of `candidates` (coarse to fine, peaks not growing along them) whose predicted peak is within
    AUTO_PEAK_CLOSENESS of the finest one's."""
    bound = (1 + AUTO_PEAK_CLOSENESS) * peak(candidates[-1])
    return cheapest_fit(candidates, peak, PlanSearch(bound, "the automatic slice", headroom=1.0))
