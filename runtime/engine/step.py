"""One model's step for a batch of devices, over the per-device arrays declared for that model.

:class:`BatchStep` is what the engine swaps on a hot reload: the model, its constants (scaler,
calibration), the per-device arrays (:class:`~faultwatch.runtime.engine.devices.SlotArrays`) and
the scorer, detector and dynamic threshold that declare theirs there. :meth:`BatchStep.run` takes
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
from faultwatch.runtime.engine.calibration import spike_scores
from faultwatch.runtime.engine.detector import DetectorSettingsError
from faultwatch.runtime.engine.devices import SlotArrays
from faultwatch.runtime.engine.events import FaultEvent, Output, top_channels
from faultwatch.runtime.engine.hotpath import all_set, operands
from faultwatch.runtime.engine.likelihood import LikelihoodThreshold
from faultwatch.runtime.engine.model import ModelStep
from faultwatch.runtime.engine.scoring import FaultDetector, Scorer
from faultwatch.runtime.engine.thresholds import DynamicThreshold

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
        # Scaled readings outside the first range step in a call of their own (int8 activations are
        # quantized over the whole batch); all are clipped to the second (DetectorSettings).
        self.isolate = (-d.isolate_k, 1.0 + d.isolate_k)
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
        per_device = SlotArrays(max_capacity=settings.max_devices)
        # The recurrent state [cap, H_i] per layer (and cell/hidden part), zero at a reset.
        self.state_names = [f"state_{i}" for i in range(len(model.state_widths))]
        for name, width in zip(self.state_names, model.state_widths, strict=True):
            per_device.declare(name, (width,), np.float32, on_reset=0.0)
        # [cap, K] the scaled forecast of each device's next reading; valid where has_prev.
        per_device.declare("prev_forecast", (len(c.targets),), np.float32)
        # [cap, F] the last scaled reading, for imputing non-target features: mid-range at first.
        per_device.declare("last_scaled", (len(c.features),), np.float32, initial=0.5)
        per_device.declare("has_prev", dtype=bool, initial=False, on_reset=False)
        # Kept across any reload: a redelivered reading is still recognised, an episode still clears.
        per_device.declare("last_ts", initial=-np.inf, across_models=True)
        per_device.declare("fault_start", across_models=True)
        per_device.declare("fault_peak", across_models=True)
        # Readings still to step without scoring after a bridged gap or a resume (DetectorSettings.rewarm).
        per_device.declare("rewarm", dtype=np.int64, on_reset=0)
        self.per_device = per_device
        self.scorer = Scorer(c.calibration.residual_std, d.score_span, d.warmup, per_device=per_device)
        self.detector = FaultDetector(d.raise_k, d.window_n, d.clear_m, per_device=per_device,
                                      cooldown=d.cooldown)
        self.severe = d.severe
        self.dynamic = (DynamicThreshold(d.dynamic, self.threshold, per_device=per_device)
                        if d.policy == "dynamic" else None)
        dc = c.detector_calibration
        if dc is None and (d.spike or d.policy == "likelihood"):
            raise DetectorSettingsError("detector: the spike score and the likelihood threshold need "
                                        "a model exported by this faultwatch (no detector calibration)")
        # The unsmoothed score's spread [K] and its weight in the static threshold's units.
        self.spike_std = np.asarray(dc.spike_residual_std) if d.spike and dc else None
        self.spike_gain = self.threshold / dc.spike_threshold if d.spike and dc else 0.0
        # Constants of the per-step arithmetic (hotpath.operands).
        self._spike_gain, self._clear_ratio = operands(self.spike_gain, d.clear_ratio)
        self.likelihood = (LikelihoodThreshold(d.likelihood, self.threshold, dc.ratio_mean,
                                               dc.ratio_var, per_device)
                           if d.policy == "likelihood" and dc else None)

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
                scaled = self._impute(scaled, missing, slots, has_prev, prev_forecast)
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
        rewarm = pd["rewarm"][slots]  # [B] >= 0
        n_rewarming = 0
        if np.count_nonzero(rewarm):  # one call for the usual reading; > 0 only when there is any
            rewarming = rewarm > 0
            n_rewarming = int(np.count_nonzero(rewarming))
        if n_rewarming:  # rare: right after a bridged gap or a resume
            residual[rewarming] = np.nan  # stepped, not scored: the score holds where it was
            pd["rewarm"][slots] = np.maximum(rewarm - 1, 0)
            self.counters["rewarm_readings"] += n_rewarming
        score, contrib, ready = self.scorer.update(slots, residual)
        if self.spike_std is not None:  # the larger of the two scores, in the EWMA score's units
            score = np.maximum(score, self._spike_gain * spike_scores(residual, self.spike_std))
        if n_rewarming:
            ready = ready & ~rewarming
        # The threshold each score is compared with: the static one, or each device's own [B].
        threshold: float | np.ndarray
        if self.likelihood is not None:
            threshold = self.likelihood.current(slots)
        elif self.dynamic is not None:
            threshold = self.dynamic.current(slots)
        else:
            threshold = float(self.threshold)
        thresholds = [threshold] * len(devices) if isinstance(threshold, float) else threshold.tolist()
        anomalous = ready & (score > threshold)
        calm = ready & (score < self._clear_ratio * threshold)
        # DetectorSettings.severe: a reading this far above its threshold raises on its own.
        severe = score > self.severe * threshold if self.severe else None
        if n_rewarming:
            # A re-warming reading holds the detector as it is: it neither counts towards a raise
            # nor breaks the calm run that clears a fault (SKAB skips a reading every ~20 rows).
            change = np.zeros(len(slots), np.int8)
            steady = ~rewarming
            change[steady] = self.detector.update(slots[steady], anomalous[steady], calm[steady],
                                                  None if severe is None else severe[steady])
        else:
            change = self.detector.update(slots, anomalous, calm, severe)
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

        forecast = self._advance(slots, scaled)  # [B, K] scaled
        pd["last_ts"][slots] = ts
        self.counters["steps"] += 1
        self.counters["readings"] += len(slots)
        active = self.detector.active[slots]
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

    def _impute(self, scaled, missing, slots, has_prev, prev_forecast) -> np.ndarray:
        """``scaled`` [B, F] with its ``missing`` values filled: a target from the forecast made for
        it, anything else from its last value."""
        fill = self.per_device["last_scaled"][slots]  # [B, F]
        fill[:, self.target_index] = np.where(has_prev[:, None], prev_forecast,
                                              fill[:, self.target_index])
        self.counters["imputed_values"] += int(missing.sum())
        return np.where(missing, fill, scaled)

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
                self._bridge(slots, skipped.astype(np.int64))
                # The state ran on its own forecasts: as many readings as were bridged (at most
                # rewarm) are stepped, not scored. SKAB's files skip a reading every ~20: a fixed
                # re-warm-up of 10 left half their readings unscored.
                bridged = skipped >= 1
                pd_rewarm = self.per_device["rewarm"]
                pd_rewarm[slots[bridged]] = np.minimum(skipped[bridged], self.decisions.rewarm)

    def _advance(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Step the model for ``slots`` on scaled readings ``x`` [B, F]; returns the forecast of the
        next reading [B, K] (scaled). Devices with a reading outside the isolate range step apart,
        in one call of their own, so their values cannot set the int8 quantization range of the
        others (one call for all of them, not one each: a fleet model meeting many devices
        beyond its training range costs two calls a batch, not hundreds)."""
        lo, hi = self.isolate
        wild = np.flatnonzero(((x < lo) | (x > hi)).any(axis=1)) if len(slots) > 1 else ()
        if not len(wild):
            return self._run(slots, x)
        self.counters["isolated_steps"] += len(wild)
        forecast = np.empty((len(slots), len(self.contract.targets)), np.float32)
        tame = np.setdiff1d(np.arange(len(slots)), wild)
        if len(tame):
            forecast[tame] = self._run(slots[tame], x[tame])
        forecast[wild] = self._run(slots[wild], x[wild])
        return forecast

    def _run(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """One onnxruntime call: gather the state rows [1, B, H_i] of ``slots``, step on ``x``
        [B, F], scatter back; returns the forecast [B, K] (scaled)."""
        pd = self.per_device.arrays
        states = [pd[name] for name in self.state_names]
        # take: a third of the cost of states[slots] on a few rows. (Keeping the four states in
        # one array, gathered and scattered whole, saved ~2 % of an engine step at batch 1 and
        # cost ~3 % at 1,024, where the joined rows are copied once more.)
        forecast, new_state = self.model.step(x[:, None, :], [s.take(slots, axis=0)[None] for s in states])
        for s, new in zip(states, new_state):  # noqa: B905 (see run(): the model returns one per state)
            s[slots] = new[0]
        forecast = forecast[:, 0]  # [B, 1, K] → [B, K]
        pd["prev_forecast"][slots] = forecast
        pd["last_scaled"][slots] = x
        pd["has_prev"][slots] = True
        return forecast

    def _bridge(self, slots: np.ndarray, skipped: np.ndarray) -> None:
        """Step ``slots`` over ``skipped`` [B] missing readings each, feeding the model its forecasts.

        Targets take the forecast made for them, other features their last value; nothing is
        scored. Round r steps the devices that miss more than r readings, in one call.
        """
        pd = self.per_device.arrays
        for r in range(int(skipped.max())):
            sel = slots[skipped > r]
            x = pd["last_scaled"][sel]  # [b, F] (a copy: fancy indexing)
            x[:, self.target_index] = pd["prev_forecast"][sel]
            self._advance(sel, x)
            self.counters["bridged_readings"] += len(sel)

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
