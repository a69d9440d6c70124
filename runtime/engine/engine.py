"""The streaming engine: one model step per reading, for many devices at once.

The daemon, ``replay`` and ``eval`` all go through :meth:`Engine.process`.
Every device owns a slot: a row in the state arrays (the LSTM state, the
forecast it made for its next reading, scorer and detector state). A call
gathers the slots of the devices with a reading, steps them together in one
onnxruntime call, and scatters the new state back. Two readings of one
device never share a call: the second needs the state the first produces.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from faultwatch.runtime.engine.model import StepModel
from faultwatch.runtime.engine.scoring import FaultDetector, Scorer
from faultwatch.runtime.engine.thresholds import DynamicThreshold, DynamicThresholdSettings


@dataclass(frozen=True)
class Reading:
    """One sample of one device: ``values`` [F] in raw units, in the model's feature order; NaN = missing."""

    device: str
    ts: float  # epoch seconds
    values: np.ndarray


@dataclass(frozen=True)
class FaultEvent:
    device: str
    state: str  # "raised" or "cleared"
    ts: float  # when it was raised or cleared
    started_ts: float
    peak_score: float
    threshold: float
    # The channels that drove the score at the raising reading, largest first:
    # {"channel", "reading", "forecast", "share"} with share = that channel's part of the score.
    top_channels: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Output:
    device: str
    ts: float
    forecast: np.ndarray  # [K] raw units: the forecast of this device's next reading
    score: float  # smoothed anomaly score (0 while there is no earlier forecast to compare)
    anomalous: bool  # score above threshold, outside warm-up
    fault_active: bool
    event: FaultEvent | None = None
    imputed: tuple[str, ...] = ()  # channels that were missing and filled from the forecast
    threshold: float = float("nan")  # what the score was compared with (per device when dynamic)


#: A longer silence than this many sample periods always resets a device: bridging it takes one
#: model step per missing reading (one reading 30 days late at 1 Hz: 2.6 million) with the engine,
#: and a daemon's SIGTERM, waiting. Measured with the tests' tiny model on two busy cores: 86 398
#: bridged steps took 45 s; 3600 (an hour at 1 Hz, far past where a free-running forecast still
#: means anything) take about 2 s.
MAX_GAP_PERIODS = 3600


@dataclass(frozen=True)
class EngineSettings:
    max_devices: int = 10_000  # least recently seen device evicted beyond this
    max_batch: int = 1024  # devices per onnxruntime call
    threshold: float | None = None  # None: the calibrated threshold from the model
    # None: the static threshold above; settings: telemanom's dynamic threshold per device
    dynamic_threshold: DynamicThresholdSettings | None = None
    warmup: int | None = None  # readings after a reset with no fault raised; None: from the model
    raise_k: int = 3  # a fault is raised when raise_k of the last window_n readings are anomalous
    window_n: int = 5
    clear_m: int = 20  # ...and cleared after clear_m calm readings in a row,
    clear_ratio: float = 0.8  # calm = score below clear_ratio × threshold (hysteresis)
    top_channels: int = 3
    max_gap_periods: float = 60.0  # a longer silence (in sample periods) resets the device's state
    # A shorter one is bridged: each missing reading is replaced by the model's own forecast.

    def __post_init__(self) -> None:
        if not 0 < self.clear_ratio <= 1:
            raise ValueError(f"clear_ratio must be in (0, 1], got {self.clear_ratio}")
        if not 1 <= self.max_gap_periods <= MAX_GAP_PERIODS:
            raise ValueError(f"max_gap_periods must be in [1, {MAX_GAP_PERIODS}], got {self.max_gap_periods}")


@dataclass
class DeviceTable:
    """Device id → slot, least recently seen first; bounded, so unknown IDs can't exhaust memory."""

    max_devices: int
    slots: OrderedDict = field(default_factory=OrderedDict)
    free: list = field(default_factory=list)

    def lookup(self, device: str) -> tuple[int, bool, str | None]:
        """(slot, is_new, evicted device id or None)."""
        slot = self.slots.get(device)
        if slot is not None:
            self.slots.move_to_end(device)
            return slot, False, None
        evicted = None
        if self.free:
            slot = self.free.pop()
        elif len(self.slots) < self.max_devices:
            slot = len(self.slots)
        else:
            evicted, slot = self.slots.popitem(last=False)
        self.slots[device] = slot
        return slot, True, evicted


