"""The pump simulator: deterministic, plausible, and its faults do what they say."""

from __future__ import annotations

import csv
import doctest
import subprocess
import sys

import numpy as np
import pytest
from faultwatch.runtime.devtools import simulator
from faultwatch.runtime.devtools.simulator import (
    CHANNELS,
    FAULT_KINDS,
    Fault,
    SimData,
    device_ids,
    parse_fault,
    simulate,
    write_csv,
)

CH = {name: i for i, name in enumerate(CHANNELS)}
STEPS = 1200


def with_and_without(fault: Fault, devices: int = 2, seed: int = 7) -> tuple[SimData, SimData]:
    """The same run with and without one fault: the difference is the fault's effect alone."""
    base = simulate(devices=devices, steps=STEPS, seed=seed)
    faulty = simulate(devices=devices, steps=STEPS, seed=seed, faults=[fault])
    return base, faulty


def window_mask(start: int, duration: int, steps: int = STEPS) -> np.ndarray:
    mask = np.zeros(steps, dtype=np.uint8)
    mask[start : start + duration] = 1
    return mask


# --- shape and determinism -------------------------------------------------


def test_shapes_dtypes_and_timestamps():
    data = simulate(devices=3, steps=50, period_s=0.5, start_ts=1000.0)
    assert data.devices == ["pump-000", "pump-001", "pump-002"]
    assert data.values.shape == (3, 50, len(CHANNELS)) and data.values.dtype == np.float64
    assert data.anomaly.shape == (3, 50) and data.anomaly.dtype == np.uint8
    assert not data.anomaly.any()
    np.testing.assert_array_equal(data.timestamps, 1000.0 + 0.5 * np.arange(50))
    assert data.period_s == 0.5
    assert np.isfinite(data.values).all()


def test_same_arguments_give_identical_arrays():
    faults = [parse_fault("valve_closure@pump-001:100+50"), parse_fault("spike@pump-000:20+2")]
    a = simulate(devices=2, steps=300, seed=11, faults=faults)
    b = simulate(devices=2, steps=300, seed=11, faults=faults)
    assert np.array_equal(a.values, b.values)
    assert np.array_equal(a.anomaly, b.anomaly)
    assert np.array_equal(a.timestamps, b.timestamps)


def test_different_seeds_and_devices_differ():
    a = simulate(devices=2, steps=300, seed=0)
    b = simulate(devices=2, steps=300, seed=1)
    for c in range(len(CHANNELS)):
        assert not np.allclose(a.values[:, :, c], b.values[:, :, c])
        assert not np.allclose(a.values[0, :, c], a.values[1, :, c])


def test_device_data_independent_of_device_count_and_run_length():
    small = simulate(devices=2, steps=200, seed=5)
    large = simulate(devices=9, steps=500, seed=5)
    assert np.array_equal(small.values, large.values[:2, :200])


def test_device_ids():
    assert device_ids(0) == []
    assert device_ids(3) == ["pump-000", "pump-001", "pump-002"]
    with pytest.raises(ValueError):
        device_ids(-1)


@pytest.mark.parametrize(
    "kwargs", [{"devices": 0}, {"steps": 0}, {"period_s": 0.0}, {"period_s": float("nan")}]
)
def test_simulate_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        simulate(**kwargs)


def test_simulate_rejects_faults_it_cannot_place():
    with pytest.raises(ValueError, match="pump-005"):
        simulate(devices=2, steps=100, faults=[parse_fault("spike@pump-005:10+2")])
    with pytest.raises(ValueError, match="starts at 100"):
        simulate(devices=2, steps=100, faults=[parse_fault("spike@pump-000:100+2")])


# --- physics ---------------------------------------------------------------


