"""One model's step for a batch of devices, over the per-device arrays declared for that model.

:class:`BatchStep` is what the engine swaps on a hot reload: the model, its constants (scaler,
calibration), the per-device arrays (:class:`~faultwatch.runtime.engine.devices.SlotArrays`), the
model's side (:class:`~.recurrence.RecurrentState`: state, bridging, imputing) and the deciding
side (:class:`~.decider.Decider`: scores, thresholds, raise/clear). :meth:`BatchStep.run` takes
readings of distinct devices, each newer than its device's last one, and does in one onnxruntime
call what the engine does with a reading: bridge or reset after a silence, scale, impute, score
against the forecast made one step earlier, decide, step the model, build the outputs.

Bookkeeping is done in bulk: one numpy operation per array for the whole batch, and the rare
cases (gaps, missing values, fault episodes) only when present. At batch 1 a numpy call costs
about as much as a model layer, so the usual reading takes the fewest calls.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np
from faultwatch.runtime.engine.decider import Decider
from faultwatch.runtime.engine.devices import SlotArrays
from faultwatch.runtime.engine.events import FaultEvent, Output, top_channels
from faultwatch.runtime.engine.hotpath import all_set
from faultwatch.runtime.engine.model import ModelStep
from faultwatch.runtime.engine.recurrence import RecurrentState

if TYPE_CHECKING:
    from faultwatch.runtime.engine.engine import EngineSettings


class BatchStep:
    """One model bound to its per-device arrays; ``counters`` are the engine's, shared."""

    def __init__(self, model: ModelStep, settings: EngineSettings, counters: Counter):
        self.settings, self.counters = settings, counters
        c = model.contract
        self.model, self.contract = model, c
        self.decisions = d = c.decisions.with_overrides(settings.detector)
        self.threshold = d.threshold if d.threshold is not None else c.calibration.threshold
        self.period_s = c.sample_period_s
        self.max_gap_s = d.max_gap_periods * c.sample_period_s
        # Scaled readings beyond the clip range are clipped to it (DetectorSettings).
        self.clip = (-d.clip_k, 1.0 + d.clip_k)
        self.target_index = np.asarray(c.target_index)
        self.offset = np.asarray(c.scaler.offset)
        self.scale = np.asarray(c.scaler.scale)
        self.target_scale = self.scale[self.target_index]  # [K]: scaled forecast → raw units
        self.target_offset = self.offset[self.target_index]
        # The target columns of a [B, F] array: a view when the targets are all the features in
        # order (the usual model), which spares a gather per call.
        identity = tuple(c.target_index) == tuple(range(len(c.features)))
        self.target_columns = slice(None) if identity else self.target_index
        # A reading this long after the last one may need a reset or a bridge (_catch_up decides
        # exactly); a little under 1.5 periods, the least that rounds to one skipped reading.
        self._late_s = min(self.max_gap_s, 1.25 * c.sample_period_s if c.sample_period_s > 0 else np.inf)
        self.per_device = per_device = SlotArrays(max_capacity=settings.max_devices)
        # Scaled readings outside the isolate range step in a call of their own (int8 activations
        # are quantized over the whole batch).
        self.recurrent = RecurrentState(model, per_device, (-d.isolate_k, 1.0 + d.isolate_k), counters)
        # Kept across any reload: a redelivered reading is still recognised, an episode still clears.
        per_device.declare("last_ts", initial=-np.inf, across_models=True)
        per_device.declare("fault_start", across_models=True)
        per_device.declare("fault_peak", across_models=True)
        # Readings still to step without scoring after a bridged gap or a resume (DetectorSettings.rewarm).
        per_device.declare("rewarm", dtype=np.int64, on_reset=0, added_later=True)
        self.decider = Decider(d, self.threshold, c.calibration.residual_std, c.detector_calibration,
                               per_device)

    def run(self, devices: Sequence[str], values: Sequence[np.ndarray], slots: np.ndarray,
            ts: np.ndarray, last: np.ndarray) -> list[Output]:
        """The engine step for readings (by column: device ids, ``values`` [F] each, ``ts`` [B])
        newer than their devices' ``last`` [B] timestamps; ``slots`` [B] the devices' slots.

        Bookkeeping is done in bulk: one numpy operation per array for the whole batch, the
        rare cases (gaps, missing values, fault episodes) only when present.
        """
        pd = self.per_device.arrays
        # Rare: a gap to reset or to bridge (or a new device: last = -inf; _catch_up leaves it be).
        if np.count_nonzero(ts - last >= self._late_s):
            self._catch_up(slots, ts, last)
        has_prev = pd["has_prev"][slots]
        raw = np.array(values, dtype=np.float64)  # [B, F]
        scaled = ((raw - self.offset) / self.scale).astype(np.float32)  # [B, F]
        prev_forecast = pd["prev_forecast"].take(slots, axis=0)  # [B, K]: the forecast for this reading
        missing = None
        lo, hi = self.clip
        # One check for both rare cases: a value missing (NaN compares False; ±inf is outside) or
        # beyond the clip range.
        if not all_set((scaled >= lo) & (scaled <= hi)):
            finite = np.isfinite(raw)
            if not all_set(finite):
                missing = ~finite
                scaled = self.recurrent.impute(scaled, missing, slots, has_prev, prev_forecast)
            outside = np.count_nonzero((scaled < lo) | (scaled > hi))  # NaN compares False
            if outside:  # an absurd value, far beyond any real excursion
                self.counters["clipped_values"] += int(outside)
                scaled = np.clip(scaled, lo, hi)

        # Score this reading against the forecast made one step earlier.
        residual = scaled[:, self.target_columns] - prev_forecast  # [B, K]
        if missing is not None:
            residual[missing[:, self.target_index] | ~has_prev[:, None]] = np.nan
        elif not all_set(has_prev):
            residual[~has_prev] = np.nan
        rewarming = self._rewarming(slots)
        if rewarming is not None:
            residual[rewarming] = np.nan  # stepped, not scored: the score holds where it was
        score, contrib, anomalous, change, thresholds = self.decider.decide(slots, residual, rewarming)

        forecast = self.recurrent.advance(slots, scaled)  # [B, K] scaled
        pd["last_ts"][slots] = ts
        self.counters["steps"] += 1
        self.counters["readings"] += len(slots)
        active = self.decider.detector.active[slots]
        events: list[FaultEvent | None] = [None] * len(devices)
        if np.count_nonzero(change) or np.count_nonzero(active):
            # Peak score of the running episode; kept after a clear so the cleared event reports it.
            peak = pd["fault_peak"][slots]
            peak = np.where(active, np.maximum(peak, score), peak)
            pd["fault_peak"][slots] = np.where(change > 0, score, peak)
            for j in np.flatnonzero(change).tolist():
                events[j] = self._event(devices[j], int(slots[j]), ts[j], change[j], score[j],
                                        thresholds[j], contrib[j], raw[j], residual[j], scaled[j])
        forecast_raw = forecast * self.target_scale + self.target_offset  # [B, K] raw units
        imputed = [()] * len(devices) if missing is None else [
            tuple(self.contract.features[f] for f in np.flatnonzero(row)) for row in missing]
        # tuple.__new__ builds each Output in C from its fields in order (calling Output runs a
        # Python __new__ per reading: half the cost of the outputs at a batch of 1,024).
        # (zip without strict=: the keyword sends zip down its slow path, 2 µs a call; every
        # column has B entries.)
        return list(map(tuple.__new__, repeat(Output), zip(  # noqa: B905
            devices, ts.tolist(), forecast_raw, score.tolist(), anomalous.tolist(), active.tolist(),
            events, imputed, thresholds)))

    def _rewarming(self, slots: np.ndarray) -> np.ndarray | None:
        """The readings [B] still to step without scoring (right after a bridged gap or a resume),
        counted down; None (the usual call: one numpy call) when there are none."""
        rewarm = self.per_device["rewarm"][slots]  # [B] >= 0
        if not np.count_nonzero(rewarm):
            return None
        rewarming = rewarm > 0
        self.per_device["rewarm"][slots] = np.maximum(rewarm - 1, 0)
        self.counters["rewarm_readings"] += int(np.count_nonzero(rewarming))
        return rewarming

    def _catch_up(self, slots: np.ndarray, ts: np.ndarray, last: np.ndarray) -> None:
        """Devices whose last reading is more than a period old: reset after a long silence,
        bridge a short one."""
        known = np.isfinite(last) & self.per_device["has_prev"][slots]
        # A long silence breaks the dynamics the state encodes: start over, with warm-up.
        gap = known & (ts - last > self.max_gap_s)
        if gap.any():
            self.per_device.reset(slots[gap])
            self.counters["gap_resets"] += int(gap.sum())
        # A short one is bridged: the readings that never came are the model's own forecasts.
        if self.period_s > 0:
            skipped = np.where(known & ~gap, np.rint((ts - last) / self.period_s) - 1, 0)
            if (skipped >= 1).any():
                self.recurrent.bridge(slots, skipped.astype(np.int64))
                # The state ran on its own forecasts: as many readings as were bridged (at most
                # rewarm) are stepped, not scored. SKAB's files skip a reading every ~20: a fixed
                # re-warm-up of 10 left half their readings unscored.
                bridged = skipped >= 1
                pd_rewarm = self.per_device["rewarm"]
                pd_rewarm[slots[bridged]] = np.minimum(skipped[bridged], self.decisions.rewarm)

    def _event(self, device: str, slot: int, ts, change, score, threshold, contrib, raw, residual,
               scaled) -> FaultEvent:
        """The event of a fault raised (``change`` > 0) or cleared at this reading of ``device``:
        ``contrib`` [K] each channel's part of score², ``raw`` [F] the reading, ``residual`` [K]
        reading − forecast and ``scaled`` [F] the reading, in scaled units."""
        if change > 0:
            self.counters["faults_raised"] += 1
            self.per_device["fault_start"][slot] = ts
            # What the model had forecast for this reading, raw units [K] (reading − residual).
            expected = ((scaled[self.target_index] - np.nan_to_num(residual)) * self.target_scale
                        + self.target_offset)
            channels = top_channels(np.nan_to_num(contrib), raw[self.target_index], expected,
                                    self.contract.targets, self.settings.top_channels)
            return FaultEvent(device, "raised", float(ts), float(ts), float(score),
                              float(threshold), channels)
        self.counters["faults_cleared"] += 1
        return FaultEvent(device, "cleared", float(ts), float(self.per_device["fault_start"][slot]),
                          float(self.per_device["fault_peak"][slot]), float(threshold))

    # -- hot reload ------------------------------------------------------------------------

    def same_shape(self, contract) -> bool:
        """Whether a model with ``contract`` can carry on from this step's per-device state."""
        c = self.contract
        return (c.cell, tuple(c.hidden), tuple(c.features), tuple(c.targets)) == (
            contract.cell, tuple(contract.hidden), tuple(contract.features), tuple(contract.targets))

    def carry_from(self, old: BatchStep, keep: bool) -> None:
        """Take over the devices of ``old`` (the previous model's step): every per-device array when
        ``keep`` (same shape), else those declared to outlive a model of another shape; the values
        held in scaled units are re-scaled to this model's scaler (channels matched by name)."""
        n = old.per_device.capacity
        self.per_device.carry_from(old.per_device, n, keep)
        raw = old.per_device["last_scaled"][:n] * old.scale + old.offset  # [n, F_old]
        last_scaled = self.per_device["last_scaled"]
        last_scaled[:n] = 0.5
        for j, name in enumerate(self.contract.features):
            if name in old.contract.features:
                i = old.contract.features.index(name)
                last_scaled[:n, j] = (raw[:, i] - self.offset[j]) / self.scale[j]
        if keep:
            prev_raw = old.per_device["prev_forecast"][:n] * old.target_scale + old.target_offset  # [n, K]
            self.per_device["prev_forecast"][:n] = (prev_raw - self.target_offset) / self.target_scale
