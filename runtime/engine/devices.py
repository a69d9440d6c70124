"""Per-device state, declared once.

Every device the engine streams owns a *slot*: one row in each per-device array
(its LSTM state, the forecast it made for its next reading, its scorer, detector and
threshold state). :class:`DeviceTable` maps device ids to slots; :class:`SlotArrays`
holds the arrays. Each array is declared once, with its row shape, dtype, the value of
a new device, the value after a reset and whether it survives a model of another shape;
growing, resetting, snapshot export/import and the carry-over of a hot reload all
follow from that declaration. A new per-device field is one :meth:`SlotArrays.declare`.

>>> arrays = SlotArrays(max_capacity=100)
>>> arrays.declare("seen", dtype=np.int64, on_reset=0)
>>> arrays.declare("last_ts", initial=-np.inf, across_models=True)
>>> arrays.grow(3)
>>> arrays.capacity, arrays["last_ts"].tolist()
(16, [-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf])
>>> arrays["seen"][[0, 1]] = 5
>>> arrays["last_ts"][0] = 7.0
>>> arrays.reset([0])  # warm-up again: "seen" restarts, "last_ts" is kept
>>> arrays["seen"][:2].tolist(), float(arrays["last_ts"][0])
([0, 5], 7.0)
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


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

    def lookup_many(self, devices: Iterable[str]
                    ) -> tuple[list[int], list[tuple[int, str]], list[tuple[int, str]]]:
        """(slot of each device, the new devices as (slot, id), the evicted ones as (slot they
        held, id)), in one pass. An evicted device's slot is a new device's: read what the
        evicted one left there before the new one is initialized.

        A call must hold at most ``max_devices`` distinct devices, or a new one would evict
        one looked up earlier in the same call.
        """
        known = self.slots
        devices = devices if isinstance(devices, list | tuple) else list(devices)
        slots: list = list(map(known.get, devices))  # None for a new device
        new: list[tuple[int, str]] = []
        evicted: list[tuple[int, str]] = []
        if None not in slots:
            # Every device known (the usual call): the loop below, run by map in C (at a batch
            # of 1,024 the Python loop cost a fifth of the model step). Lookups change nothing,
            # so doing them all first leaves the same slots and the same order.
            deque(map(known.move_to_end, devices), maxlen=0)
            return slots, new, evicted
        slots = []
        for device in devices:
            slot = known.get(device)
            if slot is not None:
                known.move_to_end(device)  # the usual case, inlined: ~0.2 µs a reading less
            else:
                slot, _, gone = self.lookup(device)
                new.append((slot, device))
                if gone is not None:
                    evicted.append((slot, gone))
            slots.append(slot)
        return slots, new, evicted


@dataclass(frozen=True)
class SlotField:
    """How one per-device array behaves; its name is the snapshot's array name (keep it stable:
    snapshots written earlier must still load)."""

    name: str
    row_shape: tuple[int, ...]  # one device's row: () for a scalar, (K,) for a vector
    dtype: np.dtype
    initial: float  # a new device's value (and what grown rows hold until a device takes them)
    on_reset: float | None  # the value when the device starts over with warm-up; None: kept
    across_models: bool  # carried over by a hot reload to a model of another shape
    # Added after snapshots were first written: a snapshot without it loads, at ``initial``.
    added_later: bool = False


class SlotArrays:
    """The per-device arrays of one engine, ``[capacity, *row_shape]`` each, by field name.

    Owners (engine, scorer, detector, dynamic threshold) declare their fields and read the
    arrays back by name on every use: :meth:`grow` replaces the arrays, so a reference kept
    across a grow would go stale.
    """

    def __init__(self, capacity: int = 0, max_capacity: int | None = None):
        self.capacity = capacity
        self.max_capacity = max_capacity
        self.fields: dict[str, SlotField] = {}
        self.arrays: dict[str, np.ndarray] = {}

    def declare(self, name: str, row_shape: tuple[int, ...] = (), dtype=np.float64, initial: float = 0,
                on_reset: float | None = None, across_models: bool = False,
                added_later: bool = False) -> None:
        if name in self.fields:
            raise ValueError(f"per-device field {name!r} declared twice")
        spec = SlotField(name, tuple(row_shape), np.dtype(dtype), initial, on_reset, across_models,
                         added_later)
        self.fields[name] = spec
        self.arrays[name] = np.full((self.capacity, *spec.row_shape), initial, spec.dtype)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def grow(self, needed: int) -> None:
        """Room for at least ``needed`` slots (doubling, capped at ``max_capacity``)."""
        if needed <= self.capacity:
            return
        cap = max(needed, 2 * self.capacity, 16)
        if self.max_capacity is not None:
            cap = max(min(cap, self.max_capacity), needed)
        for name, spec in self.fields.items():
            extra = np.full((cap - self.capacity, *spec.row_shape), spec.initial, spec.dtype)
            self.arrays[name] = np.concatenate([self.arrays[name], extra])
        self.capacity = cap

    def reset(self, slots, names: Iterable[str] | None = None) -> None:
        """Start these slots over: every field (of ``names``, default all) with an ``on_reset``."""
        for name in self.fields if names is None else names:
            value = self.fields[name].on_reset
            if value is not None:
                self.arrays[name][slots] = value

    def initialize(self, slots) -> None:
        """A new device in these slots: every field at its initial value."""
        for name, spec in self.fields.items():
            self.arrays[name][slots] = spec.initial

    # -- snapshots and reloads ----------------------------------------------------------------

    def export(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """Every field's rows of ``slots``, by name: what a snapshot carries."""
        return {name: a[slots] for name, a in self.arrays.items()}

    def check_fits(self, saved: dict[str, np.ndarray], rows: int) -> None:
        """Raises ValueError unless ``saved`` has every field (those ``added_later`` may be
        missing), ``rows`` rows of the right shape."""
        for name, spec in self.fields.items():
            a = saved.get(name)
            if a is None and spec.added_later:
                continue
            if a is None or a.shape[1:] != spec.row_shape or len(a) != rows:
                raise ValueError(f"snapshot array {name!r} does not fit this model")

    def load(self, slots: np.ndarray, saved: dict[str, np.ndarray]) -> None:
        """The rows of ``slots`` from ``saved`` (checked by :meth:`check_fits`); a field added
        after the snapshot was written starts at its initial value."""
        for name, spec in self.fields.items():
            self.arrays[name][slots] = saved.get(name, spec.initial)

    def carry_from(self, old: SlotArrays, rows: int, same_shape: bool) -> None:
        """Copy the first ``rows`` slots of ``old`` (the arrays of the previous model): every field
        when the models have the same shape, else only those declared ``across_models``."""
        self.grow(rows)
        for name, spec in self.fields.items():
            before = old.arrays.get(name)
            if before is None or not (same_shape or spec.across_models):
                continue
            if before.shape[1:] == spec.row_shape:
                self.arrays[name][:rows] = before[:rows]


__all__ = ["DeviceTable", "SlotArrays", "SlotField"]
