"""NAB scoring against hand-computed cases (NAB's published rules, see faultwatch.bench.nab).

σ(x) = 2 / (1 + e^{5x}) - 1 and σ(-1) = 0.986614298 are worked out in the comments;
a window (40, 49) is 10 rows wide.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from faultwatch.bench import nab

SIGMA_M1 = 2 / (1 + math.exp(-5)) - 1  # 0.986614298...
WINDOW = [(40, 49)]


def hits(n: int, *rows: int) -> np.ndarray:
    d = np.zeros(n, bool)
    d[list(rows)] = True
    return d


def test_scaled_sigmoid_at_its_landmarks():
    assert nab.scaled_sigmoid(-1.0) == pytest.approx(0.986614298)
    assert nab.scaled_sigmoid(0.0) == 0.0
    assert nab.scaled_sigmoid(-0.5) == pytest.approx(0.848283640)  # 2/(1 + e^-2.5) - 1
    assert nab.scaled_sigmoid(3.0) == -1.0 and nab.scaled_sigmoid(7.0) == -1.0


def test_detection_at_the_window_start_is_perfect():
    r = nab.score_series(hits(100, 40), WINDOW, probation=0)
    assert r.raw == pytest.approx(1.0)
    assert (r.null, r.perfect, r.windows, r.detected, r.false_positives) == (-1.0, 1.0, 1, 1, 0)
    assert r.normalized == pytest.approx(100.0)


def test_no_detection_is_the_null_score():
    r = nab.score_series(np.zeros(100, bool), WINDOW, probation=0)
    assert r.raw == -1.0 and r.normalized == 0.0 and r.detected == 0


def test_detection_at_the_window_end_scores_little():
    # x = -(49 - 49 + 1) / 10 = -0.1; σ(-0.1) = 2/(1 + e^-0.5) - 1 = 0.244918662; / σ(-1) = 0.248241
    r = nab.score_series(hits(100, 49), WINDOW, probation=0)
    assert r.raw == pytest.approx(0.244918662 / SIGMA_M1)
    assert r.raw == pytest.approx(0.248241, abs=1e-6)
    assert r.normalized == pytest.approx(100 * (0.248241 + 1) / 2, abs=1e-3)  # 62.41


def test_only_the_earliest_detection_in_a_window_counts():
    # At 42: x = -(49 - 42 + 1) / 10 = -0.8; σ(-0.8) = 2/(1 + e^-4) - 1 = 0.964027580 → 0.977107
    r = nab.score_series(hits(100, 42, 45, 49), WINDOW, probation=0)
    assert r.raw == pytest.approx(0.964027580 / SIGMA_M1)
    assert r.false_positives == 0


def test_false_positive_before_any_window_costs_the_full_fp_weight():
    r = nab.score_series(hits(100, 10), WINDOW, probation=0)
    assert r.raw == pytest.approx(-1.0 - 0.11)  # missed window + FP
    assert r.false_positives == 1
    assert r.normalized == pytest.approx(-5.5)
    low_fp = nab.score_series(hits(100, 10), WINDOW, "reward_low_FP", probation=0)
    assert low_fp.raw == pytest.approx(-1.0 - 0.22)


def test_false_positive_just_after_a_window_is_cheap_and_far_after_is_not():
    # Row 50: x = |49 - 50| / (10 - 1) = 1/9; σ(1/9) = 2/(1 + e^{5/9}) - 1 = -0.270848 → × 0.11
    near = nab.score_series(hits(100, 40, 50), WINDOW, probation=0)
    assert near.raw == pytest.approx(1.0 - 0.11 * 0.2708476, abs=1e-6)
    # Row 76: x = 27/9 = 3 → -1 → -0.11
    far = nab.score_series(hits(100, 40, 76), WINDOW, probation=0)
    assert far.raw == pytest.approx(1.0 - 0.11)
    assert near.false_positives == far.false_positives == 1


def test_reward_low_fn_doubles_the_cost_of_a_miss():
    missed = nab.score_series(np.zeros(100, bool), WINDOW, "reward_low_FN", probation=0)
    assert (missed.raw, missed.null, missed.perfect) == (-2.0, -2.0, 1.0)
    late = nab.score_series(hits(100, 49), WINDOW, "reward_low_FN", probation=0)
    assert late.normalized == pytest.approx(100 * (0.248241 + 2) / 3, abs=1e-3)  # 74.94


def test_probationary_period():
    assert nab.probationary_length(1000) == 150
    assert nab.probationary_length(22695) == 750  # capped at 0.15 × 5000
    # A detection in the probationary period counts for nothing; a window entirely in it is not scored.
    r = nab.score_series(hits(1000, 100, 130), [(120, 140)])
    assert (r.raw, r.windows, r.false_positives, r.normalized) == (0.0, 0, 0, 0.0)
    # A window straddling its end is scored from its first scorable row (150):
    # x = -(159 - 150 + 1) / 20 = -0.5 → σ(-0.5) / σ(-1) = 0.848283640 / 0.986614298 = 0.859793
    straddle = nab.score_series(hits(1000, 150), [(140, 159)])
    assert straddle.perfect == pytest.approx(0.859793, abs=1e-6)
    assert straddle.raw == pytest.approx(straddle.perfect)
    assert straddle.normalized == pytest.approx(100.0)


def test_corpus_scores_add_before_normalising():
    a = nab.score_series(hits(100, 40), WINDOW, probation=0)  # raw 1, perfect 1, null -1
    b = nab.score_series(np.zeros(100, bool), WINDOW, probation=0)  # raw -1
    total = a + b
    assert (total.raw, total.null, total.perfect, total.windows, total.detected) == (0.0, -2.0, 2.0, 2, 1)
    assert total.normalized == pytest.approx(50.0)  # not the mean of 100 and 0 by accident: 100·2/4


def test_windows_from_times_are_inclusive_and_merged():
    ts = np.arange(100.0)
    got = nab.windows_from_times(ts, [(15.0, 30.0), (10.5, 20.0), (200.0, 300.0)])
    assert got == [(11, 30)]  # overlapping windows merged; one with no row dropped
    assert nab.windows_from_times(ts, [(5.0, 5.0)]) == [(5, 5)]


def test_all_profiles_at_once():
    scores = nab.score_all_profiles(hits(100, 10, 40), WINDOW, probation=0)
    assert set(scores) == {"standard", "reward_low_FP", "reward_low_FN"}
    assert scores["standard"].raw == pytest.approx(1 - 0.11)
    assert scores["reward_low_FP"].raw == pytest.approx(1 - 0.22)
    assert scores["reward_low_FN"].raw == pytest.approx(1 - 0.11)
