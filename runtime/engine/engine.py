"""The streaming engine: one model step per reading, for many devices at once.

The daemon, ``replay`` and ``eval`` all go through :meth:`Engine.process`.
Every device owns a slot: a row in the state arrays (the LSTM state, the
forecast it made for its next reading, scorer and detector state). A call
gathers the slots of the devices with a reading, steps them together in one
onnxruntime call, and scatters the new state back. Two readings of one
device never share a call: the second needs the state the first produces.

Every decision (score span, threshold policy, raise/clear, warm-up, gaps,
clipping) comes from the :class:`DetectorSettings` the model file carries;
:class:`EngineSettings` may override single fields of it and otherwise holds
only what does not decide (capacity, batch size, how many channels an event names).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from faultwatch.runtime.engine.calibration import spike_scores
from faultwatch.runtime.engine.detector import DetectorSettingsError
from faultwatch.runtime.engine.devices import DeviceTable, SlotArrays
from faultwatch.runtime.engine.events import FaultEvent, Output, Reading
from faultwatch.runtime.engine.likelihood import LikelihoodThreshold
from faultwatch.runtime.engine.model import ModelStep
from faultwatch.runtime.engine.scoring import FaultDetector, Scorer
from faultwatch.runtime.engine.thresholds import DynamicThreshold


def _all(flags: np.ndarray) -> bool:
    """``flags.all()`` for the checks every call makes: count_nonzero costs a fifth of it on a few rows
    (``.all()`` and ``.any()`` go through Python wrappers; at batch 1 they were 15 % of the engine)."""
    return np.count_nonzero(flags) == flags.size


@dataclass(frozen=True)
class EngineSettings:
    """What the engine runs with beyond the model's own decisions."""

    max_devices: int = 10_000  # least recently seen device evicted beyond this
    max_batch: int = 1024  # devices per onnxruntime call
    top_channels: int = 3  # channels named by a raised fault event
    # Overrides of single DetectorSettings fields (a daemon config's [engine.detector]); empty:
    # the model's own. Checked when an engine takes on a model.
    detector: dict = field(default_factory=dict)


