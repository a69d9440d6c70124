"""telemanom's dynamic threshold: the batch rules on hand-made windows, then the streaming form."""

from __future__ import annotations

import numpy as np
import pytest
from faultwatch.runtime.engine.thresholds import (
    DynamicThreshold,
    DynamicThresholdSettings,
    dynamic_threshold,
    find_epsilon,
    pruned_threshold,
)

Z = np.arange(2.5, 12.01, 0.5)


def noise(n: int, seed: int = 0) -> np.ndarray:
    return 1.0 + 0.1 * np.random.default_rng(seed).standard_normal(n)


def test_epsilon_separates_one_clear_anomaly():
    e = noise(500)
    e[300:305] = 4.0
    eps, _ = find_epsilon(e, Z)
    assert e[:300].max() < eps < 4.0
    assert (e > eps).sum() == 5  # exactly the anomalous sequence


def test_guard_rails_fall_back_to_the_largest_z():
    # Many sequences above every candidate: none is allowed (more than 5 sequences).
    e = np.tile([1.0, 1.0, 1.0, 9.0], 50)
    eps, z = find_epsilon(e, Z)
    assert z == 12.0 and eps == pytest.approx(e.mean() + 12 * e.std())
    # A flat window has no spread: no candidate at all.
    assert find_epsilon(np.ones(10), Z) == (1.0, 12.0)


def test_candidates_flagging_half_the_window_are_refused():
    e = np.r_[np.ones(100), np.full(100, 5.0)]  # "anomaly" = half the window
    eps, _ = find_epsilon(e, Z)
    assert (e > eps).sum() == 0


def test_pruning_removes_peaks_without_a_clear_step_down():
    base = np.ones(50)
    e = np.r_[base, [3.0], base, [2.8], base, [9.0], base, [2.6]]
    # Peaks above ε = 2.7: 9.0, 3.0, 2.8; the highest normal error is 2.6.
    # 9.0 → 3.0 drops 67 % (kept); 3.0 → 2.8 drops 6.7 % and 2.8 → 2.6 drops 7.1 %: both pruned.
    # A new error must clear the highest pruned peak by p: 3.0 / (1 - 0.13) = 3.448.
    assert pruned_threshold(e, 2.7, 0.13) == pytest.approx(3.0 / 0.87)
    # With a clear step below the lowest peak, nothing is pruned and ε stands.
    e2 = np.r_[base, [3.0], base, [9.0], base]
    assert pruned_threshold(e2, 2.0, 0.13) == 2.0


def test_dynamic_threshold_on_a_window_with_an_anomaly():
    e = noise(1000, seed=1)
    e[600:620] = 6.0
    settings = DynamicThresholdSettings()
    thr = dynamic_threshold(e, settings)
    assert e[e < 2].max() < thr < 6.0


def test_streaming_threshold_recomputes_every_k_readings_staggered():
    settings = DynamicThresholdSettings(window=200, every=25, min_history=50, floor=0.5)
    dyn = DynamicThreshold(settings, static=10.0, capacity=3)
    slots = np.array([0, 1, 2])
    rng = np.random.default_rng(2)
    before = []
    for _ in range(400):
        before.append(dyn.current(slots).copy())
        dyn.push(slots, 1.0 + 0.1 * rng.standard_normal(3))
    before = np.array(before)
    # Until min_history scores are in, the static threshold.
    assert (before[:50] == 10.0).all()
    # Afterwards it follows the data (scores ~1 ± 0.1), never below floor × static = 5.
    assert (before[-1] == 5.0).all()
    # O(1) amortised: one recomputation per device every `every` readings once warm.
    n_due = sum(1 for s in range(3) for n in range(1, 401) if n >= 50 and (n + s) % 25 == 0)
    assert dyn.recomputed == n_due
    # Staggered: devices in lockstep do not recompute on the same reading.
    change_steps = [set(np.flatnonzero(np.diff(before[:, s]))) for s in range(3)]
    assert change_steps[0] and not change_steps[0] & change_steps[1]


def test_streaming_window_keeps_the_latest_scores_in_order():
    settings = DynamicThresholdSettings(window=10, every=5, min_history=5)
    dyn = DynamicThreshold(settings, static=1.0, capacity=1)
    for v in range(23):
        dyn.push([0], np.array([float(v)]))
    np.testing.assert_array_equal(dyn.window_of(0), np.arange(13.0, 23.0))
    dyn.reset([0])
    assert dyn.window_of(0).size == 0 and dyn.current([0])[0] == 1.0


def test_a_high_window_raises_the_threshold_above_the_static_one():
    settings = DynamicThresholdSettings(window=100, every=10, min_history=20)
    dyn = DynamicThreshold(settings, static=1.0, capacity=1)
    rng = np.random.default_rng(3)
    for _ in range(100):  # a noisier device than calibration saw
        dyn.push([0], np.array([3.0 + rng.standard_normal()]))
    assert dyn.current([0])[0] > 3.0


def test_settings_are_validated():
    with pytest.raises(ValueError, match="min_history"):
        DynamicThresholdSettings(window=10, min_history=20)
    with pytest.raises(ValueError, match="prune"):
        DynamicThresholdSettings(prune=1.5)
    assert "telemanom" in DynamicThresholdSettings().describe()
