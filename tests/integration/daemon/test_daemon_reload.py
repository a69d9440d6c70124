"""Hot reload of the model file: a matching model (state kept), a corrupt file (rejected, the
old model goes on), a model with another contract (every device starts over with warm-up).
SIGHUP and the MQTT command topic both trigger it. Forecasts are compared exactly with a
replay through ``runtime.engine`` that swaps models at the same points (``max_batch = 1``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
from daemon_harness import (
    Daemon,
    Publisher,
    as_readings,
    expected_messages,
    forecasts,
    kill_daemons_at_teardown,  # noqa: F401 (the fixture, for this module)
    payload,
    readings_of,
    renamed_feature_model,
)
from faultwatch.runtime.devtools.simulator import CHANNELS, simulate
from faultwatch.runtime.engine.engine import Engine, EngineSettings
from faultwatch.runtime.engine.model import StepModel
from helpers import MqttRecorder, wait_for


def _replace(path: Path, source: Path | bytes) -> None:
    """Put a new model in place the way an operator should: write aside, then rename."""
    tmp = path.with_suffix(".new")
    if isinstance(source, bytes):
        tmp.write_bytes(source)
    else:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def test_hot_reload_matching_corrupt_and_mismatching(broker, trained, tmp_path):
    model_path = tmp_path / "model.onnx"
    shutil.copyfile(trained.int8, model_path)
    renamed = renamed_feature_model(trained.int8, tmp_path / "renamed.onnx")
    data = simulate(devices=2, steps=80, seed=51)
    rows = readings_of(data)
    phases = [rows[:40], rows[40:80], rows[80:120], rows[120:]]
    config = {"broker": {"client_id": "fw-reload"}, "engine": {"max_batch": 1},
              "output": {"forecast_qos": 1, "stats_interval_s": 0.0},
              "reload": {"min_interval_s": 0.0}, "commands": {"enabled": True},
              "metrics": {"listen": "127.0.0.1:0"},
              "homeassistant": {"discovery": False}}
    with MqttRecorder(broker.host, broker.port, ["faultwatch/#"]) as recorder:
        daemon = Daemon(model_path, broker, tmp_path, "daemon", config)
        wait_for(lambda: any(m.payload == b"online" for m in recorder.messages("faultwatch/status")),
                 timeout=90, message=daemon.log)
        publisher = Publisher(broker)

        def run_phase(phase) -> None:
            before = len(forecasts(recorder.messages()))
            publisher.send_readings(phase)
            publisher.wait()
            wait_for(lambda: len(forecasts(recorder.messages())) >= before + len(phase), timeout=60,
                     message=daemon.log)

        def reload(how: str, n: int) -> dict:
            if how == "signal":
                daemon.signal(signal.SIGHUP)
            else:
                publisher.send("faultwatch/command/reload", b"")
            wait_for(lambda: len(recorder.messages("faultwatch/reload")) >= n, timeout=60, message=daemon.log)
            return json.loads(recorder.messages("faultwatch/reload")[n - 1].payload)

        # The first phase can only start once the daemon is subscribed: resend until answered.
        wait_for(lambda: (publisher.send("sensors/probe", payload(1.0e9 + len(publisher.sent),
                                                                   np.ones(len(CHANNELS)))) or
                          any(d == "probe" for d, _ in forecasts(recorder.messages()))),
                 timeout=60, interval=0.3, message=daemon.log)
        run_phase(phases[0])

        _replace(model_path, trained.fp32)  # same contract: state kept
        result = reload("signal", 1)
        assert result["ok"] and result["state"] == "kept"
        assert result["sha256"] == StepModel(trained.fp32).sha256
        run_phase(phases[1])

        _replace(model_path, b"\x08\x07garbage, not an onnx file")  # rejected, fp32 goes on
        result = reload("command", 2)
        assert result["ok"] is False and "not a loadable ONNX model" in result["error"]
        assert daemon.alive()
        run_phase(phases[2])

        _replace(model_path, renamed)  # another contract: devices start over
        result = reload("command", 3)
        assert result["ok"] and result["state"] == "reset"
        run_phase(phases[3])

        assert daemon.metric("faultwatch_reloads_total", 'result="kept"') == 1
        assert daemon.metric("faultwatch_reloads_total", 'result="failed"') == 1
        assert daemon.metric("faultwatch_reloads_total", 'result="reset"') == 1
        assert daemon.terminate() == 0
        publisher.close()
        got = {(d, b["ts"]): b for d, b in forecasts(recorder.messages()) if d != "probe"}

    log = daemon.log()
    assert "reload rejected, still running" in log and "Traceback" not in log
    # The same readings and swaps through one engine, step by step.
    settings = EngineSettings(max_batch=1)
    int8, fp32, other = StepModel(trained.int8), StepModel(trained.fp32), StepModel(renamed)
    engine = Engine(int8, settings)
    want = {}

    def replay(phase, model) -> None:
        order = model.contract.features  # the daemon parses each reading for the model it runs
        readings = as_readings([(d, ts, np.array([v[CHANNELS.index(f)] if f in CHANNELS else np.nan
                                                  for f in order])) for d, ts, v in phase])
        want.update(expected_messages(engine.process(readings), model.contract.targets,
                                      model.contract.calibration.threshold))

    replay(phases[0], int8)
    assert engine.swap_model(fp32) is True
    replay(phases[1], fp32)
    replay(phases[2], fp32)
    assert engine.swap_model(other) is False
    replay(phases[3], other)
    assert got == want
    after_reset = [got[(d, ts)] for d, ts, _ in phases[3]]
    assert all(b["imputed"] == ["supply_voltage"] for b in after_reset)  # the renamed channel
    assert after_reset[0]["score"] == 0.0  # warm-up from scratch
