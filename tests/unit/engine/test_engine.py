"""The streaming engine with a really trained int8 model, no broker: faults, warm-up, bad input, many devices.

Test streams come from the simulator with other seeds than the training data, so
the model sees pumps it was not trained on (same physics, other parameters).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from faultwatch.export.build import TOLERANCE
from faultwatch.runtime.devtools.simulator import CHANNELS, Fault, SimData, simulate, write_csv
from faultwatch.runtime.engine.engine import Engine, EngineSettings, Output, Reading
from faultwatch.runtime.engine.model import StepModel
from faultwatch.runtime.offline.replay import replay_csv
from model_fixtures import TrainedModels

CH = {name: i for i, name in enumerate(CHANNELS)}
VALVE_CHANNELS = {"flow_rate", "pressure", "current"}


@pytest.fixture(scope="module")
def int8(trained: TrainedModels) -> StepModel:
    return StepModel(trained.int8)


@pytest.fixture(scope="module")
def fp32(trained: TrainedModels) -> StepModel:
    return StepModel(trained.fp32)


def readings_of(data: SimData, devices: Sequence[str] | None = None) -> list[Reading]:
    """Time-major readings (copies of the values), optionally of some devices only."""
    keep = set(devices or data.devices)
    return [Reading(device, ts, values.copy()) for ts, device, values, _ in data.rows() if device in keep]


def run(engine: Engine, readings: list[Reading], chunk: int = 64) -> list[Output | None]:
    """Feed readings in daemon-sized micro-batches."""
    out: list[Output | None] = []
    for start in range(0, len(readings), chunk):
        out += engine.process(readings[start:start + chunk])
    return out


def events(outputs, device: str | None = None, state: str | None = None):
    return [o.event for o in outputs if o is not None and o.event is not None
            and (device is None or o.device == device) and (state is None or o.event.state == state)]


# -- faults --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_valve_closure_raises_a_fault_on_the_faulty_device_only(int8: StepModel, seed: int):
    fault = Fault("valve_closure", "pump-000", start=500, duration=120)
    data = simulate(devices=3, steps=800, seed=seed, faults=[fault])
    engine = Engine(int8)
    outputs = run(engine, readings_of(data))
    assert all(o is not None for o in outputs)

    t0, period = data.timestamps[0], data.period_s
    window_start, window_end = t0 + fault.start * period, t0 + (fault.start + fault.duration) * period
    raised = events(outputs, "pump-000", "raised")
    assert raised, f"no fault raised for {fault}"
    for event in raised:
        assert window_start <= event.ts < window_end, (event.ts - t0) / period
    first = raised[0]
    assert first.ts < window_start + 20 * period  # the valve closes over 5 steps: found at once
    assert first.device == "pump-000" and first.started_ts == first.ts
    assert first.peak_score > first.threshold > 0  # the device's threshold at the raise (per device)
    # Nothing anywhere else: not on the clean pumps, not on the faulty one before or well after.
    assert events(outputs, "pump-001") == [] and events(outputs, "pump-002") == []
    assert engine.counters["faults_raised"] == len(raised)
    # One clear per raise, and the episode is over by the end of the stream.
    cleared = events(outputs, "pump-000", "cleared")
    assert len(cleared) == len(raised)
    assert all(window_start < e.ts for e in cleared)
    last = [o for o in outputs if o.device == "pump-000"][-1]
    assert not last.fault_active


def test_fault_event_names_the_channels_that_drove_the_score(int8: StepModel):
    fault = Fault("valve_closure", "pump-000", start=400, duration=100)
    data = simulate(devices=1, steps=520, seed=3, faults=[fault])
    engine = Engine(int8, EngineSettings(top_channels=3))
    outputs = run(engine, readings_of(data))
    raised = events(outputs, "pump-000", "raised")
    assert raised
    event = raised[0]
    top = event.top_channels
    assert 1 <= len(top) <= 3
    assert top[0]["channel"] in VALVE_CHANNELS, top
    shares = [c["share"] for c in top]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0 + 1e-3
    step = round(float(event.ts - data.timestamps[0]) / data.period_s)
    for c in top:
        # The reading is the real value at the raising step; the forecast is what the model expected.
        assert c["reading"] == pytest.approx(data.values[0, step, CH[c["channel"]]], rel=1e-9)
        assert np.isfinite(c["forecast"]) and c["forecast"] != c["reading"]
    # A closing valve lowers the flow: the model expected more than it got.
    flow = [c for c in top if c["channel"] == "flow_rate"]
    if flow:
        assert flow[0]["reading"] < flow[0]["forecast"]


def test_clean_stream_raises_no_fault(int8: StepModel):
    data = simulate(devices=4, steps=900, seed=4)
    engine = Engine(int8)
    outputs = run(engine, readings_of(data))
    assert events(outputs) == []
    assert engine.counters["faults_raised"] == 0
    assert not any(o.fault_active for o in outputs)
    scores = np.array([o.score for o in outputs])
    assert np.isfinite(scores).all() and (scores >= 0).all()
    # Anomalous flags on normal data are rare, or the threshold means nothing.
    assert np.mean([o.anomalous for o in outputs]) < 0.01


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


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_one_call_for_many_devices_equals_one_reading_per_call(trained: TrainedModels, quantize: str):
    model = StepModel(trained.model(quantize))
    data = simulate(devices=6, steps=60, seed=11)
    readings = readings_of(data)
    batched = Engine(model).process(readings)  # one call, 60 rounds of 6 devices
    small = run(Engine(model, EngineSettings(max_batch=4)), readings, chunk=25)
    single_engine = Engine(model)
    single = [single_engine.process([r])[0] for r in readings]
    # int8 quantizes activations over the whole batch: close, not bit-equal (see test_export).
    atol = np.asarray(model.contract.scaler.scale)[list(model.contract.target_index)] * (
        1e-6 if quantize == "none" else TOLERANCE["int8"] / 10)
    for outs in (batched, small):
        for got, want in zip(outs, single, strict=True):
            assert (got.device, got.ts) == (want.device, want.ts)
            assert np.all(np.abs(got.forecast - want.forecast) <= atol)
            assert got.score == pytest.approx(want.score, rel=0.05, abs=0.05)
            assert got.anomalous == want.anomalous and got.fault_active == want.fault_active


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


# -- replay --------------------------------------------------------------------------------


def test_replay_writes_one_row_per_input_row(trained: TrainedModels, tmp_path: Path):
    fault = Fault("valve_closure", "pump-001", start=150, duration=60)
    data = simulate(devices=2, steps=250, seed=14, faults=[fault])
    source = tmp_path / "readings.csv"
    write_csv(data, source)
    lines = source.read_text().splitlines()
    lines.append(lines[20])  # a repeated reading: dropped by the engine, still a row
    source.write_text("\n".join(lines) + "\n")
    n_rows = len(lines) - 1

    out = tmp_path / "scores.csv"
    summary = replay_csv(trained.int8, source, out)
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_rows == summary["readings"]
    assert summary["devices"] == 2
    assert summary["counters"]["out_of_order"] == 1
    assert [r["event"] for r in rows].count("dropped") == 1
    targets = StepModel(trained.int8).contract.targets
    assert list(rows[0]) == ["timestamp", "device", *[f"forecast_{t}" for t in targets], "score",
                             "anomalous", "fault", "event", "label"]
    kept = [r for r in rows if r["event"] != "dropped"]
    assert all(np.isfinite(float(r["score"])) for r in kept)
    assert sum(int(r["label"]) for r in rows) == int(data.anomaly.sum()) + int(lines[20].endswith(",1"))
    raised = [r for r in rows if r["event"] == "raised"]
    assert len(raised) == summary["faults_raised"] >= 1
    assert {r["device"] for r in raised} == {"pump-001"}
    assert all(r["label"] == "1" for r in raised)  # raised inside the labelled window
    assert summary["anomalous"] == sum(int(r["anomalous"]) for r in kept)