class Engine:
    """Streams readings of many devices through one :class:`ModelStep`."""

    def __init__(self, model: ModelStep, settings: EngineSettings | None = None):
        self.settings = settings or EngineSettings()
        # The counters every step touches exist from the start (at 0), so stats list them at once;
        # the hot path adds to the others only when there is something to count.
        self.counters: Counter = Counter(
            dict.fromkeys(("steps", "readings", "out_of_order", "imputed_values"), 0))
        self.table = DeviceTable(self.settings.max_devices)
        self.device_of_slot: dict[int, str] = {}
        self._use(model)

    def _use(self, model: ModelStep) -> None:
        """Take on ``model``: its constants, and fresh per-device arrays (capacity 0) declared for it."""
        c = model.contract
        self.model, self.contract = model, c
        self.decisions = d = c.decisions.with_overrides(self.settings.detector)
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
        per_device = SlotArrays(max_capacity=self.settings.max_devices)
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
        self.dynamic = (DynamicThreshold(d.dynamic, self.threshold, per_device=per_device)
                        if d.policy == "dynamic" else None)
        dc = c.detector_calibration
        if dc is None and (d.spike or d.policy == "likelihood"):
            raise DetectorSettingsError("detector: the spike score and the likelihood threshold need "
                                        "a model exported by this faultwatch (no detector calibration)")
        # The unsmoothed score's spread [K] and its weight in the static threshold's units.
        self.spike_std = np.asarray(dc.spike_residual_std) if d.spike and dc else None
        self.spike_gain = self.threshold / dc.spike_threshold if d.spike and dc else 0.0
        self.likelihood = (LikelihoodThreshold(d.likelihood, self.threshold, dc.ratio_mean,
                                               dc.ratio_var, per_device)
                           if d.policy == "likelihood" and dc else None)

    # -- slots ---------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.per_device.capacity

    @property
    def state(self) -> list[np.ndarray]:
        """The recurrent state arrays [cap, H_i], in the model's state order."""
        return [self.per_device[name] for name in self.state_names]

    def reset(self, slots) -> None:
        """Zero the model state of these slots; the next readings warm up again."""
        self.per_device.reset(slots)

    def _slots(self, devices: list[str]) -> list[int]:
        """The slots of ``devices``, now the most recently seen; new devices start from the initial values."""
        slots, new, evicted = self.table.lookup_many(devices)
        if evicted:
            self.counters["devices_evicted"] += evicted
        if new:
            new_slots = [slot for slot, _ in new]
            self.per_device.grow(max(new_slots) + 1)
            self.per_device.initialize(new_slots)
            self.device_of_slot.update(new)
        return slots

    @property
    def devices(self) -> list[str]:
        return list(self.table.slots)

    # -- snapshots -------------------------------------------------------------------------

    def export_state(self) -> dict[str, np.ndarray]:
        """All devices' state as plain arrays, rows in least-recently-seen-first order."""
        devices = list(self.table.slots)
        slots = np.array([self.table.slots[d] for d in devices], dtype=np.int64)
        out = self.per_device.export(slots)
        out["devices"] = np.array(devices, dtype=str)
        return out

    def import_state(self, saved: dict[str, np.ndarray]) -> int:
        """Restore what :meth:`export_state` wrote; returns the number of devices.

        Raises ValueError when the arrays do not fit this engine's model.
        """
        devices = [str(d) for d in saved["devices"]]
        # A snapshot written before these existed still fits (nothing to re-warm, no recent clear).
        saved = {"rewarm": np.zeros(len(devices), np.int64),
                 "fault_since_clear": np.full(len(devices), 1 << 40, np.int64)} | dict(saved)
        self.per_device.check_fits(saved, len(devices))
        slots = np.array(self._slots(devices), dtype=np.int64)
        self.per_device.load(slots, saved)
        # A resume after a crash: the readings stepped since the snapshot (acknowledged, so never
        # redelivered) come back as a gap in each device's timestamps, bridged and re-warmed by
        # the first step (_catch_up); after a clean stop nothing is missing and the devices go on
        # exactly as an uninterrupted run.
        return len(devices)

    # -- hot reload ------------------------------------------------------------------------

    def same_shape(self, contract) -> bool:
        """Whether a model with ``contract`` can carry on from this engine's per-device state."""
        c = self.contract
        return (c.cell, tuple(c.hidden), tuple(c.features), tuple(c.targets)) == (
            contract.cell, tuple(contract.hidden), tuple(contract.features), tuple(contract.targets))

    def swap_model(self, model: ModelStep) -> bool:
        """Run ``model`` from the next reading on; True when the devices kept their state.

        Same cell, layer sizes, features and targets (a retrained model of the same shape):
        recurrent state, scorer and detector carry on, under the new calibration, with the
        values held in scaled units re-scaled by the new scaler. Otherwise every device starts
        over with warm-up; the devices, their last timestamps (so a redelivered reading is
        still recognised) and active faults (cleared as usual) are kept either way.
        """
        keep = self.same_shape(model.contract)
        old, old_contract = self.per_device, self.contract
        old_offset, old_scale, old_targets = self.offset, self.scale, self.target_index
        n = old.capacity
        self._use(model)
        self.per_device.carry_from(old, n, keep)
        # Same raw values, in the new model's scaled units (channels matched by name).
        raw = old["last_scaled"][:n] * old_scale + old_offset  # [n, F_old]
        last_scaled = self.per_device["last_scaled"]
        last_scaled[:n] = 0.5
        for j, name in enumerate(self.contract.features):
            if name in old_contract.features:
                i = old_contract.features.index(name)
                last_scaled[:n, j] = (raw[:, i] - self.offset[j]) / self.scale[j]
        if keep:
            t_new = self.target_index
            prev_raw = old["prev_forecast"][:n] * old_scale[old_targets] + old_offset[old_targets]  # [n, K]
            self.per_device["prev_forecast"][:n] = (prev_raw - self.offset[t_new]) / self.scale[t_new]
        self.counters["model_swaps"] += 1
        return keep

    # -- processing ----------------------------------------------------------------------

    def process(self, readings: Sequence[Reading]) -> list[Output | None]:
        """Outputs aligned with ``readings``; None where a reading was dropped (counted).

        Readings of one device must come in time order; an older or repeated
        timestamp is dropped as ``out_of_order``.
        """
        n = len(readings)
        # A call never holds more devices than the cap: a new device looked up later in
        # the same call must not evict (and take the slot of) one already in it.
        size = min(self.settings.max_batch, self.settings.max_devices)
        devices = [r.device for r in readings]
        if n <= size and len(set(devices)) == n:
            return self._step(readings, devices) if n else []  # the usual call: one reading per device
        outputs: list[Output | None] = [None] * n
        # Round r holds each device's r-th reading of this call.
        rounds: list[list[int]] = []
        seen: Counter = Counter()
        for i, r in enumerate(readings):
            k = seen[r.device]
            seen[r.device] += 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(i)
        for members in rounds:
            for b in range(0, len(members), size):
                chunk = members[b:b + size]
                step = self._step([readings[i] for i in chunk], [devices[i] for i in chunk])
                for i, out in zip(chunk, step, strict=True):
                    outputs[i] = out
        return outputs

    def _step(self, batch: Sequence[Reading], devices: list[str]) -> list[Output | None]:
        """One onnxruntime call for readings of distinct ``devices`` (theirs, in order); a reading
        not newer than its device's last one is dropped (None)."""
        slots = np.array(self._slots(devices), dtype=np.intp)  # [B]
        ts = np.array([r.ts for r in batch], dtype=np.float64)  # [B]
        last = self.per_device["last_ts"][slots]
        fresh = ts > last
        if _all(fresh):
            return list(self._step_fresh(batch, devices, slots, ts, last))
        self.counters["out_of_order"] += int((~fresh).sum())
        keep = np.flatnonzero(fresh)
        results: list[Output | None] = [None] * len(batch)
        if len(keep):
            outputs = self._step_fresh([batch[i] for i in keep.tolist()], [devices[i] for i in keep.tolist()],
                                       slots[keep], ts[keep], last[keep])
            for i, out in zip(keep, outputs, strict=True):
                results[i] = out
        return results

    def _step_fresh(self, batch: Sequence[Reading], devices: list[str], slots: np.ndarray,
                    ts: np.ndarray, last: np.ndarray) -> list[Output]:
        """The engine step for readings newer than their devices' ``last`` [B] timestamps.

        Bookkeeping is done in bulk: one numpy operation per array for the whole batch, the
        rare cases (gaps, missing values, fault episodes) only when present.
        """
        pd = self.per_device.arrays
        has_prev = pd["has_prev"][slots]
        if np.count_nonzero(has_prev & (ts - last >= self._late_s)):  # rare: a gap to reset or bridge
            self._catch_up(slots, ts, last)
            has_prev = pd["has_prev"][slots]
        raw = np.array([r.values for r in batch], dtype=np.float64)  # [B, F]
        scaled = ((raw - self.offset) / self.scale).astype(np.float32)  # [B, F]
        finite = np.isfinite(raw)
        missing = None if _all(finite) else ~finite
        prev_forecast = pd["prev_forecast"][slots]  # [B, K]: what the model forecast for this reading
        if missing is not None:
            scaled = self._impute(scaled, missing, slots, has_prev, prev_forecast)
        lo, hi = self.clip
        outside = np.count_nonzero((scaled < lo) | (scaled > hi))  # NaN compares False
        if outside:  # rare: an absurd value, far beyond any real excursion
            self.counters["clipped_values"] += int(outside)
            scaled = np.clip(scaled, lo, hi)

        # Score this reading against the forecast made one step earlier.
        residual = scaled[:, self.target_columns] - prev_forecast  # [B, K]
        if missing is not None:
            residual[missing[:, self.target_index] | ~has_prev[:, None]] = np.nan
        elif not _all(has_prev):
            residual[~has_prev] = np.nan
        rewarm = pd["rewarm"][slots]
        rewarming = rewarm > 0
        if np.count_nonzero(rewarming):  # rare: right after a bridged gap or a resume
            residual[rewarming] = np.nan  # stepped, not scored: the score holds where it was
            pd["rewarm"][slots] = np.maximum(rewarm - 1, 0)
            self.counters["rewarm_readings"] += int(np.count_nonzero(rewarming))
        score, contrib, ready = self.scorer.update(slots, residual)
        if self.spike_std is not None:  # the larger of the two scores, in the EWMA score's units
            score = np.maximum(score, self.spike_gain * spike_scores(residual, self.spike_std))
        ready = ready & ~rewarming
        threshold: Any  # a float (static), or [B] per device (likelihood, dynamic)
        if self.likelihood is not None:
            threshold = self.likelihood.current(slots)
        elif self.dynamic is not None:
            threshold = self.dynamic.current(slots)
        else:
            threshold = float(self.threshold)
        anomalous = ready & (score > threshold)
        calm = ready & (score < self.decisions.clear_ratio * threshold)
        if np.count_nonzero(rewarming):
            # A re-warming reading holds the detector as it is: it neither counts towards a raise
            # nor breaks the calm run that clears a fault (SKAB skips a reading every ~20 rows).
            change = np.zeros(len(slots), np.int8)
            steady = ~rewarming
            change[steady] = self.detector.update(slots[steady], anomalous[steady], calm[steady])
        else:
            change = self.detector.update(slots, anomalous, calm)
        # The dynamic threshold learns only from readings it did not flag: a sustained fault must
        # not fill the window and lift the threshold above itself (measured on SKAB valve1: MAR
        # 70 % when it learned everything, 25 % like this).
        if self.dynamic is not None:
            learn = ready & ~anomalous
            if learn.any():
                self.dynamic.push(slots[learn], score[learn])
        # The likelihood learns from every ready reading, flagged or not (see its module).
        if self.likelihood is not None and np.count_nonzero(ready):
            self.likelihood.learn(slots[ready], score[ready])

        forecast = self._advance(slots, scaled)  # [B, K] scaled
        pd["last_ts"][slots] = ts
        self.counters["steps"] += 1
        self.counters["readings"] += len(slots)
        active = self.detector.active[slots]
        events: list[FaultEvent | None] = [None] * len(batch)
        if np.count_nonzero(change) or np.count_nonzero(active):
            # Peak score of the running episode; kept after a clear so the cleared event reports it.
            peak = pd["fault_peak"][slots]
            peak = np.where(active, np.maximum(peak, score), peak)
            pd["fault_peak"][slots] = np.where(change > 0, score, peak)
            for j in np.flatnonzero(change):
                events[j] = self._event(int(slots[j]), ts[j], change[j], score[j],
                                        threshold if np.ndim(threshold) == 0 else threshold[j],
                                        contrib[j], raw[j], residual[j], scaled[j])
        forecast_raw = forecast * self.target_scale + self.target_offset  # [B, K] raw units
        thresholds = [threshold] * len(batch) if np.ndim(threshold) == 0 else threshold.tolist()
        imputed = [()] * len(batch) if missing is None else [
            tuple(self.contract.features[f] for f in np.flatnonzero(row)) for row in missing]
        return list(map(Output, devices, ts.tolist(), forecast_raw, score.tolist(),
                        anomalous.tolist(), active.tolist(), events, imputed, thresholds))

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
            self.reset(slots[gap])
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
        next reading [B, K] (scaled). A device with a reading outside the isolate range steps in a
        call of its own, so its values cannot set the int8 quantization range of the others."""
        lo, hi = self.isolate
        wild = np.flatnonzero(((x < lo) | (x > hi)).any(axis=1)) if len(slots) > 1 else ()
        if not len(wild):
            return self._run(slots, x)
        self.counters["isolated_steps"] += len(wild)
        forecast = np.empty((len(slots), len(self.contract.targets)), np.float32)
        tame = np.setdiff1d(np.arange(len(slots)), wild)
        if len(tame):
            forecast[tame] = self._run(slots[tame], x[tame])
        for j in wild:
            forecast[j] = self._run(slots[j:j + 1], x[j:j + 1])[0]
        return forecast

    def _run(self, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
        """One onnxruntime call: gather the state rows [1, B, H_i] of ``slots``, step on ``x``
        [B, F], scatter back; returns the forecast [B, K] (scaled)."""
        pd = self.per_device.arrays
        states = [pd[name] for name in self.state_names]
        forecast, new_state = self.model.step(x[:, None, :], [s[slots][None] for s in states])
        for s, new in zip(states, new_state, strict=True):
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

    def _event(self, slot: int, ts, change, score, threshold, contrib, raw, residual, scaled) -> FaultEvent:
        """The event of a fault raised (``change`` > 0) or cleared at this reading of ``slot``:
        ``contrib`` [K] each channel's part of score², ``raw`` [F] the reading, ``residual`` [K]
        reading − forecast and ``scaled`` [F] the reading, in scaled units."""
        device = self.device_of_slot[slot]
        if change > 0:
            self.counters["faults_raised"] += 1
            self.per_device["fault_start"][slot] = ts
            # What the model had forecast for this reading, raw units [K] (reading − residual).
            expected = ((scaled[self.target_index] - np.nan_to_num(residual)) * self.target_scale
                        + self.target_offset)
            contrib = np.nan_to_num(contrib)
            total = contrib.sum() or 1.0
            top = np.argsort(-contrib)[: self.settings.top_channels]
            channels = tuple(
                {"channel": self.contract.targets[k],
                 "reading": float(raw[self.target_index[k]]),
                 "forecast": float(expected[k]),
                 "share": round(float(contrib[k] / total), 4)}
                for k in top if contrib[k] > 0
            )
            return FaultEvent(device, "raised", float(ts), float(ts), float(score),
                              float(threshold), channels)
        self.counters["faults_cleared"] += 1
        return FaultEvent(device, "cleared", float(ts), float(self.per_device["fault_start"][slot]),
                          float(self.per_device["fault_peak"][slot]), float(threshold))

# Reading, Output and FaultEvent live in events.py; re-exported for the callers that import them here.
__all__ = ["Engine", "EngineSettings", "FaultEvent", "Output", "Reading"]
