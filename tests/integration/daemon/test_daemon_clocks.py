"""Device clocks against the running daemon: a reading from the future, a clock stepped back,
a reading without ts from a device whose clock runs behind. None of them may silence the
device (before, each did, for good: every later reading was dropped as a duplicate, and the
poisoned state survived restarts). Real Mosquitto, real model, subprocess."""

from __future__ import annotations

import json
import re
import time

from daemon_harness import (
    Daemon,
    Publisher,
    as_readings,
    expected_messages,
    forecasts,
    kill_daemons_at_teardown,  # noqa: F401 (the fixture, for this module)
    payload,
    wait_answering,
)
from faultwatch.runtime.devtools.simulator import CHANNELS, simulate
from faultwatch.runtime.engine.engine import Engine
from faultwatch.runtime.engine.model import StepModel
from helpers import MqttRecorder, wait_for

CONFIG = {
    "output": {"forecast_qos": 1, "stats_interval_s": 0.0},
    "engine": {"max_batch": 8},
    "homeassistant": {"discovery": False},
    "metrics": {"listen": ""},
}


def _config(tmp_path, client_id: str) -> dict:
    return CONFIG | {"broker": {"client_id": client_id}, "state_dir": str(tmp_path / "state")}


def final_stats(daemon: Daemon) -> list[dict]:
    """The counters of each clean exit of ``daemon`` (its ``stopping:`` log lines), in order."""
    return [json.loads(s) for s in re.findall(r"stopping: (\{.*\})", daemon.log())]


def _rows(device: str, start: float, steps: int, seed: int):
    data = simulate(devices=1, steps=steps, seed=seed)
    return [(device, round(start + k * data.period_s, 3), data.values[0, k]) for k in range(steps)]


def _answered(recorder: MqttRecorder, device: str) -> list[float]:
    return [body["ts"] for d, body in forecasts(recorder.messages()) if d == device]


def test_a_reading_from_the_future_is_rejected_and_the_device_goes_on(broker, trained, tmp_path):
    rows = _rows("pump-f", time.time() - 100.0, 30, seed=71)
    config = _config(tmp_path, "fw-future")
    with MqttRecorder(broker.host, broker.port, ["faultwatch/+/forecast", "faultwatch/status"]) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config)
        wait_answering(daemon, broker, recorder)
        publisher = Publisher(broker)
        publisher.send_readings(rows[:10])
        publisher.send("sensors/pump-f", payload(time.time() + 86_400.0, rows[10][2]))  # a day ahead
        publisher.send_readings(rows[10:20])
        wait_for(lambda: len(_answered(recorder, "pump-f")) >= 20, timeout=60, message=daemon.log)
        assert daemon.terminate() == 0  # the state on disk is not poisoned either
        daemon.start()
        publisher.send_readings(rows[20:])
        wait_for(lambda: len(_answered(recorder, "pump-f")) >= 30, timeout=90, message=daemon.log)
        assert daemon.terminate() == 0
        publisher.close()
    assert _answered(recorder, "pump-f") == [ts for _, ts, _ in rows]
    log = daemon.log()
    assert "device pump-f: reading rejected: ts" in log and "ahead of its receive time" in log
    assert [run.get("rejected_future_ts", 0) for run in final_stats(daemon)] == [1, 0]
    # ...and the future reading was never stepped: the forecasts are those of the clean stream.
    model = StepModel(trained.int8)
    engine = Engine(model)
    want = expected_messages(engine.process(as_readings(rows)), model.contract.targets, engine.threshold)
    got = [(d, body) for d, body in forecasts(recorder.messages()) if d == "pump-f"]
    assert all(body == want[(d, body["ts"])] for d, body in got)


def test_a_clock_stepped_back_restarts_the_device_instead_of_silencing_it(broker, trained, tmp_path):
    now = time.time()
    before, after = _rows("pump-b", now - 100.0, 15, seed=72), _rows("pump-b", now - 7300.0, 15, seed=73)
    config = _config(tmp_path, "fw-stepback")
    with MqttRecorder(broker.host, broker.port, ["faultwatch/+/forecast", "faultwatch/status"]) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config)
        wait_answering(daemon, broker, recorder)
        publisher = Publisher(broker)
        publisher.send_readings(before + after[:10])  # the device's clock is set back two hours
        wait_for(lambda: len(_answered(recorder, "pump-b")) >= 25, timeout=60, message=daemon.log)
        assert daemon.terminate() == 0
        daemon.start()  # the snapshot holds the new clock, not the old
        publisher.send_readings(after[10:])
        wait_for(lambda: len(_answered(recorder, "pump-b")) >= 30, timeout=90, message=daemon.log)
        assert daemon.terminate() == 0
        publisher.close()
    assert _answered(recorder, "pump-b") == [ts for _, ts, _ in before + after]
    assert "device pump-b: clock stepped back 7" in daemon.log()
    assert [run.get("clock_step_resets", 0) for run in final_stats(daemon)] == [1, 0]


def test_a_reading_without_ts_keeps_a_device_whose_clock_runs_behind(broker, trained, tmp_path):
    rows = _rows("pump-n", time.time() - 3600.0, 20, seed=74)  # its clock: an hour behind
    untimed = json.dumps(dict(zip(CHANNELS, rows[10][2].tolist(), strict=True))).encode()
    config = _config(tmp_path, "fw-nots")
    with MqttRecorder(broker.host, broker.port, ["faultwatch/+/forecast", "faultwatch/status"]) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config)
        wait_answering(daemon, broker, recorder)
        publisher = Publisher(broker)
        publisher.send_readings(rows[:10])  # sent at once: its clock's offset from the receive time
        publisher.send("sensors/pump-n", untimed)  # ...is the same for this one
        publisher.send_readings(rows[11:])
        wait_for(lambda: len(_answered(recorder, "pump-n")) >= 20, timeout=60, message=daemon.log)
        assert daemon.terminate() == 0
        publisher.close()
    got = _answered(recorder, "pump-n")
    assert got[:10] == [ts for _, ts, _ in rows[:10]] and got[11:] == [ts for _, ts, _ in rows[11:]]
    assert rows[9][1] < got[10] < rows[11][1]  # placed in the device's own clock
    (stats,) = final_stats(daemon)
    assert stats.get("clock_step_resets", 0) == 0 and stats.get("dropped_out_of_order", 0) == 0
