"""core/plan_search.py alone (plain PyTorch, no host), and the UNet and SVD plans made through it (their laws,
core/budget.py and families/svd/laws.py, are plain arithmetic): the search against brute force."""
import math
import random

import pytest

from comfyui_streamline.core.budget import SDPA, SUB_QUADRATIC, Workload, candidate_configs, chunk_count
from comfyui_streamline.core.budget import offload_choices, offload_cost_chunks, plan, predict_peak_bytes, sd15_shape
from comfyui_streamline.core.plan_search import (
    AUTO_PEAK_CLOSENESS, BudgetError, PlanSearch, automatic_slice, cheapest_fit, format_bytes,
)
from comfyui_streamline.core.slicing import frame_slices


def brute_force(candidates, peak, usable, cost):
    """The cheapest fitting candidate by its definition: lowest cost, then lowest peak, then the earliest."""
    fitting = [(cost(c), peak(c), i) for i, c in enumerate(candidates) if peak(c) <= usable]
    return candidates[min(fitting)[2]] if fitting else None


def budgets(finest: float, baseline: float) -> list[int]:
    """Budgets from just under the finest slicing's peak to above ComfyUI's forward's (allocator headroom 0.9)."""
    return [int((finest + (baseline - finest) * f) / 0.9) + 1 for f in (-0.05, 0.0, 0.05, 0.2, 0.5, 1.0, 1.3)]


def first_fitting(candidates, peak, usable):
    return next((c for c in candidates if peak(c) <= usable), None)


def test_by_order_is_the_first_that_fits_in_few_peaks():
    """Peaks that do not grow after the first candidate (the first: anything, as ComfyUI's unsliced forward):
    bisection finds what a scan finds, predicting at most 2 + log2(n) peaks."""
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 3000)
        steps = sorted((rng.random() for _ in range(n - 1)), reverse=True)  # coarse to fine: shrinking
        peaks = [rng.random() * 2] + steps
        usable = rng.random() * 1.2
        asked = []

        def peak(i):
            asked.append(i)
            return peaks[i]

        expected = first_fitting(range(n), peaks.__getitem__, usable)
        try:
            fit = cheapest_fit(range(n), peak, PlanSearch(usable, "a test", headroom=1.0))
        except BudgetError:
            fit = None
        assert (None if fit is None else fit.candidate) == expected, trial
        if fit is not None:
            assert fit.peak_bytes == peaks[fit.candidate]
        assert len(asked) <= 2 + math.ceil(math.log2(n))


@pytest.mark.parametrize("batch,side", [(2, 32), (16, 32), (32, 64)])
@pytest.mark.parametrize("laws", [SDPA, SUB_QUADRATIC], ids=["sdpa", "sub-quadratic"])
@pytest.mark.parametrize("offload", [False, True])
def test_unet_plan_is_the_brute_force_cheapest(batch, side, laws, offload):
    """core.budget.plan at SD1.5 with motion modules over budgets from below the finest slicing to above
    ComfyUI's forward: the plan is the brute-force cheapest that fits, so every cheaper candidate does not."""
    shape, work = sd15_shape(), Workload(batch, batch // 2 or 1, side, side)
    candidates = [c for s in candidate_configs(work) for c in offload_choices(s, offload)]
    peaks = {c: predict_peak_bytes(shape, work, c, laws) for c in candidates}
    cost = {c: chunk_count(work, c) + offload_cost_chunks(shape, work, c) for c in candidates}
    baseline = predict_peak_bytes(shape, work, None, laws)
    planned = 0
    for budget in budgets(min(peaks.values()), baseline):
        expected = brute_force(candidates, peaks.__getitem__, budget * 0.9, cost.__getitem__)
        if expected is None:
            with pytest.raises(BudgetError):
                plan(shape, work, budget, laws, offload=offload)
            continue
        chosen = plan(shape, work, budget, laws, offload=offload)
        assert chosen.config == expected and chosen.predicted_peak_bytes == peaks[expected] <= budget * 0.9
        assert all(peaks[c] > budget * 0.9 for c in candidates if cost[c] < cost[expected])
        planned += 1
    assert planned == 6  # all but the budget under the finest slicing's peak


@pytest.mark.parametrize("frames,side", [(14, 32), (25, 72)])
def test_svd_plan_is_the_brute_force_cheapest(frames, side):
    from comfyui_streamline.families.svd.laws import SVDWork, plan_svd, predict_svd_peak_bytes, svd_structure

    structure, work = svd_structure(), SVDWork(2 * frames, frames, side, side)
    candidates = candidate_configs(work)
    peaks = {c: predict_svd_peak_bytes(structure, work, c, SDPA) for c in candidates}
    baseline = predict_svd_peak_bytes(structure, work, None, SDPA)
    planned = 0
    for budget in budgets(min(peaks.values()), baseline):
        expected = brute_force(candidates, peaks.__getitem__, budget * 0.9, lambda c: chunk_count(work, c))
        if expected is None:
            with pytest.raises(BudgetError):
                plan_svd(structure, work, budget, SDPA)
            continue
        chosen = plan_svd(structure, work, budget, SDPA)
        assert chosen.config == expected and chosen.predicted_peak_bytes == peaks[expected]
        planned += 1
    assert planned == 6


@pytest.mark.parametrize("by_cost", [False, True])
def test_no_fit_says_the_minimum_budget_and_that_budget_fits(by_cost):
    peaks = [9.0, 7.0, 5.0, 4.0, 3.5] if not by_cost else [5.0, 3.5, 9.0, 4.0, 7.0]
    cost = (lambda i: -i) if by_cost else None
    search = PlanSearch(3 * 2**20, "a test", headroom=0.9)
    minimum = 3.5 * 2**20 / 0.9  # the finest peak, with the allocator's headroom
    with pytest.raises(BudgetError, match=f"minimum feasible budget is {format_bytes(minimum)}"):
        cheapest_fit(range(5), lambda i: peaks[i] * 2**20, search, cost)
    assert cheapest_fit(range(5), lambda i: peaks[i] * 2**20, PlanSearch(minimum, "a test"), cost).peak_bytes == 3.5 * 2**20
    with pytest.raises(BudgetError):
        cheapest_fit(range(5), lambda i: peaks[i] * 2**20, PlanSearch(minimum * 0.999, "a test"), cost)


def test_automatic_slice_is_the_coarsest_close_to_the_finest():
    # a peak held whatever the slice, plus a working set that grows with it
    for held, per_token in [(100.0, 1.0), (1000.0, 1.0), (0.0, 1.0), (5000.0, 0.01)]:
        slices = frame_slices(21 * 1560, 1560)
        peak = lambda n: held + per_token * n  # noqa: E731
        chosen = automatic_slice(slices, peak).candidate
        bound = (1 + AUTO_PEAK_CLOSENESS) * peak(slices[-1])
        assert peak(chosen) <= bound
        coarser = slices.index(chosen) - 1
        assert coarser < 0 or peak(slices[coarser]) > bound
    assert automatic_slice([7], lambda n: 1.0).candidate == 7


def test_frame_slices():
    assert frame_slices(7800, 1560) == [7800, 6240, 4680, 3120, 1560]
    assert frame_slices(100, 30) == [100, 90, 60, 30]  # a part frame: all tokens first
    assert frame_slices(90, 300) == [90]
