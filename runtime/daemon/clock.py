"""Device clocks: what the daemon makes of a reading's timestamp before the engine steps it.

The engine steps a device's readings in time order and drops one that is not newer than the
last it stepped (a redelivered reading). Left at that, one bad timestamp would silence a
device for good, so the engine thread first puts every reading through :class:`ClockGuard`:

- **Future** — a ``ts`` more than ``input.max_future_s`` ahead of the time the reading was
  received is rejected (counted ``rejected_future_ts``): stepped, it would make every later
  reading look old.
- **Clock stepped back** — a ``ts`` more than the step-back tolerance older than the
  device's last stepped reading means the device's clock was set back (or the state came
  from a poisoned snapshot): the device restarts (state and warm-up) and is stepped from
  that reading on, instead of being dropped for ever. The tolerance is
  ``input.clock_step_tolerance_s``, or, at 0, ``engine.max_gap_periods`` sample periods:
  the same span beyond which a silence forward resets the device.
- **No ts** — a reading without ``ts`` (``NaN`` from the parser) gets its receive time *in
  the device's clock*: the receive time plus the offset seen on the device's last reading
  with a ``ts`` (0 for a device that never sends one), and never earlier than just after
  the device's last reading. A device whose clock runs an hour behind is not moved an hour
  ahead by one reading without ``ts``.

:meth:`ClockGuard.step` runs the engine on what is admitted. Rejected readings, clock resets,
and readings the engine then drops as not newer (with both timestamps) are logged per device,
at most once per ``every_s`` per device.

>>> guard = ClockGuard(ClockRules(max_future_s=300.0, step_back_s=60.0))
>>> last = {"a": 1000.0, "b": 1000.0, "c": 1000.0}.get  # what the engine stepped last
>>> readings = [Reading("a", 99_999.0, None), Reading("b", 500.0, None), Reading("c", math.nan, None)]
>>> kept, restart = guard.admit(readings, [600.0] * 3, lambda d: last(d, -math.inf))
>>> [(readings[i].device, readings[i].ts) for i in kept], restart  # b restarts before kept[0]
([('b', 500.0), ('c', 1000.001)], [(0, 'b')])
>>> guard.counters["rejected_future_ts"], guard.counters["clock_step_resets"]
(1, 1)
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from faultwatch.runtime.daemon.intake import in_time_order
from faultwatch.runtime.engine.engine import Engine, Output, Reading

log = logging.getLogger("faultwatch")

#: A reading without ts is placed at least this long after its device's last one (seconds).
EPSILON_S = 1e-3


@dataclass(frozen=True)
class ClockRules:
    max_future_s: float  # a ts further ahead of its receive time is rejected
    step_back_s: float  # a ts this much older than the device's last stepped one restarts it


class DeviceLog:
    """Warnings about one device at most once per ``every_s`` (the rest counted in the next
    line); at most ``max_devices`` devices remembered, so a flood of IDs can't grow it."""

    def __init__(self, every_s: float = 60.0, max_devices: int = 1000):
        self.every_s = every_s
        self.max_devices = max_devices
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()  # device → (logged at, held)

    def warn(self, device: str, text: str) -> bool:
        now = time.monotonic()
        logged_at, held = self._last.pop(device, (-math.inf, 0))
        if now - logged_at < self.every_s:
            self._last[device] = (logged_at, held + 1)
            return False
        if len(self._last) >= self.max_devices:
            self._last.popitem(last=False)
        self._last[device] = (now, 0)
        more = f" ({held} more since the last such line)" if held else ""
        log.warning("device %s: %s%s (at most one line per %g s per device; all are counted)",
                    device[:200], text, more, self.every_s)
        return True


