"""A device's life in the engine beyond its readings: restarted when its clock steps back,
forgotten on request, evicted at the cap with a fault raised (which is then cleared)."""

from __future__ import annotations

import math

import pytest
from faultwatch.runtime.devtools.simulator import Fault, simulate
from faultwatch.runtime.engine.engine import Engine, EngineSettings, Reading
from faultwatch.runtime.engine.model import StepModel
from model_fixtures import TrainedModels


@pytest.fixture(scope="module")
def int8(trained: TrainedModels) -> StepModel:
    return StepModel(trained.int8)


def test_restart_lets_an_older_clock_in_with_warm_up(int8: StepModel):
    data = simulate(devices=1, steps=30, seed=61)
    engine = Engine(int8)
    rows = [Reading("p", float(ts), data.values[0, k]) for k, ts in enumerate(data.timestamps)]
    engine.process(rows[20:])
    assert engine.last_ts("p") == rows[-1].ts and engine.last_ts("nobody") == -math.inf
    assert engine.process(rows[:1]) == [None]  # older: dropped
    engine.restart("p")
    out = engine.process(rows[:1])[0]
    assert out is not None and out.score == 0.0  # stepped, from a fresh state
    assert engine.last_ts("p") == rows[0].ts


def test_forget_frees_the_slot(int8: StepModel):
    data = simulate(devices=1, steps=2, seed=62)
    engine = Engine(int8, EngineSettings(max_devices=2))
    engine.process([Reading(d, float(data.timestamps[0]), data.values[0, 0]) for d in ("a", "b")])
    assert engine.forget("a") and not engine.forget("a")
    engine.process([Reading("c", float(data.timestamps[0]), data.values[0, 0])])
    assert engine.devices == ["b", "c"] and engine.counters["devices_evicted"] == 0


def test_a_device_evicted_with_a_fault_raised_gets_cleared(int8: StepModel):
    fault = Fault("valve_closure", "pump-000", start=150, duration=200)
    data = simulate(devices=1, steps=250, seed=63, faults=[fault])
    engine = Engine(int8, EngineSettings(max_devices=1))
    outs = engine.process([Reading("pump-000", float(ts), data.values[0, k])
                           for k, ts in enumerate(data.timestamps)])
    raised = [o.event for o in outs if o is not None and o.event is not None]
    assert [e.state for e in raised] == ["raised"], raised  # still raised at the end
    engine.process([Reading("newcomer", float(data.timestamps[0]), data.values[0, 0])])
    (cleared,) = engine.evicted_events
    assert (cleared.device, cleared.state, cleared.reason) == ("pump-000", "cleared", "evicted")
    assert cleared.started_ts == raised[0].ts and cleared.ts == float(data.timestamps[-1])
    assert engine.counters["faults_cleared"] == 1
