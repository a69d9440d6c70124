"""Event-wise scoring, telemanom's rules, on hand-made sequences."""

import numpy as np
from faultwatch.bench.events import event_counts, event_metrics, runs


def _mask(n: int, *spans: tuple[int, int]) -> np.ndarray:
    m = np.zeros(n, bool)
    for a, b in spans:
        m[a:b + 1] = True
    return m


def test_runs_are_inclusive_ranges():
    assert runs(_mask(10, (0, 1), (4, 4), (8, 9))) == [(0, 1), (4, 4), (8, 9)]
    assert runs(np.zeros(5, bool)) == []


def test_a_labelled_sequence_counts_once_however_many_predictions_overlap_it():
    label = _mask(100, (10, 40))
    pred = _mask(100, (12, 14), (20, 22), (39, 45))
    assert event_counts(pred, label) == {"tp": 1, "fp": 0, "fn": 0}


def test_predictions_outside_every_label_are_each_a_false_positive():
    label = _mask(100, (10, 20), (60, 70))
    pred = _mask(100, (0, 3), (30, 31), (50, 59), (65, 65))
    # (50, 59) ends just before the second label: no overlap, a false positive.
    assert event_counts(pred, label) == {"tp": 1, "fp": 3, "fn": 1}


def test_windows_replace_the_label_runs():
    pred = _mask(50, (5, 6))
    assert event_counts(pred, np.zeros(50, bool), windows=[(0, 10), (20, 30)]) == {"tp": 1, "fp": 0, "fn": 1}


def test_metrics():
    m = event_metrics(tp=3, fp=1, fn=3)
    assert (m["precision"], m["recall"]) == (0.75, 0.5)
    assert abs(m["f1"] - 0.6) < 1e-12
    assert event_metrics(0, 0, 0)["f1"] == 1.0