class ClockGuard:
    """Decides, reading by reading, what each timestamp means (see the module docstring)."""

    def __init__(self, rules: ClockRules, max_devices: int = 10_000, every_s: float = 60.0,
                 counters: Counter | None = None):
        self.rules = rules
        self.max_devices = max_devices
        # device → ts minus receive time of its last reading with a ts: its clock's offset
        self._offset: OrderedDict[str, float] = OrderedDict()
        self.log = DeviceLog(every_s)
        # rejected_future_ts, clock_step_resets, ts_from_receive_time
        self.counters: Counter = Counter() if counters is None else counters

    def admit(self, readings: list[Reading], received: Sequence[float],
              last_ts: Callable[[str], float]) -> tuple[list[int], list[tuple[int, str]]]:
        """(indices of the readings to step, restarts): each restart ``(k, device)`` comes
        between the ``k``-th kept reading and the one before (readings before it, of the same
        batch, belong to the clock before the step).

        ``received``: each reading's receive time (epoch seconds); ``last_ts(device)``: the
        ts the engine last stepped for it (-inf if none). A reading without ts gets one, in
        place (``readings`` is updated).
        """
        kept: list[int] = []
        restart: list[tuple[int, str]] = []
        placed: dict[str, float] = {}  # the latest ts given to a device in this batch
        for i, r in enumerate(readings):
            last = placed.get(r.device, last_ts(r.device))
            if math.isnan(r.ts):
                offset = self._offset.get(r.device, 0.0)
                ts = max(received[i] + offset, last + EPSILON_S)
                readings[i] = Reading(r.device, round(ts, 6), r.values)
                self.counters["ts_from_receive_time"] += 1
            elif r.ts > received[i] + self.rules.max_future_s:
                self.counters["rejected_future_ts"] += 1
                self.log.warn(r.device, f"reading rejected: ts {r.ts:.3f} is {r.ts - received[i]:.0f} s "
                                        f"ahead of its receive time (input.max_future_s = "
                                        f"{self.rules.max_future_s:g})")
                continue
            else:
                self._remember_offset(r.device, r.ts - received[i])
                if last - r.ts > self.rules.step_back_s:
                    restart.append((len(kept), r.device))
                    self.counters["clock_step_resets"] += 1
                    self.log.warn(r.device, f"clock stepped back {last - r.ts:.0f} s (ts {r.ts:.3f}, "
                                            f"last {last:.3f}): device restarted with warm-up")
                    last = -math.inf
            placed[r.device] = max(last, readings[i].ts)
            kept.append(i)
        return kept, restart

    def step(self, engine: Engine, readings: list[Reading], received: Sequence[float]) -> list[Output]:
        """The outputs of ``engine`` for the readings it can take (see :meth:`admit`): devices
        restarted where their clock stepped back, each part in time order; the readings the
        engine then drops (not newer than its last) counted and logged."""
        kept, restarts = self.admit(readings, received, engine.last_ts)
        if len(kept) < len(readings):
            readings = [readings[i] for i in kept]
        outputs: list[Output] = []
        start = 0
        for end, device in restarts:  # a clock stepped back splits the batch where it did
            outputs += self._step(engine, readings[start:end])
            engine.restart(device)
            start = end
        return outputs + self._step(engine, readings[start:])

    def _step(self, engine: Engine, readings: list[Reading]) -> list[Output]:
        readings = in_time_order(readings, [0.0] * len(readings))[0]  # (arrival times: not needed)
        results = engine.process(readings) if readings else []
        outputs = [out for out in results if out is not None]
        if len(outputs) < len(readings):
            self.counters["dropped_out_of_order"] += len(readings) - len(outputs)
            for reading, out in zip(readings, results, strict=True):
                if out is None:
                    last = engine.last_ts(reading.device)
                    self.log.warn(reading.device, f"reading dropped: ts {reading.ts:.3f} is not newer "
                                                  f"than the last stepped ({last:.3f}; a duplicate, or "
                                                  f"out of order)")
        return outputs

    def _remember_offset(self, device: str, offset: float) -> None:
        offsets = self._offset
        if device not in offsets and len(offsets) >= self.max_devices:
            offsets.popitem(last=False)  # bounded: the device known longest goes first
        offsets[device] = offset