def test_normal_operation_is_in_skab_like_ranges():
    data = simulate(devices=8, steps=3000, seed=2)
    bounds = {
        "accel1_rms": (0.15, 0.35),
        "accel2_rms": (0.15, 0.35),
        "current": (0.3, 4.0),
        "pressure": (-0.3, 1.5),
        "temperature": (60.0, 95.0),
        "thermocouple": (20.0, 33.0),
        "voltage": (215.0, 245.0),
        "flow_rate": (20.0, 140.0),
    }
    for name, (lo, hi) in bounds.items():
        col = data.values[:, :, CH[name]]
        assert lo <= col.min() and col.max() <= hi, name
    # The load cycle really moves the operating point: flow spans tens of l/min.
    flow = data.values[:, :, CH["flow_rate"]]
    assert (flow.max(axis=1) - flow.min(axis=1)).min() > 30.0


def test_channels_are_coupled_through_the_load_cycle():
    v = simulate(devices=1, steps=3000, seed=4).values[0]
    corr = np.corrcoef(v.T)
    assert corr[CH["flow_rate"], CH["current"]] > 0.9
    assert corr[CH["flow_rate"], CH["pressure"]] > 0.9
    assert corr[CH["flow_rate"], CH["accel1_rms"]] > 0.6
    assert corr[CH["voltage"], CH["current"]] < -0.3  # line drop
    # Temperature follows current with a lag: it correlates better a minute later.
    temp, cur = v[:, CH["temperature"]], v[:, CH["current"]]
    lagged = np.corrcoef(temp[60:], cur[:-60])[0, 1]
    assert lagged > np.corrcoef(temp, cur)[0, 1] + 0.2


def test_measurement_noise_is_autocorrelated():
    # White noise would leave residuals around a moving average almost uncorrelated
    # step to step; AR(1) noise leaves them clearly positively correlated.
    v = simulate(devices=1, steps=4000, seed=9).values[0]
    for name in ("accel1_rms", "flow_rate"):
        x = v[:, CH[name]]
        resid = x[5:-5] - np.convolve(x, np.ones(11) / 11, mode="valid")
        assert np.corrcoef(resid[:-1], resid[1:])[0, 1] > 0.3, name


# --- faults ----------------------------------------------------------------


def test_valve_closure_cuts_flow_and_pressure_and_raises_vibration():
    fault = parse_fault("valve_closure@pump-001:500+120")
    base, faulty = with_and_without(fault)
    full = slice(510, 610)  # past the 5-step closing ramp, before reopening
    b, f = base.values[1], faulty.values[1]
    flow_ratio = f[full, CH["flow_rate"]].mean() / b[full, CH["flow_rate"]].mean()
    assert 0.35 < flow_ratio < 0.45  # -60 % at severity 1
    assert f[full, CH["pressure"]].mean() < 0.8 * b[full, CH["pressure"]].mean()
    assert f[full, CH["current"]].mean() < b[full, CH["current"]].mean() - 0.03
    for accel in ("accel1_rms", "accel2_rms"):
        assert f[full, CH[accel]].mean() > b[full, CH[accel]].mean() + 0.015
    np.testing.assert_array_equal(f[:, CH["thermocouple"]], b[:, CH["thermocouple"]])
    np.testing.assert_array_equal(f[:500], b[:500])  # nothing before the fault
    # After the valve reopens only the temperature (thermal lag) still differs.
    after = np.abs(f[620:] - b[620:]).max(axis=0)
    assert after[CH["temperature"]] > 0 and np.delete(after, CH["temperature"]).max() == 0
    np.testing.assert_array_equal(faulty.values[0], base.values[0])  # other device untouched
    np.testing.assert_array_equal(faulty.anomaly[1], window_mask(500, 120))
    assert not faulty.anomaly[0].any()


def test_valve_closure_severity_scales_the_flow_drop():
    drops = []
    for severity in (0.5, 1.0, 1.4):
        base, faulty = with_and_without(
            Fault("valve_closure", "pump-000", 300, 100, None, severity)
        )
        w = slice(310, 390)
        drops.append(1 - faulty.values[0, w, -1].mean() / base.values[0, w, -1].mean())
    assert drops[0] < drops[1] < drops[2]
    assert drops[0] == pytest.approx(0.3, abs=0.05)


