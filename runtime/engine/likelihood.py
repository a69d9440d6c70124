"""A per-device threshold from the long-run distribution of the device's own score.

Numenta's anomaly likelihood turned HTM's raw score into a detector by asking
how unlikely the score is under a long window of its own past values. Here
each device keeps an exponentially weighted mean and variance of its score
(in units of the calibrated static threshold, ``x = score / static``), started
from the calibration rows' ``x`` (stored in the model) and updated from every
ready reading with weight ``1 / window``. A reading is anomalous when ``x``
exceeds ``mean + z·sd``, ``z`` the standard normal quantile of ``1 - tail``,
and never below ``floor`` (a fraction of the static threshold).

Why it holds up on data it was not tuned on (measured across SKAB, NAB and
MSL by the research for issue 11): test data drifts off the calibration rows
(the median normal score on SKAB's test rows is twice the training one), so
a fixed threshold either false-alarms on the drift or is set too high for
spikes; the device's own long-run spread absorbs the drift. It learns from
*every* score, flagged or not, as HTM's likelihood does: with a window of
thousands of readings a short fault barely moves it, while a permanent change
of regime is absorbed instead of alarming forever (learning only from
unflagged readings, River's habit, measured far more false alarms on NAB and
MSL).

>>> from faultwatch.runtime.engine.devices import SlotArrays
>>> lik = LikelihoodThreshold(LikelihoodSettings(window=100, tail=1e-3, floor=0.5), static=2.0,
...                           mean0=0.3, var0=0.01, per_device=SlotArrays(1))
>>> lik.per_device.grow(1)
>>> round(float(lik.current([0])[0]), 3)  # 2.0 × (0.3 + 3.09 × 0.1)
1.218
>>> lik.learn([0], np.array([1.6]))  # x = 0.8: the mean moves by 1 % of the way
>>> round(float(lik.per_device["likelihood_mean"][0]), 4)
0.305
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
from faultwatch.runtime.engine.devices import SlotArrays
from faultwatch.runtime.engine.hotpath import operands


@dataclass(frozen=True)
class LikelihoodSettings:
    window: float = 8640.0  # readings: the weight of a new score is 1 / window
    tail: float = 1e-8  # anomalous beyond mean + z·sd, z = Φ⁻¹(1 − tail) = 5.61
    floor: float = 0.4  # never below floor × the static threshold

    def __post_init__(self) -> None:
        if self.window < 1 or not 0 < self.tail < 0.5 or self.floor < 0:
            raise ValueError("likelihood: need window >= 1, 0 < tail < 0.5 and floor >= 0")

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(1.0 - self.tail)

    def describe(self) -> str:
        return (f"likelihood: mean + {self.z:.2f} sd (tail {self.tail:g}) of the device's own score, "
                f"learned over ~{self.window:g} readings; never below {self.floor:g} ×")

    def to_dict(self) -> dict:
        return asdict(self)


class LikelihoodThreshold:
    """Per-device threshold ``static × max(floor, mean + z·sd)`` of the score ratio ``x``.

    ``current(slots)`` is the threshold in score units; ``learn(slots, scores)`` folds the
    scores in. The per-device mean and variance are snapshot state; a reset (a long gap)
    keeps them: the device's score distribution outlives its LSTM state.
    """

    FIELDS = ("likelihood_mean", "likelihood_var")

    def __init__(self, settings: LikelihoodSettings, static: float, mean0: float, var0: float,
                 per_device: SlotArrays):
        self.settings = settings
        self.static = float(static)
        self.z = settings.z
        self.alpha = 1.0 / settings.window
        # The constants of current() and learn() (hotpath.operands).
        self._static, self._z, self._floor, self._alpha, self._beta = operands(
            self.static, self.z, settings.floor, self.alpha, 1.0 - self.alpha)
        self.per_device = per_device
        per_device.declare("likelihood_mean", initial=float(mean0))
        per_device.declare("likelihood_var", initial=max(float(var0), 1e-12))

    def current(self, slots) -> np.ndarray:
        arrays = self.per_device.arrays
        mean, var = arrays["likelihood_mean"][slots], arrays["likelihood_var"][slots]
        return self._static * np.maximum(self._floor, mean + self._z * np.sqrt(var))

    def learn(self, slots, scores: np.ndarray) -> None:
        """Exponentially weighted mean and variance of ``scores / static`` ([B], distinct slots)."""
        arrays = self.per_device.arrays
        mean, var = arrays["likelihood_mean"][slots], arrays["likelihood_var"][slots]
        delta = scores / self._static - mean
        step = self._alpha * delta
        arrays["likelihood_mean"][slots] = mean + step
        arrays["likelihood_var"][slots] = self._beta * (var + step * delta)  # (alpha·delta)·delta
