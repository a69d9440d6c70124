"""The engine's scoring path on the committed tiny int8 model (no torch): gaps bridged, thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from engine_streams import readings
from faultwatch.runtime.engine.engine import Engine, EngineSettings
from faultwatch.runtime.engine.events import Reading
from faultwatch.runtime.engine.model import StepModel


@pytest.fixture(scope="module")
def int8(tiny_model: StepModel) -> StepModel:
    return tiny_model



def test_a_short_gap_is_bridged_with_the_models_own_forecasts(int8: StepModel):
    rs = readings(60, seed=21)
    gapped = Engine(int8)
    out_a = [gapped.process([r])[0] for r in rs[:30]]
    # Readings 30..32 never come: the engine steps through them on its own forecasts.
    after = gapped.process([rs[33]])[0]
    assert gapped.counters["bridged_readings"] == 3 and gapped.counters["gap_resets"] == 0

    # The same as sending, for each missing reading, the forecast made for it.
    filled = Engine(int8)
    out_b = [filled.process([r])[0] for r in rs[:30]]
    forecast = out_b[-1].forecast
    for r in rs[30:33]:
        forecast = filled.process([Reading(r.device, r.ts, forecast.copy())])[0].forecast
    expected = filled.process([rs[33]])[0]
    scale = np.asarray(int8.contract.scaler.scale)
    assert np.all(np.abs(after.forecast - expected.forecast) <= 1e-4 * scale)
    assert out_a[-1].score == out_b[-1].score
    # Bridging is not a reset: no warm-up, the reading is scored against the bridged forecast.
    assert after.score > 0 and np.isfinite(after.score)



def test_jitter_below_half_a_period_bridges_nothing(int8: StepModel):
    rs = readings(40, seed=22)
    period = int8.contract.sample_period_s
    jittered = [Reading(r.device, r.ts + (0.4 * period if i % 2 else 0.0), r.values)
                for i, r in enumerate(rs)]
    engine = Engine(int8)
    engine.process(jittered)
    assert engine.counters["bridged_readings"] == 0



def test_static_threshold_is_reported_with_every_output(int8: StepModel):
    engine = Engine(int8, EngineSettings(detector={"threshold": 2.5, "policy": "static"}))
    outs = engine.process(readings(20, seed=23))
    assert all(o.threshold == 2.5 for o in outs)



def test_dynamic_threshold_in_the_engine(int8: StepModel):
    dyn = {"policy": "dynamic", "dynamic": {"window": 300, "every": 20, "min_history": 100, "floor": 0.5}}
    engine = Engine(int8, EngineSettings(detector=dyn))
    rs = readings(500, seed=24, devices=2)
    outs = engine.process(rs)
    static = int8.contract.calibration.threshold
    warmup = int8.contract.calibration.warmup
    by_device = {d: [o for o in outs if o.device == d] for d in ("pump-000", "pump-001")}
    for dev_outs in by_device.values():
        thr = np.array([o.threshold for o in dev_outs])
        # The static threshold until enough scores are in; then the device's own, recomputed.
        assert (thr[: warmup + 100] == static).all()
        assert len(np.unique(thr[warmup + 120:])) > 1
        assert (thr >= 0.5 * static - 1e-12).all()
    assert engine.stepper.decider.dynamic.recomputed > 0
    # Its window travels with the device state (snapshots).
    saved = engine.export_state()
    assert {"threshold_window", "threshold_count", "threshold_value"} <= set(saved)
    twin = Engine(int8, EngineSettings(detector=dyn))
    twin.import_state(saved)
    nxt = readings(501, seed=24, devices=2)[-2:]  # one more reading per device
    a, b = engine.process(nxt), twin.process(nxt)
    assert [o.threshold for o in a] == [o.threshold for o in b]


def test_a_severe_reading_raises_on_itself_a_milder_one_waits_for_the_window(int8: StepModel):
    rs = readings(340, seed=40)
    rs[300].values[:] += np.asarray(int8.contract.scaler.scale)  # one reading, one range off

    def raised_at(severe: float) -> tuple[list[int], float]:
        outs = Engine(int8, EngineSettings(detector={"severe": severe})).process(
            [Reading(r.device, r.ts, r.values.copy()) for r in rs])
        return ([i for i, o in enumerate(outs) if o.event and o.event.state == "raised"],
                outs[300].score / outs[300].threshold)

    without, ratio = raised_at(0.0)
    assert without and without[0] > 300 and 4 < ratio < 50  # raise_k of window_n: a few readings later
    assert raised_at(4.0)[0][0] == 300  # far above the threshold: raised on the reading itself
    assert raised_at(50.0)[0] == without  # not far enough above: the window decides, as before


def test_a_spike_like_one_the_device_made_before_waits_for_the_window(int8: StepModel):
    # Two equal one-reading spikes, far apart (the first fault cleared, its cooldown over).
    rs = readings(600, seed=40)
    for i in (300, 520):
        rs[i].values[:] += np.asarray(int8.contract.scaler.scale)

    def raised(record: float) -> list[int]:
        outs = Engine(int8, EngineSettings(detector={"severe": 4.0, "severe_record": record})).process(
            [Reading(r.device, r.ts, r.values.copy()) for r in rs])
        return [i for i, o in enumerate(outs) if o.event and o.event.state == "raised"]

    assert {300, 520} <= set(raised(0.0))  # without the record: each spike raises on itself
    with_record = raised(0.13)
    assert 300 in with_record and 520 not in with_record  # the repeat is not news
    assert any(520 < i < 530 for i in with_record)  # it still raises, by the window, like a milder one