def test_bearing_wear_raises_vibration_progressively_and_noisily():
    fault = parse_fault("bearing_wear@pump-000:400+400")
    base, faulty = with_and_without(fault)
    diff = faulty.values[0] - base.values[0]  # [T, C]
    for accel in ("accel1_rms", "accel2_rms"):
        early, late = diff[400:500, CH[accel]], diff[700:800, CH[accel]]
        assert late.mean() > 0.03 and late.mean() > 3 * early.mean() > 0
        assert late.std() > 0.005  # noisier, not just offset
    assert diff[700:800, CH["temperature"]].mean() > 1.0
    untouched = [CH[c] for c in ("current", "pressure", "thermocouple", "voltage", "flow_rate")]
    assert not diff[:, untouched].any()
    assert not diff[:400].any()
    np.testing.assert_array_equal(faulty.anomaly[0], window_mask(400, 400))


def test_stuck_sensor_freezes_the_channel():
    fault = parse_fault("stuck_sensor@pump-000:300+200:pressure")
    base, faulty = with_and_without(fault)
    b, f = base.values[0], faulty.values[0]
    stuck = f[300:500, CH["pressure"]]
    assert np.all(stuck == b[299, CH["pressure"]])  # the last good reading, held
    assert np.ptp(b[300:500, CH["pressure"]]) > 0.1  # the real pressure kept moving
    np.testing.assert_array_equal(
        np.delete(f, CH["pressure"], axis=1), np.delete(b, CH["pressure"], axis=1)
    )
    np.testing.assert_array_equal(f[500:], b[500:])
    np.testing.assert_array_equal(faulty.anomaly[0], window_mask(300, 200))


def test_stuck_sensor_defaults_to_flow_rate():
    base, faulty = with_and_without(parse_fault("stuck_sensor@pump-001:0+50"))
    assert np.all(faulty.values[1, :50, CH["flow_rate"]] == base.values[1, 0, CH["flow_rate"]])


def test_spike_adds_a_short_large_jump_scaled_by_severity():
    base, faulty = with_and_without(parse_fault("spike@pump-001:300+3:current*2"))
    diff = faulty.values[1] - base.values[1]
    np.testing.assert_allclose(diff[300:303, CH["current"]], 3.0)  # 2 x 1.5 A
    diff[300:303, CH["current"]] = 0
    assert not diff.any()
    np.testing.assert_array_equal(faulty.anomaly[1], window_mask(300, 3))


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_label_window_is_clipped_at_the_end_of_the_run(kind):
    data = simulate(steps=100, faults=[Fault(kind, "pump-000", 90, 50)])
    np.testing.assert_array_equal(data.anomaly[0], window_mask(90, 50, steps=100))


def test_rows_are_time_major_then_device():
    data = simulate(devices=3, steps=4, faults=[parse_fault("spike@pump-002:1+1")])
    rows = list(data.rows())
    assert [(ts, dev) for ts, dev, _, _ in rows[:4]] == [
        (data.timestamps[0], "pump-000"),
        (data.timestamps[0], "pump-001"),
        (data.timestamps[0], "pump-002"),
        (data.timestamps[1], "pump-000"),
    ]
    assert len(rows) == 12
    ts, dev, values, flag = rows[5]
    assert (ts, dev, flag) == (data.timestamps[1], "pump-002", 1)
    np.testing.assert_array_equal(values, data.values[2, 1])


