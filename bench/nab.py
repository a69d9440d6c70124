"""NAB scoring (Numenta Anomaly Benchmark), written from its published rules.

Lavin & Ahmad, "Evaluating Real-time Anomaly Detection Algorithms — the
Numenta Anomaly Benchmark" (2015), and NAB's ``sweeper.py``:

- the first ``min(⌊0.15·N⌋, 750)`` rows of a series are probationary: a
  detection there counts for nothing, and a window lying entirely there is
  not scored;
- a detection inside a labelled window at index ``i`` scores
  ``A_TP · σ(i) / σ(-1)`` with ``σ(x) = 2/(1 + e^{5x}) - 1`` and
  ``x = -(right - i + 1) / width``: 1 at the window's first row, falling to
  about 0 at its last; only the window's best (earliest) detection counts;
- a window without a detection costs ``-A_FN``;
- a detection outside every window costs ``A_FP · σ(x)`` (σ is negative
  there) with ``x = |i - right_prev| / (width_prev - 1)`` measured from the
  end of the previous window, or -A_FP when no window came before it — so a
  late detection just after a window is cheap and one far from any is not;
- per profile, (A_TP, A_FP, A_FN) = standard (1, 0.11, 1), reward_low_FP
  (1, 0.22, 1), reward_low_FN (1, 0.11, 2);
- a corpus's raw score is the sum over its series, normalised so that the
  null detector (no detection) scores 0 and the perfect one (a detection at
  the first scorable row of every window) 100.

One departure, for detectors that decide rather than rank: NAB sweeps a
threshold over anomaly scores and keeps the best one per profile; faultwatch
raises faults, so the detections are given as booleans and scored as they
are. Windows are given as row indices (inclusive), or from timestamps with
:func:`windows_from_times`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PROFILES: dict[str, tuple[float, float, float]] = {
    # name: (A_TP, A_FP, A_FN)
    "standard": (1.0, 0.11, 1.0),
    "reward_low_FP": (1.0, 0.22, 1.0),
    "reward_low_FN": (1.0, 0.11, 2.0),
}


def scaled_sigmoid(x: float) -> float:
    """NAB's σ: 0.9866 at x = -1 (window start), 0 at x = 0, -1 from x = 3 on."""
    if x >= 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


MAX_TP = scaled_sigmoid(-1.0)


def probationary_length(n: int, percent: float = 0.15) -> int:
    """NAB's probationary period: min(⌊0.15·N⌋, 0.15 · 5000 = 750) rows."""
    return int(min(math.floor(percent * n), percent * 5000))


def windows_from_times(timestamps: np.ndarray,
                       windows: Sequence[tuple[float, float]]) -> list[tuple[int, int]]:
    """Windows given as (start, end) times → (first row, last row) inclusive, overlaps merged.

    A window that holds no row is dropped.
    """
    ts = np.asarray(timestamps, dtype=np.float64)
    out: list[tuple[int, int]] = []
    for start, end in sorted(windows):
        lo = int(np.searchsorted(ts, start, side="left"))
        hi = int(np.searchsorted(ts, end, side="right")) - 1
        if hi < lo:
            continue
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


@dataclass(frozen=True)
class NabResult:
    """One series (or a corpus, when added up) under one profile."""

    raw: float
    null: float  # the null detector's raw score
    perfect: float  # the perfect detector's raw score
    windows: int  # windows scored
    detected: int  # windows with a detection in them
    false_positives: int  # detections outside every window (after the probationary period)

    def __add__(self, other: NabResult) -> NabResult:
        return NabResult(self.raw + other.raw, self.null + other.null, self.perfect + other.perfect,
                         self.windows + other.windows, self.detected + other.detected,
                         self.false_positives + other.false_positives)

    @property
    def normalized(self) -> float:
        """100 · (raw - null) / (perfect - null); 0 when there is nothing to score."""
        span = self.perfect - self.null
        return 100.0 * (self.raw - self.null) / span if span > 0 else 0.0


def sweep_scores(n: int, windows: Sequence[tuple[int, int]], profile: str,
                 probation: int) -> tuple[np.ndarray, np.ndarray]:
    """What a detection at each row would score → (score [N], window id [N]).

    Window id -1 = outside every window, -2 = probationary (never scored).
    """
    a_tp, a_fp, _ = PROFILES[profile]
    scores = np.zeros(n)
    window_id = np.full(n, -1, dtype=np.int64)
    prev_right, prev_width = None, None
    bounds = sorted(windows)
    w = 0
    i = 0
    while i < n:
        while w < len(bounds) and bounds[w][0] < i:  # overlapping a window already scored: skip it
            w += 1
        if w < len(bounds) and i == bounds[w][0]:
            left, right = bounds[w]
            width = right - left + 1
            for j in range(left, min(right, n - 1) + 1):
                scores[j] = scaled_sigmoid(-(right - j + 1) / width) * a_tp / MAX_TP
                window_id[j] = w
            prev_right, prev_width = right, width
            i = right + 1
            w += 1
            continue
        # Distance past the previous window, in its widths; "far" (3) when none came before.
        position = (3.0 if prev_right is None or prev_width is None
                    else abs(prev_right - i) / max(prev_width - 1, 1))
        scores[i] = scaled_sigmoid(position) * a_fp
        i += 1
    window_id[: min(probation, n)] = -2
    return scores, window_id


def score_series(detections: np.ndarray, windows: Sequence[tuple[int, int]], profile: str = "standard",
                 probation: int | None = None) -> NabResult:
    """NAB score of one series: ``detections`` [N] bool, ``windows`` (first, last) row indices.

    ``probation`` defaults to NAB's :func:`probationary_length` of N; pass 0 for none.

    >>> hit_at_start = np.zeros(100, bool); hit_at_start[40] = True
    >>> r = score_series(hit_at_start, [(40, 49)], probation=0)
    >>> round(r.raw, 4), r.null, r.perfect, round(r.normalized, 1)
    (1.0, -1.0, 1.0, 100.0)
    """
    det = np.asarray(detections, dtype=bool)
    n = len(det)
    probation = probationary_length(n) if probation is None else probation
    _, _, a_fn = PROFILES[profile]
    scores, window_id = sweep_scores(n, windows, profile, probation)
    scored_windows = sorted({int(w) for w in window_id if w >= 0})
    raw, perfect, detected = 0.0, 0.0, 0
    for w in scored_windows:
        rows = window_id == w
        hits = rows & det
        perfect += float(scores[rows].max())
        if hits.any():
            raw += float(scores[hits].max())
            detected += 1
        else:
            raw -= a_fn
    outside = det & (window_id == -1)
    raw += float(scores[outside].sum())
    null = -a_fn * len(scored_windows)
    return NabResult(raw, null, perfect, len(scored_windows), detected, int(outside.sum()))


def score_all_profiles(detections: np.ndarray, windows: Sequence[tuple[int, int]],
                       probation: int | None = None) -> dict[str, NabResult]:
    return {p: score_series(detections, windows, p, probation) for p in PROFILES}
