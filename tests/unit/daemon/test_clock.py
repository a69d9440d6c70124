"""ClockGuard without a broker: future timestamps, clocks stepped back, readings without ts."""

from __future__ import annotations

import logging
import math

from faultwatch.runtime.daemon.clock import EPSILON_S, ClockGuard, ClockRules, DeviceLog
from faultwatch.runtime.engine.engine import Reading

RULES = ClockRules(max_future_s=300.0, step_back_s=60.0)


def _admit(guard: ClockGuard, readings: list[Reading], received: list[float], last: dict[str, float]):
    kept, restarts = guard.admit(readings, received, lambda d: last.get(d, -math.inf))
    for k, i in enumerate(kept):  # what the engine would step
        r = readings[i]
        if (k, r.device) in restarts:
            last[r.device] = -math.inf
        if r.ts > last.get(r.device, -math.inf):
            last[r.device] = r.ts
    return [readings[i].ts for i in kept]


def test_a_future_ts_is_rejected_and_later_readings_still_step():
    guard, last = ClockGuard(RULES), {}
    assert _admit(guard, [Reading("p", 1000.0, None)], [1000.0], last) == [1000.0]
    assert _admit(guard, [Reading("p", 1000.0 + 86_400, None)], [1001.0], last) == []
    assert _admit(guard, [Reading("p", 1002.0, None)], [1002.0], last) == [1002.0]
    assert last["p"] == 1002.0 and guard.counters["rejected_future_ts"] == 1
    # just inside the limit is accepted
    assert _admit(guard, [Reading("q", 1299.0, None)], [1000.0], last) == [1299.0]


def test_a_clock_stepped_back_beyond_the_tolerance_restarts_the_device():
    guard, last = ClockGuard(RULES), {"p": 10_000.0}
    kept, restart = guard.admit([Reading("p", 10_000.0 - 61, None)], [10_000.0], last.__getitem__)
    assert kept == [0] and restart == [(0, "p")] and guard.counters["clock_step_resets"] == 1
    # within the tolerance it is an out-of-order reading: the engine drops it, no restart
    kept, restart = guard.admit([Reading("p", 10_000.0 - 59, None)], [10_000.0], last.__getitem__)
    assert kept == [0] and restart == []


def test_a_step_back_within_one_batch_restarts_between_its_readings():
    guard, last = ClockGuard(RULES), {"p": 999.0}
    batch = [Reading("p", 1000.0, None), Reading("p", 1001.0, None), Reading("p", 10.0, None),
             Reading("p", 11.0, None)]
    kept, restarts = guard.admit(batch, [1001.0] * 4, last.__getitem__)
    assert kept == [0, 1, 2, 3] and restarts == [(2, "p")]


def test_without_ts_a_device_running_behind_keeps_its_own_clock():
    guard, last = ClockGuard(RULES), {}
    behind = 3600.0  # the device's clock runs an hour behind the daemon's
    stepped = _admit(guard, [Reading("p", 5000.0 - behind, None)], [5000.0], last)
    stepped += _admit(guard, [Reading("p", math.nan, None)], [5001.0], last)
    stepped += _admit(guard, [Reading("p", 5002.0 - behind, None)], [5002.0], last)
    assert stepped == [5000.0 - behind, 5001.0 - behind, 5002.0 - behind]
    assert guard.counters["clock_step_resets"] == 0


def test_without_ts_a_device_never_moves_backwards():
    guard, last = ClockGuard(RULES), {"p": 9000.0}  # e.g. restored from a snapshot
    assert _admit(guard, [Reading("p", math.nan, None)], [8000.0], last) == [9000.0 + EPSILON_S]
    two = _admit(guard, [Reading("p", math.nan, None), Reading("p", math.nan, None)], [8000.0] * 2, last)
    assert two == [9000.0 + 2 * EPSILON_S, 9000.0 + 3 * EPSILON_S]
    # a device that never sends ts: its receive times
    assert _admit(guard, [Reading("n", math.nan, None)], [123.0], last) == [123.0]


def test_device_log_is_rate_limited_per_device_and_bounded(caplog):
    device_log = DeviceLog(every_s=3600.0, max_devices=10)
    with caplog.at_level(logging.WARNING, logger="faultwatch"):
        assert device_log.warn("a", "x") and not device_log.warn("a", "x")
        assert device_log.warn("b", "x")
        for i in range(100):
            device_log.warn(f"flood-{i}", "x")
    assert len(device_log._last) == 10
    assert sum("device a:" in r.message for r in caplog.records) == 1
