"""The streaming engine: one model step per reading, for many devices at once.

The daemon, ``replay`` and ``eval`` all go through :meth:`Engine.process`.
Every decision (score span, threshold policy, raise/clear, warm-up, gaps,
clipping) comes from the :class:`DetectorSettings` the model file carries;
:class:`EngineSettings` may override single fields of it and otherwise holds
only what does not decide (capacity, batch size, how many channels an event names).
Every device owns a slot: a row in the per-device arrays (the LSTM state, the
forecast it made for its next reading, scorer and detector state; declared in
runtime/engine/devices.py). A call gathers the slots of the devices with a reading,
steps them together in one onnxruntime call (:class:`~faultwatch.runtime.engine.step.BatchStep`),
and scatters the new state back. Two readings of one device never share a call:
the second needs the state the first produces.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from faultwatch.runtime.engine.detector import MAX_GAP_PERIODS
from faultwatch.runtime.engine.devices import DeviceTable, SlotArrays
from faultwatch.runtime.engine.events import FaultEvent, Output, Reading
from faultwatch.runtime.engine.hotpath import all_set
from faultwatch.runtime.engine.model import ModelStep
from faultwatch.runtime.engine.scoring import FaultDetector
from faultwatch.runtime.engine.step import BatchStep


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
        # `cleared` events of devices evicted with a fault raised; the caller takes them
        self.evicted_events: list[FaultEvent] = []
        self.stepper = BatchStep(model, self.settings, self.counters)

    # What belongs to the current model (a hot reload replaces the stepper).

    @property
    def model(self) -> ModelStep:
        return self.stepper.model

    @property
    def contract(self):
        return self.stepper.contract

    @property
    def threshold(self) -> float:
        """The static threshold (calibrated or from the settings)."""
        return self.stepper.threshold

    @property
    def max_gap_s(self) -> float:
        return self.stepper.max_gap_s

    @property
    def per_device(self) -> SlotArrays:
        return self.stepper.per_device

    @property
    def detector(self) -> FaultDetector:
        return self.stepper.decider.detector

    # -- slots ---------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.per_device.capacity

    @property
    def devices(self) -> list[str]:
        return list(self.table.slots)

    def _slots(self, devices: Sequence[str]) -> list[int]:
        """The slots of ``devices``, now the most recently seen; new devices start from the initial values."""
        slots, new, evicted = self.table.lookup_many(devices)
        if evicted:
            self.counters["devices_evicted"] += len(evicted)
            for slot, gone in evicted:
                self._clear_evicted(slot, gone)
        if new:
            new_slots = [slot for slot, _ in new]
            self.per_device.grow(max(new_slots) + 1)
            self.per_device.initialize(new_slots)
            self.device_of_slot.update(new)
        return slots

    def _clear_evicted(self, slot: int, device: str) -> None:
        """``device`` lost ``slot`` to a new device: with a fault raised, its retained fault topic
        would say "raised" for ever, so it is cleared, saying why (read before the slot is reused)."""
        if self.per_device["fault_active"][slot]:
            self.counters["faults_cleared"] += 1
            self.evicted_events.append(FaultEvent(
                device, "cleared", float(self.per_device["last_ts"][slot]),
                float(self.per_device["fault_start"][slot]),
                float(self.per_device["fault_peak"][slot]), float(self.threshold), reason="evicted"))

    def last_ts(self, device: str) -> float:
        """The ts of the last reading stepped for ``device``; -inf for a device it doesn't hold."""
        slot = self.table.slots.get(device)
        return -np.inf if slot is None else float(self.per_device["last_ts"][slot])

    def fault_active(self, device: str) -> bool:
        """Whether ``device`` has a fault raised (False for a device it doesn't hold)."""
        slot = self.table.slots.get(device)
        return slot is not None and bool(self.per_device["fault_active"][slot])

    def restart(self, device: str) -> None:
        """``device`` starts over (its clock was set back): state and warm-up, and any ts is newer.
        A raised fault stays raised and clears as usual."""
        slot = self.table.slots.get(device)
        if slot is not None:
            self.per_device.reset(slot)
            self.per_device["last_ts"][slot] = -np.inf
            self.counters["clock_restarts"] += 1

    def forget(self, device: str) -> bool:
        """Drop ``device`` and its state (withdrawn by its operator); False if it was not held."""
        slot = self.table.slots.pop(device, None)
        if slot is None:
            return False
        self.table.free.append(slot)
        self.device_of_slot.pop(slot, None)
        self.per_device.initialize(slot)
        return True

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
        # (A snapshot written before a field declared added_later loads it at its initial value.)
        self.per_device.check_fits(saved, len(devices))
        slots = np.array(self._slots(devices), dtype=np.int64)
        self.per_device.load(slots, saved)
        # A resume after a crash: the readings stepped since the snapshot (acknowledged, so never
        # redelivered) come back as a gap in each device's timestamps, bridged and re-warmed by
        # the first step (BatchStep._catch_up); after a clean stop nothing is missing and the
        # devices go on exactly as an uninterrupted run.
        return len(devices)

    # -- hot reload ------------------------------------------------------------------------

    def same_shape(self, contract) -> bool:
        """Whether a model with ``contract`` can carry on from this engine's per-device state."""
        return self.stepper.same_shape(contract)

    def swap_model(self, model: ModelStep) -> bool:
        """Run ``model`` from the next reading on; True when the devices kept their state.

        Same cell, layer sizes, features and targets (a retrained model of the same shape):
        recurrent state, scorer and detector carry on, under the new calibration, with the
        values held in scaled units re-scaled by the new scaler. Otherwise every device starts
        over with warm-up; the devices, their last timestamps (so a redelivered reading is
        still recognised) and active faults (cleared as usual) are kept either way.
        """
        keep = self.same_shape(model.contract)
        stepper = BatchStep(model, self.settings, self.counters)
        stepper.carry_from(self.stepper, keep)
        self.stepper = stepper
        self.counters["model_swaps"] += 1
        return keep

    # -- processing ----------------------------------------------------------------------

    def process(self, readings: Sequence[Reading]) -> list[Output | None]:
        """Outputs aligned with ``readings``; None where a reading was dropped (counted).

        Readings of one device must come in time order; an older or repeated
        timestamp is dropped as ``out_of_order``.
        """
        n = len(readings)
        if n == 0:
            return []
        # A call never holds more devices than the cap: a new device looked up later in
        # the same call must not evict (and take the slot of) one already in it.
        size = min(self.settings.max_batch, self.settings.max_devices)
        # By column (Reading is a tuple): one pass over the readings instead of one per field.
        devices, times, values = zip(*readings, strict=True)
        if n <= size and len(set(devices)) == n:
            return self._step(devices, times, values)  # the usual call: one reading per device
        outputs: list[Output | None] = [None] * n
        for members in rounds(devices):
            for b in range(0, len(members), size):
                chunk = members[b:b + size]
                step = self._step([devices[i] for i in chunk], [times[i] for i in chunk],
                                  [values[i] for i in chunk])
                for i, out in zip(chunk, step, strict=True):
                    outputs[i] = out
        return outputs

    def _step(self, devices: Sequence[str], times: Sequence[float],
              values: Sequence[np.ndarray]) -> list[Output | None]:
        """One onnxruntime call for readings (by column) of distinct ``devices``; a reading not
        newer than its device's last one is dropped (None)."""
        slots = np.array(self._slots(devices), dtype=np.intp)  # [B]
        ts = np.array(times, dtype=np.float64)  # [B]
        last = self.per_device["last_ts"][slots]
        fresh = ts > last
        if all_set(fresh):
            return list(self.stepper.run(devices, values, slots, ts, last))
        self.counters["out_of_order"] += int((~fresh).sum())
        keep = np.flatnonzero(fresh).tolist()
        results: list[Output | None] = [None] * len(devices)
        if keep:
            outputs = self.stepper.run([devices[i] for i in keep], [values[i] for i in keep],
                                       slots[keep], ts[keep], last[keep])
            for i, out in zip(keep, outputs, strict=True):
                results[i] = out
        return results


def rounds(devices: Sequence[str]) -> list[list[int]]:
    """The positions of ``devices`` by round: round r holds each device's r-th reading.

    >>> rounds(["a", "b", "a", "a"])
    [[0, 1], [2], [3]]
    """
    out: list[list[int]] = []
    seen: Counter = Counter()
    for i, device in enumerate(devices):
        k = seen[device]
        seen[device] += 1
        if k == len(out):
            out.append([])
        out[k].append(i)
    return out


# Reading, Output and FaultEvent live in events.py; re-exported for the callers that import them here.
__all__ = ["MAX_GAP_PERIODS", "Engine", "EngineSettings", "FaultEvent", "Output", "Reading"]
