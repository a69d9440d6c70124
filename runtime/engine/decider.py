"""The deciding side of a batch step: forecast errors in, scores, thresholds and fault changes out.

:class:`Decider` puts together what the model's :class:`DetectorSettings` ask for: the
:class:`~.scoring.Scorer` (and, with ``spike``, the unsmoothed score beside it), the threshold
policy (static, :class:`~.thresholds.DynamicThreshold` or :class:`~.likelihood.LikelihoodThreshold`,
each learning from the scores as its module says) and the raise/clear
:class:`~.scoring.FaultDetector`. Each declares its per-device arrays in the engine's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from faultwatch.runtime.engine.calibration import spike_scores
from faultwatch.runtime.engine.detector import DetectorSettings, DetectorSettingsError
from faultwatch.runtime.engine.devices import SlotArrays
from faultwatch.runtime.engine.hotpath import all_set, operands
from faultwatch.runtime.engine.likelihood import LikelihoodThreshold
from faultwatch.runtime.engine.scoring import FaultDetector, Scorer
from faultwatch.runtime.engine.thresholds import DynamicThreshold


class Decision(NamedTuple):
    """What was decided for a batch of B readings."""

    score: np.ndarray  # [B] the anomaly score (NaN-free; not meaningful where not ready)
    contrib: np.ndarray  # [B, K] each channel's part of score²
    anomalous: np.ndarray  # [B] bool: ready and above its threshold
    change: np.ndarray  # [B] int8: +1 a fault raised at this reading, -1 cleared, 0 neither
    thresholds: list[float]  # [B] the threshold each score was compared with


class Decider:
    """Scores, thresholds and raise/clear for the model's ``decisions``.

    ``threshold`` is the static threshold (calibrated, or the settings' own); ``calibration``
    the model's detector calibration (``None`` for models exported before it existed: the spike
    score and the likelihood need it).
    """

    def __init__(self, d: DetectorSettings, threshold: float, residual_std, calibration,
                 per_device: SlotArrays):
        if calibration is None and (d.spike or d.policy == "likelihood"):
            raise DetectorSettingsError("detector: the spike score and the likelihood threshold need "
                                        "a model exported by this faultwatch (no detector calibration)")
        self.threshold = threshold
        self.scorer = Scorer(residual_std, d.score_span, d.warmup, per_device=per_device)
        self.detector = FaultDetector(d.raise_k, d.window_n, d.clear_m, per_device=per_device,
                                      cooldown=d.cooldown, severe=d.severe, record=d.severe_record)
        self.dynamic = (DynamicThreshold(d.dynamic, threshold, per_device=per_device)
                        if d.policy == "dynamic" else None)
        # The unsmoothed score's spread [K] and its weight in the static threshold's units.
        self.spike_std = np.asarray(calibration.spike_residual_std) if d.spike else None
        self.spike_gain = threshold / calibration.spike_threshold if d.spike else 0.0
        # Constants of the per-step arithmetic (hotpath.operands).
        self._spike_gain, self._clear_ratio = operands(self.spike_gain, d.clear_ratio)
        self.likelihood = (LikelihoodThreshold(d.likelihood, threshold, calibration.ratio_mean,
                                               calibration.ratio_var, per_device)
                           if d.policy == "likelihood" else None)

    def decide(self, slots: np.ndarray, residual: np.ndarray, rewarming: np.ndarray | None) -> Decision:
        """Decide on the readings of ``slots`` [B] from their forecast errors ``residual`` [B, K]
        (scaled units; NaN: not scored). ``rewarming`` [B] (or None: none) marks readings right
        after a bridged gap or a resume: stepped, not scored (``residual`` NaN there)."""
        score, contrib, ready = self.scorer.update(slots, residual)
        if self.spike_std is not None:  # the larger of the two scores, in the EWMA score's units
            score = np.maximum(score, self._spike_gain * spike_scores(residual, self.spike_std))
        if rewarming is not None:
            ready = ready & ~rewarming
        # The threshold each score is compared with: the static one, or each device's own [B].
        threshold: float | np.ndarray
        if self.likelihood is not None:
            threshold = self.likelihood.current(slots)
        elif self.dynamic is not None:
            threshold = self.dynamic.current(slots)
        else:
            threshold = float(self.threshold)
        thresholds = [threshold] * len(slots) if isinstance(threshold, float) else threshold.tolist()
        anomalous = ready & (score > threshold)
        calm = ready & (score < self._clear_ratio * threshold)
        # DetectorSettings.severe: a reading far above its threshold (and, with severe_record, above
        # anything its device scored before) raises on its own.
        severe = self.detector.severe_flags(slots, score, threshold, ready)
        if rewarming is not None:
            # A re-warming reading holds the detector as it is: it neither counts towards a raise
            # nor breaks the calm run that clears a fault (SKAB skips a reading every ~20 rows).
            change = np.zeros(len(slots), np.int8)
            steady = ~rewarming
            change[steady] = self.detector.update(slots[steady], anomalous[steady], calm[steady],
                                                  None if severe is None else severe[steady])
        else:
            change = self.detector.update(slots, anomalous, calm, severe)
        self._learn(slots, score, ready, anomalous)
        return Decision(score, contrib, anomalous, change, thresholds)

    def _learn(self, slots: np.ndarray, score: np.ndarray, ready: np.ndarray, anomalous: np.ndarray) -> None:
        """The adaptive thresholds learn from this batch's ready scores."""
        # The dynamic threshold learns only from readings it did not flag: a sustained fault must
        # not fill the window and lift the threshold above itself (measured on SKAB valve1: MAR
        # 70 % when it learned everything, 25 % like this).
        if self.dynamic is not None:
            learn = ready & ~anomalous
            if learn.any():
                self.dynamic.push(slots[learn], score[learn])
        # The likelihood learns from every ready reading, flagged or not (see its module).
        if self.likelihood is not None:
            if all_set(ready):  # the usual reading: no selection to make
                self.likelihood.learn(slots, score)
            elif np.count_nonzero(ready):
                self.likelihood.learn(slots[ready], score[ready])