class Engine:
    """Streams readings of many devices through one :class:`StepModel`."""

    def __init__(self, model: StepModel, settings: EngineSettings | None = None):
        self.model = model
        self.settings = settings or EngineSettings()
        c = model.contract
        self.contract = c
        self.threshold = (self.settings.threshold if self.settings.threshold is not None
                          else c.calibration.threshold)
        self.period_s = c.sample_period_s
        self.max_gap_s = self.settings.max_gap_periods * c.sample_period_s
        warmup = self.settings.warmup if self.settings.warmup is not None else c.calibration.warmup
        self.target_index = np.asarray(c.target_index)
        self.offset = np.asarray(c.scaler.offset)
        self.scale = np.asarray(c.scaler.scale)
        self.counters: Counter = Counter()
        self.table = DeviceTable(self.settings.max_devices)
        self.capacity = 0
        n_targets, n_features = len(c.targets), len(c.features)
        self.state = [np.zeros((0, w), np.float32) for w in model.state_widths]  # [cap, H_i]
        self.prev_forecast = np.zeros((0, n_targets), np.float32)  # scaled forecast of the next reading
        self.last_scaled = np.zeros((0, n_features), np.float32)  # for imputing non-target features
        self.has_prev = np.zeros(0, bool)
        self.last_ts = np.zeros(0)
        self.fault_start = np.zeros(0)
        self.fault_peak = np.zeros(0)
        self.scorer = Scorer(c.calibration.residual_std, c.calibration.score_span, warmup, 0)
        self.detector = FaultDetector(self.settings.raise_k, self.settings.window_n,
                                      self.settings.clear_m, 0)
        dynamic = self.settings.dynamic_threshold
        self.dynamic = None if dynamic is None else DynamicThreshold(dynamic, self.threshold, 0)
        self.device_of_slot: dict[int, str] = {}

    # -- slots ---------------------------------------------------------------------------

    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = min(max(needed, 2 * self.capacity, 16), self.settings.max_devices)

        def pad(a: np.ndarray) -> np.ndarray:
            return np.concatenate([a, np.zeros((cap - len(a), *a.shape[1:]), a.dtype)])

        self.state = [pad(s) for s in self.state]
        self.prev_forecast, self.last_scaled = pad(self.prev_forecast), pad(self.last_scaled)
        self.has_prev, self.last_ts = pad(self.has_prev), pad(self.last_ts)
        self.fault_start, self.fault_peak = pad(self.fault_start), pad(self.fault_peak)
        self.scorer.grow(cap)
        self.detector.grow(cap)
        if self.dynamic is not None:
            self.dynamic.grow(cap)
        self.capacity = cap

    def reset(self, slots) -> None:
        """Zero the model state of these slots; the next readings warm up again."""
        for s in self.state:
            s[slots] = 0.0
        self.has_prev[slots] = False
        self.scorer.reset(slots)
        self.detector.reset(slots)
        if self.dynamic is not None:
            self.dynamic.reset(slots)

    def _slot(self, device: str) -> int:
        slot, is_new, evicted = self.table.lookup(device)
        if evicted is not None:
            self.counters["devices_evicted"] += 1
        if is_new:
            self._grow(slot + 1)
            self.reset([slot])
            self.detector.active[slot] = False
            self.last_ts[slot] = -np.inf
            self.last_scaled[slot] = 0.5  # mid-range until the first real value
            self.device_of_slot[slot] = device
        return slot

    @property
    def devices(self) -> list[str]:
        return list(self.table.slots)

    # -- snapshots -------------------------------------------------------------------------

    def _per_slot(self) -> dict[str, np.ndarray]:
        """Every per-device array, by name: what a snapshot must carry."""
        arrays = {f"state_{i}": s for i, s in enumerate(self.state)}
        return arrays | {
            "prev_forecast": self.prev_forecast, "last_scaled": self.last_scaled,
            "has_prev": self.has_prev, "last_ts": self.last_ts, "fault_start": self.fault_start,
            "fault_peak": self.fault_peak, "score_smoothed": self.scorer.smoothed,
            "score": self.scorer.score, "score_seen": self.scorer.seen,
            "fault_history": self.detector.history,
            "fault_normal_run": self.detector.normal_run, "fault_active": self.detector.active,
        } | ({} if self.dynamic is None else {
            "threshold_window": self.dynamic.buffer, "threshold_count": self.dynamic.count,
            "threshold_value": self.dynamic.value,
        })

    def export_state(self) -> dict[str, np.ndarray]:
        """All devices' state as plain arrays, rows in least-recently-seen-first order."""
        devices = list(self.table.slots)
        slots = np.array([self.table.slots[d] for d in devices], dtype=np.int64)
        out = {name: a[slots] for name, a in self._per_slot().items()}
        out["devices"] = np.array(devices, dtype=str)
        return out

    def import_state(self, saved: dict[str, np.ndarray]) -> int:
        """Restore what :meth:`export_state` wrote; returns the number of devices.

        Raises ValueError when the arrays do not fit this engine's model.
        """
        devices = [str(d) for d in saved["devices"]]
        current = self._per_slot()
        for name, a in current.items():
            if name not in saved or saved[name].shape[1:] != a.shape[1:] or len(saved[name]) != len(devices):
                raise ValueError(f"snapshot array {name!r} does not fit this model")
        slots = np.array([self._slot(d) for d in devices], dtype=np.int64)
        for name, a in self._per_slot().items():  # _slot may have grown the arrays
            a[slots] = saved[name]
        return len(devices)

    # -- hot reload ------------------------------------------------------------------------

    def same_shape(self, contract) -> bool:
        """Whether a model with ``contract`` can carry on from this engine's per-device state."""
        c = self.contract
        return (c.cell, tuple(c.hidden), tuple(c.features), tuple(c.targets)) == (
            contract.cell, tuple(contract.hidden), tuple(contract.features), tuple(contract.targets))

    def swap_model(self, model: StepModel) -> bool:
        """Run ``model`` from the next reading on; True when the devices kept their state.

        Same cell, layer sizes, features and targets (a retrained model of the same shape):
        recurrent state, scorer and detector carry on, under the new calibration, with the
        values held in scaled units re-scaled by the new scaler. Otherwise every device starts
        over with warm-up; the devices, their last timestamps (so a redelivered reading is
        still recognised) and active faults (cleared as usual) are kept either way.
        """
        keep = self.same_shape(model.contract)
        fresh = Engine(model, self.settings)
        n = self.capacity
        fresh._grow(n)
        old, new = self._per_slot(), fresh._per_slot()
        carried = set(old) if keep else {"last_ts", "fault_start", "fault_peak", "fault_normal_run",
                                         "fault_active"}
        for name in carried & set(new):
            if old[name].shape[1:] == new[name].shape[1:]:
                new[name][:n] = old[name][:n]
        # Same raw values, in the new model's scaled units (channels matched by name).
        raw = self.last_scaled[:n] * self.scale + self.offset  # [n, F_old]
        fresh.last_scaled[:n] = 0.5
        for j, name in enumerate(fresh.contract.features):
            if name in self.contract.features:
                i = self.contract.features.index(name)
                fresh.last_scaled[:n, j] = (raw[:, i] - fresh.offset[j]) / fresh.scale[j]
        if keep:
            t_old, t_new = self.target_index, fresh.target_index
            prev_raw = self.prev_forecast[:n] * self.scale[t_old] + self.offset[t_old]  # [n, K]
            fresh.prev_forecast[:n] = (prev_raw - fresh.offset[t_new]) / fresh.scale[t_new]
        for name, value in vars(fresh).items():
            if name not in ("table", "counters", "device_of_slot"):
                setattr(self, name, value)
        self.counters["model_swaps"] += 1
        return keep

    # -- processing ----------------------------------------------------------------------

    def process(self, readings: Sequence[Reading]) -> list[Output | None]:
        """Outputs aligned with ``readings``; None where a reading was dropped (counted).

        Readings of one device must come in time order; an older or repeated
        timestamp is dropped as ``out_of_order``.
        """
        outputs: list[Output | None] = [None] * len(readings)
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
            # A call never holds more devices than the cap: a new device looked up later in
            # the same call must not evict (and take the slot of) one already in it.
            size = min(self.settings.max_batch, self.settings.max_devices)
            for b in range(0, len(members), size):
                chunk = members[b:b + size]
                for i, out in zip(chunk, self._step([readings[i] for i in chunk]), strict=True):
                    outputs[i] = out
        return outputs

    def _step(self, batch: list[Reading]) -> list[Output | None]:
        """One onnxruntime call for readings of distinct devices."""
        slots_all = np.array([self._slot(r.device) for r in batch])
        ts_all = np.array([r.ts for r in batch], dtype=np.float64)
        fresh = ts_all > self.last_ts[slots_all]
        self.counters["out_of_order"] += int((~fresh).sum())
        results: list[Output | None] = [None] * len(batch)
        keep = np.flatnonzero(fresh)
        if len(keep) == 0:
            return results
        slots, ts = slots_all[keep], ts_all[keep]
        # A long silence breaks the dynamics the state encodes: start over, with warm-up.
        last = self.last_ts[slots]
        known = np.isfinite(last) & self.has_prev[slots]
        gap = known & (ts - last > self.max_gap_s)
        if gap.any():
            self.reset(slots[gap])
            self.counters["gap_resets"] += int(gap.sum())
        # A short one is bridged: the readings that never came are the model's own forecasts.
        if self.period_s > 0:
            skipped = np.where(known & ~gap, np.rint((ts - last) / self.period_s) - 1, 0)
            if (skipped >= 1).any():
                self._bridge(slots, skipped.astype(np.int64))
        raw = np.stack([batch[i].values for i in keep]).astype(np.float64)  # [B, F]
        missing = ~np.isfinite(raw)
        scaled = ((raw - self.offset) / self.scale).astype(np.float32)  # [B, F]
        # Impute: a target from the forecast made for it, anything else from its last value.
        fill = self.last_scaled[slots].copy()
        has_prev = self.has_prev[slots]
        fill[:, self.target_index] = np.where(has_prev[:, None], self.prev_forecast[slots],
                                              fill[:, self.target_index])
        scaled = np.where(missing, fill, scaled)
        self.counters["imputed_values"] += int(missing.sum())

        # Score this reading against the forecast made one step earlier.
        residual = scaled[:, self.target_index] - self.prev_forecast[slots]  # [B, K]
        residual[missing[:, self.target_index] | ~has_prev[:, None]] = np.nan
        score, contrib, ready = self.scorer.update(slots, residual)
        threshold = (np.full(len(slots), self.threshold) if self.dynamic is None
                     else self.dynamic.current(slots))
        anomalous = ready & (score > threshold)
        calm = ready & (score < self.settings.clear_ratio * threshold)
        change = self.detector.update(slots, anomalous, calm)
        # The dynamic threshold learns only from readings it did not flag: a sustained fault must
        # not fill the window and lift the threshold above itself (measured on SKAB valve1: MAR
        # 70 % when it learned everything, 25 % like this).
        learn = ready & ~anomalous
        if self.dynamic is not None and learn.any():
            self.dynamic.push(slots[learn], score[learn])

        # Step the model: gather state rows [1, B, H], run, scatter back.
        state = [s[slots][None] for s in self.state]
        forecast, new_state = self.model.step(scaled[:, None, :], state)  # forecast [B, 1, K]
        for s, new in zip(self.state, new_state, strict=True):
            s[slots] = new[0]
        forecast = forecast[:, 0]
        self.prev_forecast[slots] = forecast
        self.last_scaled[slots] = scaled
        self.has_prev[slots] = True
        self.last_ts[slots] = ts
        self.counters["steps"] += 1
        self.counters["readings"] += len(slots)

        forecast_raw = forecast * self.scale[self.target_index] + self.offset[self.target_index]
        expected_raw = self._expected_raw(residual, scaled)
        # Peak score of the running episode; kept after a clear so the cleared event reports it.
        peak = self.fault_peak[slots]
        peak = np.where(self.detector.active[slots], np.maximum(peak, score), peak)
        self.fault_peak[slots] = np.where(change > 0, score, peak)
        for j, i in enumerate(keep):
            event = None
            if change[j] != 0:
                event = self._event(slots[j], ts[j], change[j], score[j], threshold[j], contrib[j],
                                    raw[j], expected_raw[j])
            results[i] = Output(
                device=batch[i].device, ts=float(ts[j]), forecast=forecast_raw[j],
                score=float(score[j]), anomalous=bool(anomalous[j]),
                fault_active=bool(self.detector.active[slots[j]]), event=event,
                imputed=tuple(self.contract.features[f] for f in np.flatnonzero(missing[j])),
                threshold=float(threshold[j]),
            )
        return results

    def _bridge(self, slots: np.ndarray, skipped: np.ndarray) -> None:
        """Step ``slots`` over ``skipped`` [B] missing readings each, feeding the model its forecasts.

        Targets take the forecast made for them, other features their last value; nothing is
        scored. Round r steps the devices that miss more than r readings, in one call.
        """
        for r in range(int(skipped.max())):
            sel = slots[skipped > r]
            x = self.last_scaled[sel].copy()  # [b, F]
            x[:, self.target_index] = self.prev_forecast[sel]
            state = [s[sel][None] for s in self.state]
            forecast, new_state = self.model.step(x[:, None, :], state)
            for s, new in zip(self.state, new_state, strict=True):
                s[sel] = new[0]
            self.prev_forecast[sel] = forecast[:, 0]
            self.last_scaled[sel] = x
            self.counters["bridged_readings"] += len(sel)

    def _expected_raw(self, residual: np.ndarray, scaled: np.ndarray) -> np.ndarray:
        """What the model had forecast for this reading, raw units [B, K] (from reading − residual)."""
        expected = scaled[:, self.target_index] - np.nan_to_num(residual)
        return expected * self.scale[self.target_index] + self.offset[self.target_index]

    def _event(self, slot, ts, change, score, threshold, contrib, raw, expected) -> FaultEvent:
        device = self.device_of_slot[int(slot)]
        if change > 0:
            self.counters["faults_raised"] += 1
            self.fault_start[slot] = ts
            contrib = np.nan_to_num(contrib)  # each channel's part of score²
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
        return FaultEvent(device, "cleared", float(ts), float(self.fault_start[slot]),
                          float(self.fault_peak[slot]), float(threshold))
