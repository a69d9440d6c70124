"""The dynamic threshold: telemanom's nonparametric thresholding, made to stream.

Hundman et al., "Detecting Spacecraft Anomalies Using LSTMs and Nonparametric
Dynamic Thresholding" (KDD 2018), set the threshold on a window of smoothed
forecast errors ``e`` without assuming their distribution: among
``ε = μ(e) + z·σ(e)`` for z from 2.5 to 12, keep the one that maximises

    (Δμ/μ + Δσ/σ) / (number of anomalous sequences² + number of anomalous points)

where Δμ and Δσ are how much the mean and spread of ``e`` fall when the
points above ε are removed: the threshold that explains the most of the
error's spread with the fewest, most compact anomalies. Their guard rails are
kept: a candidate with more than 5 sequences or flagging half the window or
more is not taken, and with no candidate ε is μ + 12σ. Then *pruning*: the
peaks of the sequences above ε, sorted, followed by the highest error below
ε; walking down, a sequence whose peak is within ``p`` = 13% of the next one
is not an anomaly unless a larger gap comes after it (only the tail of peaks
without a clear step down is pruned).

Streaming (:class:`DynamicThreshold`): each device keeps its last ``window``
scores in a ring buffer, and every ``every`` readings the threshold is
recomputed from it, so a reading costs O(window · candidates / every),
constant. Pruning becomes part of the threshold: a new reading must also
clear the highest peak that was *not* an anomaly by the margin p, i.e.
exceed ``M / (1 - p)``, which is exactly the condition under which pruning
would keep a sequence peaking there. Two simplifications against the batch
method: no error buffer around anomalous points, and every run of points
above ε counts as a sequence (telemanom's code skips single points). The
threshold never falls below ``floor`` × the calibrated static one, so a quiet
window cannot make the detector hair-triggered. The engine pushes only the
scores it did not flag, as River's detectors do not learn from what they flag:
a fault that lasts longer than the window would otherwise become its normal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from faultwatch.runtime.engine.devices import SlotArrays


@dataclass(frozen=True)
class DynamicThresholdSettings:
    """Per deployment (engine settings / daemon config), not per model."""

    window: int = 2000  # trailing scores per device that the threshold is computed from
    every: int = 100  # readings between recomputations (staggered across devices)
    min_history: int = 200  # scores needed before the dynamic threshold replaces the static one
    z_min: float = 2.5
    z_max: float = 12.0
    z_step: float = 0.5
    prune: float = 0.13  # p: minimum relative step between an anomaly's peak and the next
    max_sequences: int = 5
    max_fraction: float = 0.5  # a candidate may flag less than this fraction of the window
    floor: float = 1.0  # never below floor × the static threshold

    def __post_init__(self) -> None:
        if not 2 <= self.min_history <= self.window:
            raise ValueError("dynamic threshold: need 2 <= min_history <= window")
        if self.every < 1:
            raise ValueError("dynamic threshold: need every >= 1")
        if not 0 < self.z_min <= self.z_max or self.z_step <= 0:
            raise ValueError("dynamic threshold: need 0 < z_min <= z_max and z_step > 0")
        if not 0 <= self.prune < 1 or not 0 < self.max_fraction <= 1 or self.floor < 0:
            raise ValueError("dynamic threshold: need 0 <= prune < 1, 0 < max_fraction <= 1, floor >= 0")

    @property
    def z_values(self) -> np.ndarray:
        return np.arange(self.z_min, self.z_max + 1e-9, self.z_step)

    def describe(self) -> str:
        return (f"dynamic (telemanom): over the last {self.window} scores, recomputed every "
                f"{self.every} readings; z {self.z_min:g}..{self.z_max:g} step {self.z_step:g}, "
                f"pruning p {self.prune:g}; never below {self.floor:g} × the static threshold")

    def to_dict(self) -> dict:
        return asdict(self)


def _runs(above: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of the runs of True in a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], above.astype(np.int8), [0]]))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def find_epsilon(errors: np.ndarray, z_values: np.ndarray, max_sequences: int = 5,
                 max_fraction: float = 0.5) -> tuple[float, float]:
    """telemanom's ε for the error window ``errors`` [N] → (ε, z).

    >>> e = np.r_[np.tile([1.0, 1.2, 0.8], 100), [5.0, 6.0, 5.0], np.tile([1.0, 1.2, 0.8], 100)]
    >>> eps, z = find_epsilon(e, np.arange(2.5, 12.01, 0.5))
    >>> bool(1.2 < eps < 5.0), float(z)
    (True, 11.0)
    """
    e = np.asarray(errors, dtype=np.float64)
    z_values = np.asarray(z_values, dtype=np.float64)
    mean, sd = float(e.mean()), float(e.std())
    z_default = float(z_values.max())
    if sd <= 0 or mean <= 0:
        return mean + z_default * sd, z_default
    eps = mean + z_values * sd  # [Z]
    above = e[None, :] > eps[:, None]  # [Z, N]
    n_above = above.sum(axis=1)
    starts = above[:, 0].astype(np.int64) + (above[:, 1:] & ~above[:, :-1]).sum(axis=1)
    below = ~above
    n_below = np.maximum(below.sum(axis=1), 1)
    mean_below = (e * below).sum(axis=1) / n_below
    var_below = ((e[None, :] - mean_below[:, None]) ** 2 * below).sum(axis=1) / n_below
    score = ((mean - mean_below) / mean + (sd - np.sqrt(var_below)) / sd) / np.maximum(
        starts**2 + n_above, 1)
    ok = (n_above > 0) & (starts <= max_sequences) & (n_above < max_fraction * len(e))
    best_z, best = z_default, 0.0
    for i in np.flatnonzero(ok):  # ascending z; ties go to the higher z, like telemanom's >=
        if score[i] >= best:
            best, best_z = float(score[i]), float(z_values[i])
    return mean + best_z * sd, best_z


def pruned_threshold(errors: np.ndarray, epsilon: float, p: float) -> float:
    """The threshold a new error must exceed to be an anomaly after pruning.

    The sequence peaks above ``epsilon``, largest first, then the largest error below it;
    the tail of peaks that each are within ``p`` of the next is pruned. Returns
    max(ε, M / (1 - p)), M the largest peak not kept (or the largest error below ε).

    >>> e = np.r_[np.ones(50), [3.0], np.ones(50), [2.8], np.ones(50), [9.0], np.ones(50), [2.6]]
    >>> # 3.0, 2.8 and the highest normal error 2.6 step down by less than 13%: 3.0 and 2.8 are
    >>> # pruned, 9.0 stays an anomaly; a new score must clear 3.0 by 13%.
    >>> round(pruned_threshold(e, 2.7, 0.13), 3)
    3.448
    """
    e = np.asarray(errors, dtype=np.float64)
    above = e > epsilon
    starts, ends = _runs(above)
    peaks = sorted((float(e[s:t].max()) for s, t in zip(starts, ends, strict=True)), reverse=True)
    rest = float(e[~above].max()) if (~above).any() else 0.0
    chain = [*peaks, rest]
    first_pruned = len(peaks)  # index into chain of the first peak that is not an anomaly
    for i in range(len(peaks)):
        if chain[i] > 0 and (chain[i] - chain[i + 1]) / chain[i] < p:
            first_pruned = min(first_pruned, i)
        else:
            first_pruned = len(peaks)
    highest_normal = chain[first_pruned]
    return max(float(epsilon), highest_normal / (1.0 - p))


def dynamic_threshold(errors: np.ndarray, settings: DynamicThresholdSettings) -> float:
    """ε with pruning folded in, for one window of scores."""
    eps, _ = find_epsilon(errors, settings.z_values, settings.max_sequences, settings.max_fraction)
    return pruned_threshold(errors, eps, settings.prune)


class DynamicThreshold:
    """Per-device streaming telemanom threshold (see the module docstring).

    ``current(slots)`` is the threshold to compare this reading's score with;
    ``push(slots, scores)`` then adds the scores to each device's window and
    recomputes where due. Before ``min_history`` scores, and after a reset, the
    threshold is ``floor_value`` (the static threshold × floor).
    """

    FIELDS = ("threshold_window", "threshold_count", "threshold_value")  # its per-device arrays

    def __init__(self, settings: DynamicThresholdSettings, static: float, capacity: int = 0,
                 per_device: SlotArrays | None = None):
        self.settings = settings
        self.static = float(static)
        self.floor_value = settings.floor * self.static
        self.start = max(self.static, self.floor_value)  # until min_history scores are in
        self.per_device = SlotArrays(capacity) if per_device is None else per_device
        # [cap, window] ring of the last scores; [cap] scores pushed since the last reset; [cap] value.
        self.per_device.declare("threshold_window", (settings.window,), np.float32)
        self.per_device.declare("threshold_count", dtype=np.int64, on_reset=0)
        self.per_device.declare("threshold_value", initial=self.start, on_reset=self.start)
        self.recomputed = 0

    @property
    def buffer(self) -> np.ndarray:
        return self.per_device["threshold_window"]

    @property
    def count(self) -> np.ndarray:
        return self.per_device["threshold_count"]

    @property
    def value(self) -> np.ndarray:
        return self.per_device["threshold_value"]

    def grow(self, capacity: int) -> None:
        self.per_device.grow(capacity)

    def reset(self, slots) -> None:
        self.per_device.reset(slots, self.FIELDS)

    def current(self, slots) -> np.ndarray:
        return self.value[np.asarray(slots)]

    def window_of(self, slot: int) -> np.ndarray:
        """The slot's scores, oldest first."""
        n, w = int(self.count[slot]), self.settings.window
        if n < w:
            return self.buffer[slot, :n]
        return np.roll(self.buffer[slot], -(n % w))

    def push(self, slots, scores: np.ndarray) -> None:
        slots = np.asarray(slots)
        s = self.settings
        self.buffer[slots, self.count[slots] % s.window] = scores
        self.count[slots] += 1
        # Staggered by slot, so devices streaming in lockstep do not all recompute at once.
        n = self.count[slots]
        due = slots[(n >= s.min_history) & ((n + slots) % s.every == 0)]
        for slot in due:
            value = dynamic_threshold(self.window_of(int(slot)), s)
            self.value[slot] = max(value, self.floor_value)
            self.recomputed += 1