# --- parse_fault -----------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("valve_closure@pump-000:600+120", Fault("valve_closure", "pump-000", 600, 120)),
        ("spike@pump-001:300+3:current*2", Fault("spike", "pump-001", 300, 3, "current", 2.0)),
        ("spike@pump-001:300+3", Fault("spike", "pump-001", 300, 3, "current")),
        ("stuck_sensor@p7:0+10", Fault("stuck_sensor", "p7", 0, 10, "flow_rate")),
        ("stuck_sensor@pump-002:5+10:voltage", Fault("stuck_sensor", "pump-002", 5, 10, "voltage")),
        ("bearing_wear@pump-003:10+500*0.5", Fault("bearing_wear", "pump-003", 10, 500, None, 0.5)),
    ],
)
def test_parse_fault_valid(spec, expected):
    assert parse_fault(spec) == expected


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("", "@DEVICE"),
        ("spike", "@DEVICE"),
        ("spike@:1+2", "@DEVICE"),
        ("spike@pump-000", "START+DURATION"),
        ("spike@pump-000:5", "START+DURATION"),
        ("leak@pump-000:1+2", "unknown fault kind 'leak'"),
        ("spike@pump-000:-1+2", "start must be a non-negative integer"),
        ("spike@pump-000:1+-2", "duration must be a non-negative integer"),
        ("spike@pump-000:1.5+2", "start must be"),
        ("spike@pump-000:1+0", "duration must be >= 1"),
        ("spike@pump-000:1+2:noise", "unknown channel 'noise'"),
        ("valve_closure@pump-000:1+2:current", "takes no channel"),
        ("spike@pump-000:1+2*0", "severity must be finite and > 0"),
        ("spike@pump-000:1+2*-1", "severity must be finite and > 0"),
        ("spike@pump-000:1+2*nan", "severity must be finite and > 0"),
        ("spike@pump-000:1+2*big", "severity must be a number"),
    ],
)
def test_parse_fault_invalid(spec, complaint):
    with pytest.raises(ValueError) as info:
        parse_fault(spec)
    message = str(info.value)
    assert complaint in message and "\n" not in message
    assert repr(spec) in message  # the user sees which spec was wrong


def test_fault_validates_when_built_directly():
    with pytest.raises(ValueError, match="start must be >= 0"):
        Fault("spike", "pump-000", -1, 3)
    with pytest.raises(ValueError, match="must be an integer"):
        Fault("spike", "pump-000", 1.5, 3)  # type: ignore[arg-type]


# --- CSV -------------------------------------------------------------------


def test_write_csv_round_trips(tmp_path):
    faults = [parse_fault("valve_closure@pump-001:3+4")]
    data = simulate(devices=2, steps=10, period_s=0.25, faults=faults, start_ts=1_700_000_000.5)
    path = tmp_path / "sim.csv"
    write_csv(data, path)

    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["timestamp", "device", *CHANNELS, "anomaly"]
    body = rows[1:]
    assert len(body) == 20
    assert rows[1][0] == "2023-11-14T22:13:20.500"
    assert [r[1] for r in body[:4]] == ["pump-000", "pump-001", "pump-000", "pump-001"]

    stamps = np.array([r[0] for r in body], dtype="datetime64[ms]")
    expected = (np.repeat(data.timestamps, 2) * 1000).round().astype("int64")
    np.testing.assert_array_equal(stamps.astype("int64"), expected)

    values = np.array([r[2:-1] for r in body], dtype=float).reshape(10, 2, len(CHANNELS))
    np.testing.assert_allclose(values.transpose(1, 0, 2), data.values, rtol=1e-5)
    anomaly = np.array([r[-1] for r in body], dtype=int).reshape(10, 2).T
    np.testing.assert_array_equal(anomaly, data.anomaly)

    # numpy's own reader agrees on the numeric columns.
    table = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
    np.testing.assert_allclose(table["flow_rate"], data.values[:, :, -1].T.ravel(), rtol=1e-5)


# --- hygiene ---------------------------------------------------------------


def test_module_docstring_example_runs():
    result = doctest.testmod(simulator)
    assert result.attempted > 0 and result.failed == 0


def test_imports_neither_torch_nor_paho():
    code = (
        "import sys, faultwatch.runtime.devtools.simulator; "
        "bad = [m for m in ('torch', 'paho') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
