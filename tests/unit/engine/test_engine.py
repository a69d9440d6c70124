"""The streaming engine with an int8 model trained in this session, no broker: faults, batching, replay.

What depends on how well the current training code trains (faults found, nothing raised on clean
pumps) runs here; what any model shows (warm-up, bad input, device cap, gaps) runs on the committed
tiny model in test_engine_stream.py, without torch.

Test streams come from the simulator with other seeds than the training data, so
the model sees pumps it was not trained on (same physics, other parameters).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from engine_streams import readings_of, run
from faultwatch.export.build import TOLERANCE
from faultwatch.runtime.devtools.simulator import CHANNELS, Fault, simulate, write_csv
from faultwatch.runtime.engine.engine import MAX_GAP_PERIODS, Engine, EngineSettings, Reading
from faultwatch.runtime.engine.model import StepModel
from faultwatch.runtime.offline.replay import replay_csv
from model_fixtures import TrainedModels

CH = {name: i for i, name in enumerate(CHANNELS)}
VALVE_CHANNELS = {"flow_rate", "pressure", "current"}


@pytest.fixture(scope="module")
def int8(trained: TrainedModels) -> StepModel:
    return StepModel(trained.int8)


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




# -- many devices --------------------------------------------------------------------------



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



def test_a_reading_30_days_late_resets_even_at_the_largest_bridging_cap(int8: StepModel):
    """Bridging costs one model step per missing reading: it is capped (MAX_GAP_PERIODS), and a
    longer silence resets instead, so one very late reading never stalls the engine (or SIGTERM)."""
    data = simulate(devices=1, steps=20, seed=14)
    readings = readings_of(data)
    engine = Engine(int8, EngineSettings(detector={"max_gap_periods": MAX_GAP_PERIODS}))
    engine.process(readings[:10])
    late = readings[10]
    month = 30 * 86_400.0
    assert month / int8.contract.sample_period_s > MAX_GAP_PERIODS
    out = engine.process([Reading(late.device, readings[9].ts + month, late.values)])[0]
    assert out is not None and engine.counters["gap_resets"] == 1
    assert engine.counters["bridged_readings"] == 0
    with pytest.raises(ValueError, match="max_gap_periods"):
        Engine(int8, EngineSettings(detector={"max_gap_periods": 1e9}))


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
