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

from .model import StepModel
from .scoring import FaultDetector, Scorer


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


@dataclass(frozen=True)
class EngineSettings:
    max_devices: int = 10_000  # least recently seen device evicted beyond this
    max_batch: int = 1024  # devices per onnxruntime call
    threshold: float | None = None  # None: the calibrated threshold from the model
    warmup: int | None = None  # readings after a reset with no fault raised; None: from the model
    raise_k: int = 3
    window_n: int = 5
    clear_m: int = 10
    top_channels: int = 3
    max_gap_periods: float = 60.0  # a longer silence (in sample periods) resets the device's state


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
        self.capacity = cap

    def reset(self, slots) -> None:
        """Zero the model state of these slots; the next readings warm up again."""
        for s in self.state:
            s[slots] = 0.0
        self.has_prev[slots] = False
        self.scorer.reset(slots)
        self.detector.reset(slots)

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
            "score_seen": self.scorer.seen, "fault_history": self.detector.history,
            "fault_normal_run": self.detector.normal_run, "fault_active": self.detector.active,
        }

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
            for b in range(0, len(members), self.settings.max_batch):
                chunk = members[b:b + self.settings.max_batch]
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
        gap = np.isfinite(last) & (ts - last > self.max_gap_s)
        if gap.any():
            self.reset(slots[gap])
            self.counters["gap_resets"] += int(gap.sum())
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
        score, z, ready = self.scorer.update(slots, residual)
        anomalous = ready & (score > self.threshold)
        change = self.detector.update(slots, anomalous)

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
                event = self._event(j, slots[j], ts[j], change[j], score[j], z[j], raw[j],
                                    expected_raw[j])
            results[i] = Output(
                device=batch[i].device, ts=float(ts[j]), forecast=forecast_raw[j],
                score=float(score[j]), anomalous=bool(anomalous[j]),
                fault_active=bool(self.detector.active[slots[j]]), event=event,
                imputed=tuple(self.contract.features[f] for f in np.flatnonzero(missing[j])),
            )
        return results

    def _expected_raw(self, residual: np.ndarray, scaled: np.ndarray) -> np.ndarray:
        """What the model had forecast for this reading, raw units [B, K] (from reading − residual)."""
        expected = scaled[:, self.target_index] - np.nan_to_num(residual)
        return expected * self.scale[self.target_index] + self.offset[self.target_index]

    def _event(self, j, slot, ts, change, score, z, raw, expected) -> FaultEvent:
        device = self.device_of_slot[int(slot)]
        if change > 0:
            self.counters["faults_raised"] += 1
            self.fault_start[slot] = ts
            contrib = np.nan_to_num(z * z)
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
                              self.threshold, channels)
        self.counters["faults_cleared"] += 1
        return FaultEvent(device, "cleared", float(ts), float(self.fault_start[slot]),
                          float(self.fault_peak[slot]), self.threshold)
