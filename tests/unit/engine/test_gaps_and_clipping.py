"""Gaps, restarts and wild values are not faults of the other devices, nor of the gap itself.

A short silence is bridged with the model's own forecasts, a long one resets the device; either
way a normal series must raise nothing. A device with a value far outside the training range is stepped
in an onnxruntime call of its own, so it cannot coarsen the int8 forecasts of the devices it
would have shared the call with, and it is anomalous for its own device only.
"""

from __future__ import annotations

import numpy as np
import pytest
from faultwatch.runtime.devtools.simulator import simulate
from faultwatch.runtime.engine.engine import Engine, EngineSettings, Reading
from faultwatch.runtime.engine.model import StepModel
from model_fixtures import TrainedModels

GAPS = (5, 30, 59, 120)  # sample periods of silence; 120 is past max_gap_periods (60): a reset


@pytest.fixture(scope="module")
def int8(trained: TrainedModels) -> StepModel:
    return StepModel(trained.int8)


def _time_major(data, skip: dict[str, range] | None = None) -> list[Reading]:
    skip = skip or {}
    return [Reading(d, ts, v.copy()) for ts, d, v, _ in data.rows() if ts - data.timestamps[0]
            not in skip.get(d, ())]


def _process(engine: Engine, readings: list[Reading], chunk: int = 64) -> list:
    out = []
    for start in range(0, len(readings), chunk):
        out += engine.process(readings[start:start + chunk])
    return out


def test_gaps_of_5_30_59_and_120_periods_in_a_normal_series_raise_no_fault(int8: StepModel):
    data = simulate(devices=len(GAPS), steps=1500, seed=23)
    period = data.period_s
    assert period == int8.contract.sample_period_s
    # Device i misses GAPS[i] readings from reading 700 on, so its next reading comes GAPS[i] + 1
    # periods after the last one: 6, 31, 60 (still bridged: the limit is "more than 60") and 121.
    start = 700 * period
    skip = {d: np.arange(start, start + g * period, period).tolist() for d, g in zip(data.devices, GAPS,
                                                                                   strict=True)}
    whole = Engine(int8)
    assert not [o for o in _process(whole, _time_major(data)) if o.event], "normal data alone raises"

    engine = Engine(int8)
    outputs = _process(engine, _time_major(data, skip))
    raised = [(o.device, o.ts) for o in outputs if o is not None and o.event and o.event.state == "raised"]
    assert raised == []
    assert engine.counters["bridged_readings"] == 5 + 30 + 59
    assert engine.counters["gap_resets"] == 1


def test_resuming_from_a_snapshot_across_a_gap_raises_no_fault(int8: StepModel):
    """A daemon killed between snapshots resumes from an older state, and the readings it had
    stepped since (acknowledged, never redelivered) are a gap: bridged and re-warmed, no fault."""
    data = simulate(devices=4, steps=1200, seed=29)
    readings = _time_major(data)
    n_dev = len(data.devices)
    first = Engine(int8)
    _process(first, readings[:600 * n_dev])
    saved = first.export_state()
    for lost in (10, 30, 55):  # readings per device stepped after the snapshot, then lost
        resumed = Engine(int8)
        assert resumed.import_state(saved) == n_dev
        outputs = _process(resumed, readings[(600 + lost) * n_dev:])
        assert resumed.counters["bridged_readings"] == lost * n_dev
        assert not [o for o in outputs if o is not None and o.event], f"{lost} lost readings raised a fault"


def test_a_wild_value_steps_alone_and_is_anomalous_for_its_device_only(int8: StepModel):
    data = simulate(devices=2, steps=200, seed=31)
    wild, calm = data.devices
    readings = _time_major(data)

    def run(overrides: dict) -> tuple[list, Engine]:
        engine = Engine(int8, EngineSettings(detector=overrides))
        outs = _process(engine, readings[:300])  # 150 readings each, in batches of both devices
        rest = readings[300:]
        for k in range(0, len(rest), 2):  # both devices in one call, the wild one from reading 160
            pair = [Reading(r.device, r.ts, r.values.copy()) for r in rest[k:k + 2]]
            for r in pair:
                if r.device == wild and r.ts - data.timestamps[0] >= 160 * data.period_s:
                    r.values[0] = 1e11
            outs += engine.process(pair)
        return outs, engine

    def forecasts_of(outs: list, device: str) -> np.ndarray:
        return np.stack([o.forecast for o in outs if o.device == device and o.ts - data.timestamps[0]
                         >= 160 * data.period_s])

    clean_outs = _process(Engine(int8), readings, chunk=2)  # both devices in every call, no wild value
    clipped, engine = run({})  # the model's detector: the wild device steps in a call of its own
    unclipped, _ = run({"isolate_k": 1e12, "clip_k": 1e12})  # as before: one call for both
    scale = np.asarray(int8.contract.scaler.scale)[list(int8.contract.target_index)]
    shift_clipped = np.abs(forecasts_of(clipped, calm) - forecasts_of(clean_outs, calm)) / scale
    shift_unclipped = np.abs(forecasts_of(unclipped, calm) - forecasts_of(clean_outs, calm)) / scale
    # Scaled units (training range [0, 1]): the calm device's forecasts move by less than 0.2 % of
    # the range when the wild device steps alone, by ten times more when they share the call.
    assert shift_clipped.max() < 0.002, shift_clipped.max()
    assert shift_unclipped.max() > 10 * shift_clipped.max(), (shift_clipped.max(), shift_unclipped.max())
    assert engine.counters["isolated_steps"] == 40 and engine.counters["clipped_values"] == 40
    after = 160 * data.period_s
    wild_after = [o for o in clipped if o.device == wild and o.ts - data.timestamps[0] >= after]
    calm_after = [o for o in clipped if o.device == calm and o.ts - data.timestamps[0] >= after]
    # Anomalous at once, and a fault raised; (the model then follows the clipped level, so the
    # score need not stay above the threshold for all 40 wild readings).
    assert all(o.anomalous for o in wild_after[:3]) and wild_after[2].fault_active
    assert not any(o.anomalous or o.fault_active for o in calm_after)
