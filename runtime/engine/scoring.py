"""Scoring and deciding, kept apart: a scorer turns forecast errors into a number,
a detector turns numbers into faults raised and cleared.

Both are streaming objects for many devices at once. Each device owns a row
(a *slot*) of the state arrays; every call passes the slots it updates, one
reading per slot. A high score always means anomalous.

Why the score smooths each channel before combining them (a multivariate EWMA
control chart, MEWMA, rather than an EWMA of a combined error): a fault that
shifts a channel by a fraction of its noise (a valve half closed lowers the
flow by one noise width) leaves the RMS of the per-reading errors almost
unchanged, since squaring drowns a small bias in the noise. Averaging each
channel's *signed* error first lets the noise cancel and the bias add up: over
a span of 20 readings a one-sigma bias stands about five noise widths out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from faultwatch.runtime.engine.devices import SlotArrays
from faultwatch.runtime.engine.hotpath import all_set, operands, rows_of

_FLOAT_MAX = np.finfo(np.float64).max


def ewma_variance(span: int) -> float:
    """Variance of the EWMA (of the given span) of unit white noise, in steady state."""
    alpha = 2.0 / (span + 1.0)
    return alpha / (2.0 - alpha)


class Scorer:
    """Anomaly score of each reading from its one-step forecast errors.

    Per target channel ``k``: ``z_k = (reading_k - forecast_k) / residual_std_k``
    in scaled units, ``residual_std_k`` being the channel's error spread on
    normal data measured at calibration. Each ``z_k`` is smoothed by an EWMA of
    the given ``span`` (``m_k``, 0 after a reset); the score is the RMS of the
    ``m_k`` of the channels really measured, divided by the noise width of an
    EWMA of unit white noise, so that a normal reading scores about 1 whatever
    the span. A missing (imputed, NaN) channel is neither smoothed nor scored.
    With ``span=1`` the score is the plain RMS of ``z``.

    ``residual_std`` should be the *long-run* spread at the smoothing scale
    (see :func:`faultwatch.runtime.engine.calibration.calibrate`): a channel whose
    errors are autocorrelated then weighs no more than one whose errors are white.

    For ``warmup`` scored readings after a reset, :meth:`update` reports the
    device as not ready: the caller must not raise faults from those scores.

    >>> scorer = Scorer(residual_std=[0.1, 0.2], span=1, warmup=1, capacity=2)
    >>> score, contrib, ready = scorer.update([0, 1], np.array([[0.1, 0.2], [0.0, 0.0]]))
    >>> score.round(3).tolist(), ready.tolist()
    ([1.0, 0.0], [False, False])
    >>> score, contrib, ready = scorer.update([0, 1], np.array([[0.3, np.nan], [0.0, 0.4]]))
    >>> score.round(3).tolist(), ready.tolist()
    ([3.0, 1.414], [True, True])

    A small steady bias stands out once smoothed:

    >>> scorer = Scorer(residual_std=[1.0], span=19, warmup=0, capacity=1)
    >>> for _ in range(60):
    ...     score, _, _ = scorer.update([0], np.array([[1.0]]))
    >>> round(float(score[0]), 1)
    4.4
    """

    FIELDS = ("score_smoothed", "score", "score_seen")  # its per-device arrays (snapshot names)

    def __init__(self, residual_std: Sequence[float], span: int, warmup: int, capacity: int = 0,
                 per_device: SlotArrays | None = None):
        """``per_device``: the engine's arrays to declare its own in (default: its own, of ``capacity``)."""
        if span < 1:
            raise ValueError(f"score span must be >= 1, got {span}")
        self.residual_std = np.maximum(np.asarray(residual_std, dtype=np.float64), 1e-6)
        self.span = int(span)
        self.warmup = int(warmup)
        self.alpha = 2.0 / (self.span + 1.0)
        self.noise = np.sqrt(ewma_variance(self.span))
        k = len(self.residual_std)
        # The constants of update() (hotpath.operands), float64 and int64 as before.
        self._alpha, self._beta, self._noise, self._channels = operands(
            self.alpha, 1.0 - self.alpha, self.noise, k)
        self._one, self._warmup = operands(1, self.warmup, dtype=np.int64)
        self.per_device = SlotArrays(capacity) if per_device is None else per_device
        # m [cap, K]: per-channel EWMA of z; the last score [cap], kept when a reading measures
        # nothing; scored readings since the last reset [cap].
        self.per_device.declare("score_smoothed", (k,), on_reset=0.0)
        self.per_device.declare("score", on_reset=0.0)
        self.per_device.declare("score_seen", dtype=np.int64, on_reset=0)

    @property
    def smoothed(self) -> np.ndarray:
        return self.per_device["score_smoothed"]

    @property
    def score(self) -> np.ndarray:
        return self.per_device["score"]

    @property
    def seen(self) -> np.ndarray:
        return self.per_device["score_seen"]

    def grow(self, capacity: int) -> None:
        self.per_device.grow(capacity)

    def reset(self, slots) -> None:
        self.per_device.reset(slots, self.FIELDS)

    def update(self, slots, residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """residuals [B, K] (NaN = not measured) → score [B], contributions [B, K], ready [B].

        ``slots`` [B] are distinct: one reading per device and call.

        ``contributions[b, k]`` is channel k's part of score² (NaN when not measured);
        they sum to score² over the measured channels.
        """
        slots = np.asarray(slots)
        arrays = self.per_device.arrays
        z = residuals / self.residual_std  # [B, K]
        m = arrays["score_smoothed"].take(slots, axis=0)  # (take: a third of m[slots] on a few rows)
        finite = np.isfinite(z)
        if all_set(finite):
            # Every channel measured, and finite (the usual reading): the arithmetic below without
            # its masks, same numbers, half the numpy calls (what a reading costs at small batches).
            smoothed = self._alpha * z + self._beta * m
            arrays["score_smoothed"][rows_of(slots)] = smoothed
            contrib = (smoothed / self._noise) ** 2 / self._channels
            score = np.sqrt(np.add.reduce(contrib, axis=1))  # = contrib.sum(axis=1), one call less
            arrays["score"][slots] = score
            seen = arrays["score_seen"][slots] + self._one  # slots are distinct within a call
            arrays["score_seen"][slots] = seen
            return score, contrib, seen > self._warmup
        measured = ~np.isnan(z)
        # z.clip: nan_to_num's ±inf → ±max without its per-call cost (NaN stays, and is not taken).
        m = np.where(measured, self.alpha * z.clip(-_FLOAT_MAX, _FLOAT_MAX) + (1.0 - self.alpha) * m, m)
        arrays["score_smoothed"][slots] = m
        count = measured.sum(axis=1)  # [B]
        contrib = np.where(measured, (m / self.noise) ** 2, np.nan) / np.maximum(count, 1)[:, None]
        # The sum over the measured channels (contrib is NaN exactly where not measured: nansum).
        score = np.sqrt(np.where(measured, contrib, 0.0).sum(axis=1))
        # A reading with nothing measured leaves the score where it was.
        scored = count > 0
        score = np.where(scored, score, arrays["score"][slots])
        arrays["score"][slots] = score
        seen = arrays["score_seen"][slots] + scored
        arrays["score_seen"][slots] = seen
        return score, contrib, seen > self.warmup


class FaultDetector:
    """Turns per-reading verdicts into fault episodes: one raise and one clear each.

    A fault is raised when ``raise_k`` of the last ``window_n`` readings are
    *anomalous* (score above the threshold). It is cleared only after
    ``clear_m`` *calm* readings in a row, calm meaning the score fell below a
    lower level (``clear_ratio`` × threshold, chosen by the caller). This is a
    Schmitt trigger: a score hovering around the threshold, as a real fault's
    score does when it drifts, neither clears the fault nor raises it again, so
    an episode never turns into an alert storm. Readings between the two
    levels hold the current state.

    ``update(slots, anomalous, calm)`` returns +1 where a fault is raised, -1
    where one is cleared, 0 elsewhere:

    >>> det = FaultDetector(raise_k=2, window_n=3, clear_m=2, capacity=1)
    >>> flags = [(1, 0), (0, 0), (1, 0), (1, 0), (0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (0, 1)]
    >>> [int(det.update([0], np.array([a]), np.array([c]))[0]) for a, c in flags]
    [0, 0, 1, 0, 0, 0, 0, -1, 0, 0]
    """

    FIELDS = ("fault_history", "fault_normal_run", "fault_active")  # its per-device arrays

    def __init__(self, raise_k: int, window_n: int, clear_m: int, capacity: int = 0,
                 per_device: SlotArrays | None = None, cooldown: int = 0, severe: float = 0.0,
                 record: float = 0.0):
        """``cooldown``: readings after a clear in which no new fault is raised (their anomalous
        verdicts do not count either), so one disturbance that dips below the clear level is
        one episode, not two. ``severe`` and ``record``: see :meth:`severe_flags`."""
        if not 1 <= raise_k <= window_n <= 62:
            raise ValueError("need 1 <= raise_k <= window_n <= 62")
        if clear_m < 1 or cooldown < 0:
            raise ValueError("need clear_m >= 1 and cooldown >= 0")
        if severe < 0 or record < 0:
            raise ValueError("need severe >= 0 and record >= 0")
        self.raise_k, self.window_n, self.clear_m, self.cooldown = raise_k, window_n, clear_m, cooldown
        self.severe, self.record = severe, record
        self._severe, self._record = operands(severe, 1.0 + record)
        self.mask = (1 << window_n) - 1
        # update()'s constants (hotpath.operands).
        self._one, self._mask, self._raise_k, self._clear_m, self._cooldown = operands(
            1, self.mask, raise_k, clear_m, cooldown, dtype=np.int64)
        self.per_device = SlotArrays(capacity) if per_device is None else per_device
        # history: bit i = flag of the i-th last reading; normal_run: calm readings in a row.
        # An episode (active, and the calm run that will clear it) outlives a model of another shape.
        self.per_device.declare("fault_history", dtype=np.int64, on_reset=0)
        self.per_device.declare("fault_normal_run", dtype=np.int64, on_reset=0, across_models=True)
        self.per_device.declare("fault_active", dtype=bool, initial=False, across_models=True)
        # Readings since the last clear (for the cooldown); far in the past for a new device.
        self.per_device.declare("fault_since_clear", dtype=np.int64, initial=1 << 40, across_models=True,
                                added_later=True)
        if severe and record:
            # The device's highest ready score so far [cap] (score units of this model), kept over a
            # reset like the likelihood's statistics: the device's history outlives its LSTM state.
            self.per_device.declare("fault_record", added_later=True)

    @property
    def history(self) -> np.ndarray:
        return self.per_device["fault_history"]

    @property
    def normal_run(self) -> np.ndarray:
        return self.per_device["fault_normal_run"]

    @property
    def active(self) -> np.ndarray:
        return self.per_device["fault_active"]

    def grow(self, capacity: int) -> None:
        self.per_device.grow(capacity)

    def reset(self, slots) -> None:
        """Forget the recent verdicts; an active fault stays active until cleared."""
        self.per_device.reset(slots, self.FIELDS)

    def severe_flags(self, slots, score: np.ndarray, threshold, ready: np.ndarray) -> np.ndarray | None:
        """Which readings may raise a fault on their own ([B] bool, for :meth:`update`), or None
        with ``severe`` off: those scoring above ``severe`` × their ``threshold`` ([B] or one
        value) and, with ``record``, above (1 + ``record``) × the highest ``ready`` score of their
        device before them (``score`` [B] ≥ 0; the record then takes this batch's ready scores).

        Why the record (issue 11): one reading far above the threshold is how most of NAB's
        anomalies show (a spike the 3-of-5 rule never sees), while MSL's channels spike like that
        in normal operation too, over and over. A spike that beats everything the device did
        before is news; one like those it already made is not (telemanom prunes an anomaly whose
        peak is not ``record`` = 13 % above the largest normal error, for the same reason).

        >>> det = FaultDetector(3, 5, 2, capacity=1, severe=2.0, record=0.5)
        >>> def flag(s): return bool(det.severe_flags([0], np.array([s]), 1.0, np.array([True]))[0])
        >>> [flag(s) for s in (1.5, 3.0, 4.0, 7.0)]  # 4.0 is not 50 % above the record 3.0
        [False, True, False, True]
        """
        if not self.severe:
            return None
        severe = score > self._severe * threshold
        if self.record:
            arrays = self.per_device.arrays
            best = arrays["fault_record"][slots]
            severe &= score > self._record * best
            arrays["fault_record"][slots] = np.maximum(best, score * ready)  # not ready: 0, no change
        return severe

    def update(self, slots, anomalous: np.ndarray, calm: np.ndarray | None = None,
               severe: np.ndarray | None = None) -> np.ndarray:
        """anomalous [B], calm [B] bool (default: not anomalous) → change [B] int8.

        ``severe`` [B] bool (optional): readings that raise a fault on their own, without waiting
        for ``raise_k`` of ``window_n`` (only where also anomalous, and not in a cooldown).
        """
        slots = np.asarray(slots)
        arrays = self.per_device.arrays
        flags = np.asarray(anomalous, dtype=bool)
        calm = ~flags if calm is None else np.asarray(calm, dtype=bool) & ~flags
        since_clear = arrays["fault_since_clear"][slots]
        active = arrays["fault_active"][slots]
        if self.cooldown:
            flags = flags & (active | (since_clear > self._cooldown))
        history = ((arrays["fault_history"][slots] << self._one) | flags) & self._mask
        arrays["fault_history"][slots] = history
        normal_run = (arrays["fault_normal_run"][slots] + self._one) * calm  # 0 where not calm
        arrays["fault_normal_run"][slots] = normal_run
        enough = np.bitwise_count(history) >= self._raise_k
        if severe is not None:  # DetectorSettings.severe
            enough = enough | (np.asarray(severe, dtype=bool) & flags)
        raised = enough > active  # > of bools: and not
        cleared = active & (normal_run >= self._clear_m)
        change = raised.view(np.int8) - cleared.view(np.int8)  # a bool is one byte, 0 or 1
        since_clear = since_clear + self._one  # (+= takes the out= path: twice the cost on one row)
        if np.count_nonzero(change):  # rare: a fault raised or cleared
            arrays["fault_active"][slots] = (active | raised) & ~cleared
            since_clear[cleared] = 0
        arrays["fault_since_clear"][slots] = since_clear
        return change


def smoothed_scores(residuals: np.ndarray, residual_std: Sequence[float], span: int) -> np.ndarray:
    """The score of one device's residual sequence [N, K] → [N] (for calibration), from a reset."""
    scorer = Scorer(residual_std, span=span, warmup=0, capacity=1)
    return np.array([scorer.update([0], r[None])[0][0] for r in residuals])
