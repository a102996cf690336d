"""core/rehash.py alone: schedules, the key-step search, the saved results."""
import itertools

import pytest
import torch

from comfyui_streamline.core.rehash import (
    KeystepRecord, KeystepStore, RehashConfig, RehashConfigError, feature_sketch, fixed_full_steps,
    MAX_EXTRAPOLATION, change_rate, keystep_search, predicted_deep_change, resolve_output_block, reuse_costs, reused_feature, step_index,
)


def test_fixed_schedule_has_warmup_interval_and_tail():
    assert fixed_full_steps(10, interval=3, warmup=2, tail=1) == [0, 1, 2, 5, 8, 9]
    assert fixed_full_steps(5, interval=1, warmup=0, tail=0) == [0, 1, 2, 3, 4]
    assert fixed_full_steps(25, interval=2, warmup=1, tail=1)[:4] == [0, 1, 3, 5]


def _schedule_cost(costs, full):
    """What the key-step search minimises: each rehash step t pays costs[p + 1, s, t], s and p the last
    two full steps before it (p = -1 while s is the only one)."""
    total, prev, last = 0.0, -1, 0
    for t in range(1, costs.shape[1]):
        if t in full:
            prev, last = last, t
        else:
            total += float(costs[prev + 1, last, t])
    return total


def _brute_force(costs, k):
    steps = costs.shape[1]
    return min(_schedule_cost(costs, {0, *c}) for c in itertools.combinations(range(1, steps), k - 1))


@pytest.mark.parametrize("seed", range(5))
def test_keystep_search_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    steps = 10
    costs = torch.rand(steps + 1, steps, steps, generator=g, dtype=torch.float64) ** 2
    for k in (1, 2, 3, 5, 10):
        full = keystep_search(costs, k)
        assert full[0] == 0 and len(full) == len(set(full)) == k and full == sorted(full)
        assert _schedule_cost(costs, set(full)) == pytest.approx(_brute_force(costs, k))


def test_keystep_search_puts_full_steps_where_features_change():
    jumps = [0.0, 0.01, 0.01, 0.9, 0.01, 0.01, 0.8, 0.01]
    sketches, value = [], 1.0
    for jump in jumps:
        value += jump
        sketches.append(torch.full((16,), value))
    sigmas = [float(8 - t) for t in range(8)]
    assert set(keystep_search(reuse_costs(sketches, sigmas, "hold"), 3)) == {0, 3, 6}


def test_keystep_search_with_extrapolation_spends_full_steps_on_bends_not_on_slopes():
    """A feature moving steadily costs nothing to extrapolate (within reach); full steps go where the
    motion bends, and the same number of full steps leaves far less error than holding."""
    sigmas = [float(12 - t) for t in range(12)]
    velocity = [1.0] * 6 + [-1.0] * 6  # a turn after step 5
    position, sketches = 1.0, []
    for v in velocity:
        position += v * 0.1
        sketches.append(torch.full((16,), 3.0) + position * torch.linspace(0, 1, 16))
    line, hold = reuse_costs(sketches, sigmas, "extrapolate"), reuse_costs(sketches, sigmas, "hold")
    full = keystep_search(line, 6)
    assert _schedule_cost(line, set(full)) < 1e-5  # every rehash step lies on a line within reach
    assert {6, 7} & set(full)  # a full step right after the turn
    assert _schedule_cost(hold, set(keystep_search(hold, 6))) > 0.05


def test_reuse_costs_measure_the_error_of_what_a_rehash_step_takes():
    """A feature moving on a line in sigma: holding it costs its distance, extrapolating costs nothing;
    each cost is exactly the error of reused_feature against the true feature."""
    sigmas = [10.0, 8.0, 5.0, 4.0, 1.0]
    base, direction = torch.linspace(1, 2, 32), torch.linspace(-1, 1, 32)
    sketches = [base + (10 - sigma) * 0.05 * direction for sigma in sigmas]
    hold, line = reuse_costs(sketches, sigmas, "hold"), reuse_costs(sketches, sigmas, "extrapolate")
    for p, s, t in ((-1, 0, 2), (0, 1, 3), (1, 2, 4), (0, 2, 4), (0, 1, 4)):
        history = [(sigmas[s], sketches[s])] if p < 0 else [(sigmas[p], sketches[p]), (sigmas[s], sketches[s])]
        for costs, reuse in ((hold, "hold"), (line, "extrapolate")):
            reused = reused_feature(history, sigmas[t], reuse)
            expected = ((reused - sketches[t]).abs().mean() / sketches[t].abs().mean()).item()
            assert float(costs[p + 1, s, t]) == pytest.approx(expected, abs=1e-6)
    assert float(hold[2, 2, 3]) > 0.01 and float(line[2, 2, 3]) < 1e-6  # within reach: exact
    assert float(line[1, 1, 3]) > 0.01  # 1.5 spans past step 1: capped, no longer on the line


