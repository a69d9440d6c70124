"""Scoring and deciding, kept apart: a scorer turns forecast errors into a number,
a detector turns numbers into faults raised and cleared.

Both are streaming objects for many devices at once. Each device owns a row
(a *slot*) of the state arrays; every call passes the slots it updates, one
reading per slot. A high score always means anomalous.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Scorer:
    """Anomaly score of each reading from its one-step forecast error.

    Per target channel ``k``: ``z_k = (reading_k - forecast_k) / residual_std_k``
    (scaled units; the spread measured on normal data at calibration). The raw
    score is the RMS of ``z`` over the channels that were really measured
    (NaN residuals, i.e. imputed channels, are left out); the score that is
    compared with the threshold is its EWMA with the given ``span``. For
    ``warmup`` readings after a reset, :meth:`update` reports the device as
    warming up: the caller must not raise faults from those scores.

    >>> scorer = Scorer(residual_std=[0.1, 0.2], span=1, warmup=1, capacity=2)
    >>> residuals = np.array([[0.1, 0.2], [0.0, 0.0]])
    >>> smoothed, z, ready = scorer.update([0, 1], residuals)
    >>> smoothed.round(3).tolist(), ready.tolist()
    ([1.0, 0.0], [False, False])
    >>> smoothed, z, ready = scorer.update([0, 1], np.array([[0.3, np.nan], [0.0, 0.4]]))
    >>> smoothed.round(3).tolist(), ready.tolist()
    ([3.0, 1.414], [True, True])
    """

    def __init__(self, residual_std: Sequence[float], span: int, warmup: int, capacity: int):
        self.residual_std = np.maximum(np.asarray(residual_std, dtype=np.float64), 1e-6)
        self.span = int(span)
        self.warmup = int(warmup)
        self.alpha = 2.0 / (self.span + 1.0)
        self.smoothed = np.zeros(capacity)
        self.seen = np.zeros(capacity, dtype=np.int64)  # scored readings since the last reset

    def grow(self, capacity: int) -> None:
        extra = capacity - len(self.smoothed)
        self.smoothed = np.concatenate([self.smoothed, np.zeros(extra)])
        self.seen = np.concatenate([self.seen, np.zeros(extra, dtype=np.int64)])

    def reset(self, slots) -> None:
        self.smoothed[slots] = 0.0
        self.seen[slots] = 0

    def update(self, slots, residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """residuals [B, K] (NaN = not measured) → smoothed score [B], z [B, K], ready [B]."""
        slots = np.asarray(slots)
        z = residuals / self.residual_std  # [B, K]
        measured = ~np.isnan(z)
        count = measured.sum(axis=1)
        raw = np.sqrt(np.where(measured, z * z, 0.0).sum(axis=1) / np.maximum(count, 1))  # [B]
        first = self.seen[slots] == 0
        prev = self.smoothed[slots]
        smoothed = np.where(first, raw, self.alpha * raw + (1.0 - self.alpha) * prev)
        # A reading with nothing measured leaves the score where it was.
        smoothed = np.where(count > 0, smoothed, prev)
        self.smoothed[slots] = smoothed
        self.seen[slots] += count > 0
        return smoothed, z, self.seen[slots] > self.warmup


class FaultDetector:
    """Hysteresis on anomalous flags: ``raise_k`` of the last ``window_n`` readings
    anomalous raises a fault; ``clear_m`` normal readings in a row clear it.
    One raise and one clear per episode, never a storm.

    >>> det = FaultDetector(raise_k=2, window_n=3, clear_m=2, capacity=1)
    >>> [int(det.update([0], np.array([flag]))[0]) for flag in (1, 0, 1, 1, 0, 0, 1, 0, 0)]
    [0, 0, 1, 0, 0, -1, 0, 0, 0]
    """

    def __init__(self, raise_k: int, window_n: int, clear_m: int, capacity: int):
        if not 1 <= raise_k <= window_n <= 62:
            raise ValueError("need 1 <= raise_k <= window_n <= 62")
        self.raise_k, self.window_n, self.clear_m = raise_k, window_n, clear_m
        self.mask = (1 << window_n) - 1
        self.history = np.zeros(capacity, dtype=np.int64)  # bit i = flag of the i-th last reading
        self.normal_run = np.zeros(capacity, dtype=np.int64)
        self.active = np.zeros(capacity, dtype=bool)

    def grow(self, capacity: int) -> None:
        extra = capacity - len(self.active)
        self.history = np.concatenate([self.history, np.zeros(extra, dtype=np.int64)])
        self.normal_run = np.concatenate([self.normal_run, np.zeros(extra, dtype=np.int64)])
        self.active = np.concatenate([self.active, np.zeros(extra, dtype=bool)])

    def reset(self, slots) -> None:
        """Forget the recent flags; an active fault stays active until cleared."""
        self.history[slots] = 0

    def update(self, slots, anomalous: np.ndarray) -> np.ndarray:
        """anomalous [B] bool → change [B] int8: +1 fault raised, -1 cleared, 0 none."""
        slots = np.asarray(slots)
        flags = np.asarray(anomalous, dtype=bool)
        history = ((self.history[slots] << 1) | flags) & self.mask
        self.history[slots] = history
        normal_run = np.where(flags, 0, self.normal_run[slots] + 1)
        self.normal_run[slots] = normal_run
        active = self.active[slots]
        raised = ~active & (np.bitwise_count(history) >= self.raise_k)
        cleared = active & (normal_run >= self.clear_m)
        self.active[slots] = (active | raised) & ~cleared
        return raised.astype(np.int8) - cleared.astype(np.int8)


def smoothed_scores(residuals: np.ndarray, residual_std: Sequence[float], span: int) -> np.ndarray:
    """The smoothed score of one device's residual sequence [N, K] → [N] (for calibration)."""
    scorer = Scorer(residual_std, span=span, warmup=0, capacity=1)
    return np.array([scorer.update([0], r[None])[0][0] for r in residuals])
