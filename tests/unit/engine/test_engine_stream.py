"""The streaming engine on the committed tiny int8 model (no torch, no broker): warm-up, bad input,
many devices, gaps.

The model (tests/data/tiny-int8.onnx, made by tests/data/make_tiny_models.py) is really trained and
exported, only small: these tests check what the engine does with any model's forecasts, not how
good they are (that is test_engine.py's, on a model trained in the session).
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_streams import readings_of
from faultwatch.runtime.devtools.simulator import CHANNELS, simulate
from faultwatch.runtime.engine.engine import Engine, EngineSettings
from faultwatch.runtime.engine.events import Output, Reading
from faultwatch.runtime.engine.model import StepModel

CH = {name: i for i, name in enumerate(CHANNELS)}


@pytest.fixture(scope="module")
def int8(tiny_model: StepModel) -> StepModel:
    return tiny_model


@pytest.fixture(scope="module")
def fp32(tiny_fp32_model: StepModel) -> StepModel:
    return tiny_fp32_model


# -- warm-up -------------------------------------------------------------------------------



def test_no_anomalous_flag_during_warmup_after_a_reset(int8: StepModel):
    warmup = 12
    # A threshold of ~0 flags every scored reading: only warm-up can keep a flag down.
    engine = Engine(int8, EngineSettings(detector={"threshold": 1e-9, "warmup": warmup}))
    data = simulate(devices=1, steps=100, seed=5)
    readings = readings_of(data)
    first = engine.process(readings[:40])
    assert not any(o.anomalous for o in first[:warmup])
    assert all(o.anomalous for o in first[warmup + 1:])  # and the threshold does flag afterwards

    # A long silence resets the device: warm-up again.
    gap = engine.max_gap_s + 10 * data.period_s
    later = [Reading(r.device, r.ts + gap, r.values) for r in readings[40:]]
    second = engine.process(later)
    assert engine.counters["gap_resets"] == 1
    assert not any(o.anomalous for o in second[:warmup])
    assert all(o.anomalous for o in second[warmup + 1:])



def test_warmup_defaults_to_the_model_calibration(int8: StepModel):
    warmup = int8.contract.calibration.warmup
    assert warmup > 0
    engine = Engine(int8, EngineSettings(detector={"threshold": 1e-9}))
    outputs = engine.process(readings_of(simulate(devices=1, steps=warmup + 10, seed=6)))
    assert not any(o.anomalous for o in outputs[:warmup])
    assert any(o.anomalous for o in outputs[warmup:])


# -- bad input -----------------------------------------------------------------------------



def test_out_of_order_and_duplicate_readings_are_dropped_and_counted(int8: StepModel):
    readings = readings_of(simulate(devices=1, steps=12, seed=7))
    clean = Engine(int8).process(readings)

    engine = Engine(int8)
    head = engine.process(readings[:6])
    r = readings
    # Across calls: a repeat of the last timestamp and an older one.
    late = engine.process([r[5], r[2]])
    assert late == [None, None]
    assert engine.counters["out_of_order"] == 2
    # Within one call: a duplicate right after its original, and an older reading.
    mixed = engine.process([r[6], r[6], r[7], r[4], r[8]])
    assert [o is None for o in mixed] == [False, True, False, True, False]
    assert engine.counters["out_of_order"] == 4
    tail = engine.process(r[9:])
    # Dropped readings left no trace: the kept ones equal a clean run exactly.
    kept = head + [o for o in mixed if o is not None] + tail
    assert len(kept) == len(clean)
    for got, want in zip(kept, clean, strict=True):
        assert got.ts == want.ts
        np.testing.assert_array_equal(got.forecast, want.forecast)
        assert got.score == want.score
    assert engine.counters["readings"] == len(clean)



def test_missing_channels_are_imputed_and_marked(int8: StepModel):
    readings = readings_of(simulate(devices=1, steps=40, seed=8))
    engine = Engine(int8)
    before = engine.process(readings[:30])
    holey = readings[30].values.copy()
    holey[[CH["pressure"], CH["flow_rate"]]] = np.nan
    out = engine.process([Reading("pump-000", readings[30].ts, holey)])[0]
    assert out is not None
    assert out.imputed == ("pressure", "flow_rate")  # in feature order
    assert engine.counters["imputed_values"] == 2
    assert np.isfinite(out.forecast).all() and np.isfinite(out.score)
    assert all(o.imputed == () for o in before)

    # Imputed = filled with the forecast made for it: the same as sending that forecast.
    twin = Engine(int8)
    twin.process(readings[:30])
    filled = readings[30].values.copy()
    for name in ("pressure", "flow_rate"):
        filled[CH[name]] = before[-1].forecast[int8.contract.targets.index(name)]
    same = twin.process([Reading("pump-000", readings[30].ts, filled)])[0]
    scale = np.asarray(int8.contract.scaler.scale)
    assert np.all(np.abs(out.forecast - same.forecast) <= 1e-3 * scale), "imputed not from the forecast"
    # ...and the stream goes on normally.
    after = engine.process(readings[31:])
    assert all(o is not None and o.imputed == () and np.isfinite(o.score) for o in after)



def test_a_first_reading_with_missing_channels_is_imputed(int8: StepModel):
    reading = readings_of(simulate(devices=1, steps=1, seed=9))[0]
    values = reading.values.copy()
    values[CH["current"]] = np.nan
    out = Engine(int8).process([Reading("new", reading.ts, values)])[0]
    assert out.imputed == ("current",)
    assert np.isfinite(out.forecast).all() and out.score == 0.0 and not out.anomalous


# -- many devices --------------------------------------------------------------------------



def test_device_cap_evicts_the_least_recently_seen(int8: StepModel):
    data = simulate(devices=4, steps=30, seed=10)
    by_device = {d: readings_of(data, [d]) for d in data.devices}
    a, b, c, d = data.devices
    engine = Engine(int8, EngineSettings(max_devices=3))
    for k in range(10):
        engine.process([by_device[a][k], by_device[b][k], by_device[c][k]])
    engine.process([by_device[a][10]])  # a is now the most recently seen; b the least
    assert engine.counters["devices_evicted"] == 0
    engine.process([by_device[d][0]])
    assert engine.counters["devices_evicted"] == 1
    assert engine.devices == [c, a, d]
    assert len(engine.devices) == 3  # memory bounded by the cap

    # b comes back as a new device: its state was dropped, so it starts from zero like anywhere else.
    back = engine.process([by_device[b][10]])[0]
    fresh = Engine(int8).process([by_device[b][10]])[0]
    np.testing.assert_array_equal(back.forecast, fresh.forecast)
    assert engine.counters["devices_evicted"] == 2
    assert engine.devices == [a, d, b]  # c was the least recently seen this time



def test_one_call_with_more_devices_than_the_cap_equals_one_reading_per_call(fp32: StepModel):
    """A flood of new ids in one call must not take the slot of a device that is in that call.

    fp32, so that batching alone changes nothing (see the int8 note above).
    """
    data = simulate(devices=3, steps=20, seed=12)
    a, b, c = data.devices
    ra, rb, rc = (readings_of(data, [x]) for x in (a, b, c))
    settings = EngineSettings(max_devices=2)
    batched, single = Engine(fp32, settings), Engine(fp32, settings)
    for k in range(10):  # a and b build up state
        batched.process([ra[k], rb[k]])
        single.process([ra[k]])
        single.process([rb[k]])
    got = batched.process([ra[10], rb[10], rc[10]])
    want = [single.process([r])[0] for r in (ra[10], rb[10], rc[10])]
    for g, w in zip(got, want, strict=True):
        assert g is not None and g.device == w.device
        np.testing.assert_allclose(g.forecast, w.forecast, rtol=1e-6,
                                   err_msg=f"{g.device} was stepped from another device's state")
        assert g.score == pytest.approx(w.score, rel=1e-6)
    assert batched.devices == single.devices


# -- gaps ----------------------------------------------------------------------------------



def test_a_long_gap_resets_the_device_state(int8: StepModel):
    data = simulate(devices=1, steps=60, seed=13)
    readings = readings_of(data)
    limit = Engine(int8).max_gap_s
    assert limit == int8.contract.decisions.max_gap_periods * int8.contract.sample_period_s

    def after_pause(pause: float) -> tuple[Engine, Output]:
        engine = Engine(int8)
        engine.process(readings[:50])
        nxt = readings[50]
        return engine, engine.process([Reading(nxt.device, readings[49].ts + pause, nxt.values)])[0]

    fresh = Engine(int8).process([readings[50]])[0]
    long_engine, long_out = after_pause(limit + data.period_s)
    assert long_engine.counters["gap_resets"] == 1
    np.testing.assert_array_equal(long_out.forecast, fresh.forecast)  # from a zero state
    assert long_out.score == 0.0  # no forecast to compare with after a reset

    short_engine, short_out = after_pause(limit / 2)
    assert short_engine.counters["gap_resets"] == 0
    assert not np.array_equal(short_out.forecast, fresh.forecast)  # the state carried on
    assert short_out.score > 0


# -- snapshots -----------------------------------------------------------------------------

#: The per-device arrays of a snapshot, by name and dtype, as daemons have written them since
#: before the fields were declared in one place (runtime/engine/devices.py): still loadable.
SNAPSHOT_DTYPES = {
    "prev_forecast": "float32", "last_scaled": "float32", "has_prev": "bool", "last_ts": "float64",
    "fault_start": "float64", "fault_peak": "float64", "score_smoothed": "float64", "score": "float64",
    "score_seen": "int64", "fault_history": "int64", "fault_normal_run": "int64", "fault_active": "bool",
    "threshold_window": "float32", "threshold_count": "int64", "threshold_value": "float64",
    # Added with the detector in the model; a snapshot written before them still loads
    # (Engine.import_state fills them in).
    "rewarm": "int64", "fault_since_clear": "int64",
}


def test_snapshot_arrays_keep_their_names_and_types(int8: StepModel):
    engine = Engine(int8, EngineSettings(detector={"policy": "dynamic"}))
    engine.process(readings_of(simulate(devices=2, steps=5, seed=40)))
    saved = engine.export_state()
    states = {f"state_{i}": "float32" for i in range(len(int8.state_widths))}
    assert {k: str(v.dtype) for k, v in saved.items() if k != "devices"} == SNAPSHOT_DTYPES | states
    assert all(len(v) == 2 for v in saved.values())
    # Without a dynamic threshold its arrays are not there, and a snapshot with them still fits.
    plain = Engine(int8)
    assert plain.import_state(saved) == 2
    assert "threshold_window" not in plain.export_state()
    # A snapshot from before the detector's arrays existed still loads: nothing to re-warm.
    older = {k: v for k, v in saved.items() if k not in ("rewarm", "fault_since_clear")}
    resumed = Engine(int8)
    assert resumed.import_state(older) == 2
    assert not resumed.per_device["rewarm"][:2].any()


def test_a_reused_slot_starts_from_the_initial_values(int8: StepModel):
    """An evicted device's slot goes to the next new one: nothing of the old device may leak into it."""
    data = simulate(devices=3, steps=40, seed=41)
    a, b, c = data.devices
    engine = Engine(int8, EngineSettings(max_devices=2, detector={"threshold": 1e-9}))
    engine.process(readings_of(data, [a, b]))  # both past warm-up, anomalous (threshold ~0)
    first_c = readings_of(data, [c])[0]
    out = engine.process([first_c])[0]  # evicts a, takes its slot
    fresh = Engine(int8, EngineSettings(detector={"threshold": 1e-9})).process([first_c])[0]
    assert engine.counters["devices_evicted"] == 1
    assert (out.score, out.anomalous, out.fault_active) == (fresh.score, fresh.anomalous, fresh.fault_active)
    np.testing.assert_array_equal(out.forecast, fresh.forecast)


def test_a_snapshot_from_before_the_record_score_loads_with_no_record(int8: StepModel):
    # DetectorSettings.severe_record keeps each device's highest score (FaultDetector's
    # "fault_record"): in the snapshot when on, filled in as "no record yet" when a snapshot
    # written before it is loaded.
    on = EngineSettings(detector={"severe": 2.0, "severe_record": 0.13})
    engine = Engine(int8, on)
    engine.process(readings_of(simulate(devices=2, steps=60, seed=41)))
    saved = engine.export_state()
    assert str(saved["fault_record"].dtype) == "float64" and saved["fault_record"].max() > 0
    older = {k: v for k, v in saved.items() if k != "fault_record"}
    resumed = Engine(int8, on)
    assert resumed.import_state(older) == 2
    assert not resumed.per_device["fault_record"][:2].any()
