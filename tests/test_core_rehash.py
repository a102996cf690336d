"""core/rehash.py alone: schedules, the key-step search, the saved results."""
import itertools

import pytest

from comfyui_streamline.core.rehash import (
    KeystepRecord, KeystepStore, RehashConfig, RehashConfigError, fixed_full_steps, keystep_search,
    resolve_cache_block, step_index,
)


def test_fixed_schedule_has_warmup_interval_and_tail():
    assert fixed_full_steps(10, interval=3, warmup=2, tail=1) == [0, 1, 2, 5, 8, 9]
    assert fixed_full_steps(5, interval=1, warmup=0, tail=0) == [0, 1, 2, 3, 4]
    assert fixed_full_steps(25, interval=2, warmup=1, tail=1)[:4] == [0, 1, 3, 5]


def _brute_force(changes, k):
    steps = len(changes)

    def cost(full):
        total, acc = 0.0, 0.0
        for t in range(1, steps):
            if t in full:
                acc = 0.0
            else:
                acc += changes[t]
                total += acc
        return total

    best = min((c for c in itertools.combinations(range(1, steps), k - 1)), key=lambda c: cost({0, *c}))
    return cost({0, *best}), cost


@pytest.mark.parametrize("seed", range(5))
def test_keystep_search_is_optimal(seed):
    import random

    rng = random.Random(seed)
    changes = [0.0] + [rng.random() ** 2 for _ in range(11)]
    for k in (1, 3, 5, 12):
        full = keystep_search(changes, k)
        assert full[0] == 0 and len(full) == len(set(full)) == k and full == sorted(full)
        best_cost, cost = _brute_force(changes, k)
        assert cost(set(full)) == pytest.approx(best_cost)


def test_keystep_search_puts_full_steps_where_features_change():
    changes = [0, 0.01, 0.01, 0.9, 0.01, 0.01, 0.8, 0.01]
    assert set(keystep_search(changes, 3)) == {0, 3, 6}


def test_keystep_store_round_trip(tmp_path):
    store = KeystepStore(tmp_path / "sub" / "keysteps.json")
    assert store.get("a") is None
    store.put(KeystepRecord("a", 4, [0, 2], [0.0, 0.1, 0.2, 0.1]))
    store.put(KeystepRecord("b", 3, [0], [0.0, 0.1, 0.1]))
    assert store.get("a").full_steps == [0, 2] and store.get("b").steps == 3


def test_config_rejects_bad_settings():
    for bad in (dict(mode="sometimes"), dict(interval=0), dict(full_steps=0), dict(warmup=-1),
                dict(start_percent=0.8, end_percent=0.2), dict(cache_block=-2), dict(threshold=float("nan"))):
        with pytest.raises(RehashConfigError):
            RehashConfig(**bad)


def test_cache_block_range():
    assert resolve_cache_block(-1, 12) == 10
    assert resolve_cache_block(3, 12) == 3
    with pytest.raises(RehashConfigError, match="0..10"):
        resolve_cache_block(11, 12)


def test_step_index_maps_model_calls_to_steps():
    import torch

    sigmas = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    assert [step_index(sigmas, s) for s in (14.6, 7.0, 5.0, 1.0)] == [0, 1, 1, 3]