def test_reused_feature_holds_or_follows_the_line_in_sigma():
    f1, f2 = torch.zeros(4), torch.ones(4)
    assert torch.equal(reused_feature([(9.0, f1), (7.0, f2)], 6.0, "hold"), f2)
    assert torch.allclose(reused_feature([(9.0, f1), (7.0, f2)], 6.0, "extrapolate"), torch.full((4,), 1.5))
    assert torch.equal(reused_feature([(7.0, f2)], 6.0, "extrapolate"), f2)  # one full step so far
    far = reused_feature([(9.0, f1), (7.0, f2)], 1.0, "extrapolate")  # three spans past: capped at one
    assert torch.allclose(far, torch.full((4,), 1.0 + MAX_EXTRAPOLATION))
    assert torch.equal(reused_feature([(7.0, f1), (7.0, f2)], 6.0, "extrapolate"), f2)  # no direction to follow
    half = reused_feature([(9.0, f1.half()), (7.0, f2.half())], 6.0, "extrapolate")
    assert half.dtype == torch.float16


def test_feature_sketch_is_small_strided_and_detached():
    feature = torch.arange(1_000_000, dtype=torch.float32).reshape(10, 100, 1000)
    sketch = feature_sketch(feature, max_values=1000)
    assert sketch.dtype == torch.float32 and sketch.numel() == 1000
    assert sketch[1].item() - sketch[0].item() == 1000  # evenly strided through the whole tensor
    assert feature_sketch(torch.ones(10)).numel() == 10


def test_keystep_store_round_trip(tmp_path):
    store = KeystepStore(tmp_path / "sub" / "keysteps.json")
    assert store.get("a") is None
    store.put(KeystepRecord("a", 4, [0, 2], [0.0, 0.1, 0.2, 0.1]))
    store.put(KeystepRecord("b", 3, [0], [0.0, 0.1, 0.1]))
    assert store.get("a").full_steps == [0, 2] and store.get("b").steps == 3


def test_config_rejects_bad_settings():
    for bad in (dict(mode="sometimes"), dict(interval=0), dict(full_steps=0), dict(warmup=-1),
                dict(start_percent=0.8, end_percent=0.2), dict(split_point=-2), dict(threshold=float("nan")),
                dict(reuse="average")):
        with pytest.raises(RehashConfigError):
            RehashConfig(**bad)


def test_cache_block_range():
    assert resolve_output_block(-1, 12) == 10
    assert resolve_output_block(3, 12) == 3
    with pytest.raises(RehashConfigError, match="0..10"):
        resolve_output_block(11, 12)


def test_step_index_maps_model_calls_to_steps():
    import torch

    sigmas = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    assert [step_index(sigmas, s) for s in (14.6, 7.0, 5.0, 1.0)] == [0, 1, 1, 3]


def test_adaptive_predicts_the_deep_change_from_the_shallow_one():
    shallow_0, shallow_1 = torch.full((8,), 1.0), torch.full((8,), 1.1)  # 10% apart (relative to shallow_0)
    deep_0, deep_1 = torch.full((8,), 2.0), torch.full((8,), 2.4)  # 20% apart
    rate = change_rate(deep_1, deep_0, shallow_1, shallow_0)
    assert rate == pytest.approx(2.0, rel=1e-5)  # the deep feature moved twice as much, relatively
    assert predicted_deep_change(rate, torch.full((8,), 1.05), shallow_1) == pytest.approx(rate * 0.05 / 1.1, rel=1e-5)
