"""No reading lost: the daemon killed with SIGKILL mid-stream, the broker stopped mid-stream,
a restart that sees readings it already processed. Real Mosquitto, real int8 model, the
daemon as a subprocess.

Forecasts are compared exactly with a replay through ``runtime.engine``: the daemon runs
with ``engine.max_batch = 1`` here, so every model step has the same batch (1) in both,
and the int8 model's dynamic quantization, which depends on the batch, computes the same.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from daemon_harness import (
    Daemon,
    PersistentRecorder,
    Publisher,
    answered,
    as_readings,
    expected_messages,
    forecasts,
    kill_daemons_at_teardown,  # noqa: F401 (the fixture, for this module)
    payload,
    readings_of,
    wait_answering,
)
from faultwatch.runtime.daemon.config import parse_config
from faultwatch.runtime.daemon.daemon import engine_settings
from faultwatch.runtime.devtools.simulator import simulate
from faultwatch.runtime.engine.engine import Engine
from faultwatch.runtime.engine.model import StepModel
from helpers import MqttRecorder, wait_for


def _config(tmp_path: Path, client_id: str, **extra) -> dict:
    config = {
        "state_dir": str(tmp_path / "state"),
        "snapshot_interval_s": 1.0,
        "broker": {"client_id": client_id, "session_expiry_s": 600, "reconnect_min_s": 0.2,
                   "reconnect_max_s": 1.0},
        "output": {"forecast_qos": 1, "stats_interval_s": 0.0},
        "engine": {"max_batch": 1},
        "homeassistant": {"discovery": False},
        "metrics": {"listen": ""},
    }
    for section, values in extra.items():
        config[section] = config.get(section, {}) | values
    return config


def _settings(config: dict):
    from daemon_harness import toml

    return engine_settings(parse_config(toml(config)))


def _stream(broker, rows, rate: float) -> tuple[threading.Thread, Publisher]:
    """Publish ``rows`` at QoS 1 from a thread, ``rate`` readings a second."""
    publisher = Publisher(broker)

    def run() -> None:
        start = time.monotonic()
        for i, (device, ts, values) in enumerate(rows):
            publisher.send(f"sensors/{device}", payload(ts, values))
            delay = start + (i + 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the stream, not waiting on a condition

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, publisher


def test_sigkill_mid_stream_loses_nothing_and_resumes_from_the_snapshot(broker, trained, tmp_path):
    data = simulate(devices=3, steps=300, seed=31)
    rows = readings_of(data)
    config = _config(tmp_path, "fw-kill")
    state_file = tmp_path / "state" / "state.npz"
    with MqttRecorder(broker.host, broker.port, ["faultwatch/+/forecast", "faultwatch/status"]) as recorder:
        first = Daemon(trained.int8, broker, tmp_path, "first", config)
        wait_answering(first, broker, recorder)
        stream, publisher = _stream(broker, rows, rate=150)

        def data_answered() -> int:
            return len({k for k in answered(recorder.messages()) if k[0] != "probe"})

        wait_for(lambda: data_answered() >= 200, timeout=60, message=lambda: first.log())
        mtime = state_file.stat().st_mtime_ns
        wait_for(lambda: state_file.stat().st_mtime_ns != mtime, timeout=30, message="no new snapshot")
        assert stream.is_alive(), "the stream ended before the kill: make it longer"
        first.kill()
        snapshot = dict(np.load(state_file, allow_pickle=False))
        # The broker sends the last will once it has handled everything the dead daemon sent.
        wait_for(lambda: any(m.payload == b"offline" for m in recorder.messages("faultwatch/status")),
                 timeout=60, message="no last will")
        split = next(i for i, m in enumerate(recorder.messages()) if m.payload == b"offline")

        second = Daemon(trained.int8, broker, tmp_path, "second", config)
        stream.join(timeout=60)
        publisher.wait()
        wanted = {(d, ts) for d, ts, _ in rows}
        wait_for(lambda: wanted <= answered(recorder.messages()), timeout=120,
                 message=lambda: f"{len(wanted - answered(recorder.messages()))} readings unanswered:\n"
                                 f"{second.log()}")
        assert second.terminate() == 0
        publisher.close()
        messages = recorder.messages()

    model = StepModel(trained.int8)
    settings = _settings(config)
    targets, threshold = model.contract.targets, model.contract.calibration.threshold
    before = [(d, b) for d, b in forecasts(messages[:split]) if d != "probe"]
    after = [(d, b) for d, b in forecasts(messages[split:]) if d != "probe"]
    assert before and after

    # 1. Before the kill: exactly what an uninterrupted run says.
    whole = expected_messages(Engine(model, settings).process(as_readings(rows)), targets, threshold)
    for device, body in before:
        assert body == whole[(device, body["ts"])]

    # 2. The snapshot is the uninterrupted run's state at the snapshot point.
    devices = [str(d) for d in snapshot["devices"]]
    upto = {d: float(snapshot["last_ts"][devices.index(d)]) for d in data.devices}
    assert all(data.timestamps[0] < t < data.timestamps[-1] for t in upto.values()), upto
    replay = Engine(model, settings)
    replay.process(as_readings([r for r in rows if r[1] <= upto[r[0]]]))
    mine = replay.export_state()
    mine_devices = [str(d) for d in mine["devices"]]
    for name, array in mine.items():
        if name == "devices":
            continue
        for d in data.devices:
            np.testing.assert_array_equal(snapshot[name][devices.index(d)], array[mine_devices.index(d)],
                                          err_msg=f"{name} of {d}")

    # 3. After the restart: a reading already in the snapshot is never answered again...
    assert not [(d, b["ts"]) for d, b in after if b["ts"] <= upto[d]]
    # ...and the forecasts continue from the restored state: the replay from the snapshot point,
    # fed the readings the second daemon processed, in its order, says exactly the same.
    by_key = {(d, ts): v for d, ts, v in rows}
    resumed = Engine(model, settings)
    resumed.import_state(snapshot)
    outs = resumed.process(as_readings([(d, b["ts"], by_key[(d, b["ts"])]) for d, b in after]))
    assert all(o is not None for o in outs)
    expected = expected_messages(outs, targets, threshold)
    for device, body in after:
        assert body == expected[(device, body["ts"])]
    # Readings answered twice (processed by the first daemon after its last snapshot, or
    # never acknowledged) are the at-least-once part; everything was answered at least once.
    assert {(d, b["ts"]) for d, b in before + after} == {(d, ts) for d, ts, _ in rows}
    assert "restored the state of" in second.log()


def test_broker_stopped_and_restarted_mid_stream_loses_nothing(broker, trained, tmp_path):
    data = simulate(devices=3, steps=200, seed=32)
    rows = readings_of(data)
    config = _config(tmp_path, "fw-broker-restart", engine={"max_batch": 64})
    with PersistentRecorder(broker, ["faultwatch/#"], client_id="recorder-restart") as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config)
        wait_answering(daemon, broker, recorder)
        stream, publisher = _stream(broker, rows, rate=120)
        wait_for(lambda: len(answered(recorder.messages())) >= 100, timeout=60, message=daemon.log)
        broker.stop()  # SIGTERM: Mosquitto saves sessions, retained and queued messages
        wait_for(lambda: "disconnected from broker" in daemon.log(), timeout=30, message=daemon.log)
        broker.start()
        stream.join(timeout=120)
        publisher.wait(timeout=120)  # paho kept and resent what the dead broker never acknowledged
        wanted = {(d, ts) for d, ts, _ in rows}
        wait_for(lambda: wanted <= answered(recorder.messages()), timeout=120,
                 message=lambda: f"unanswered: {sorted(wanted - answered(recorder.messages()))[:20]}\n"
                                 f"{daemon.log()}")
        assert daemon.alive()
        assert daemon.terminate() == 0
        publisher.close()
    log = daemon.log()
    assert log.count("connected to 127.0.0.1") == 2 and "session present: True" in log
    # Each device's forecasts are in time order, each reading answered once or (redelivered) twice.
    for device in data.devices:
        stamps = [b["ts"] for d, b in forecasts(recorder.messages()) if d == device]
        assert sorted(set(stamps)) == sorted({ts for d, ts, _ in rows if d == device})


def test_a_restart_recognises_readings_it_already_processed(broker, trained, tmp_path):
    data = simulate(devices=2, steps=40, seed=33)
    rows = readings_of(data)
    config = _config(tmp_path, "fw-dupes", output={"stats_interval_s": 0.2})
    with MqttRecorder(broker.host, broker.port, ["faultwatch/#"]) as recorder:
        first = Daemon(trained.int8, broker, tmp_path, "first", config)
        wait_answering(first, broker, recorder)
        publisher = Publisher(broker)
        publisher.send_readings(rows[:60])
        wait_for(lambda: len(answered(recorder.messages())) >= 61, timeout=60, message=first.log)
        assert first.terminate() == 0  # SIGTERM: the state snapshot is written
        count = len(recorder.messages())

        second = Daemon(trained.int8, broker, tmp_path, "second", config)
        publisher.send_readings(rows[50:])  # ten it has seen, then new ones
        publisher.wait()
        wanted = {(d, ts) for d, ts, _ in rows}
        wait_for(lambda: wanted <= answered(recorder.messages()), timeout=60, message=second.log)
        again = [(d, b["ts"]) for d, b in forecasts(recorder.messages()[count:]) if d != "probe"]
        assert len(again) == len(rows) - 60 and set(again) == {(d, ts) for d, ts, _ in rows[60:]}
        wait_for(lambda: '"dropped_out_of_order": 10' in second.log(), timeout=30, message=second.log)
        assert second.terminate() == 0
        publisher.close()
    # And the new readings continue the first daemon's state, as one uninterrupted run would.
    model = StepModel(trained.int8)
    whole = expected_messages(Engine(model, _settings(config)).process(as_readings(rows)),
                              model.contract.targets, model.contract.calibration.threshold)
    for device, body in forecasts(recorder.messages()[count:]):
        if device != "probe":
            assert body == whole[(device, body["ts"])]


def test_readings_held_at_the_broker_are_stepped_in_time_order_whatever_order_they_came_in(
        broker, trained, tmp_path):
    # A broker resuming a session may send a newer reading before an older one it resends (seen
    # with Mosquitto 2.0 after its own restart); here the device itself published out of order
    # while the daemon was away. Either way the daemon gets them in one burst when it returns.
    data = simulate(devices=1, steps=12, seed=33)
    rows = [("late-pump", ts, values) for _, ts, values in readings_of(data)]
    shuffled = [rows[i] for i in (9, 4, 0, 11, 7, 1, 2, 10, 3, 8, 5, 6)]
    config = _config(tmp_path, "fw-reorder", engine={"max_batch": 64}, input={"reorder_window_s": 3.0})
    with MqttRecorder(broker.host, broker.port, ["faultwatch/+/forecast", "faultwatch/status"]) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config)
        wait_answering(daemon, broker, recorder)
        assert daemon.terminate() == 0  # its session, with the subscription, stays at the broker
        publisher = Publisher(broker)
        publisher.send_readings(shuffled)
        publisher.wait()
        daemon.start()
        wanted = {(d, ts) for d, ts, _ in rows}
        wait_for(lambda: wanted <= answered(recorder.messages()), timeout=60,
                 message=lambda: f"unanswered: {sorted(wanted - answered(recorder.messages()))}\n"
                                 f"{daemon.log()}")
        got = [(d, body) for d, body in forecasts(recorder.messages()) if d == "late-pump"]
        assert [body["ts"] for _, body in got] == [ts for _, ts, _ in rows]  # stepped in time order
        engine = Engine(StepModel(trained.int8), _settings(config))
        want = expected_messages(engine.process(as_readings(rows)), engine.contract.targets, engine.threshold)
        assert all(body == want[(d, body["ts"])] for d, body in got)
        assert daemon.terminate() == 0
        publisher.close()


def test_right_after_a_resume_a_newer_reading_waits_for_an_older_one_resent_after_it(
        broker, trained, tmp_path):
    # The broker's race after a restart, played by hand: the newer reading reaches the daemon
    # first, the older one only once the daemon has it; both come within the reorder window.
    data = simulate(devices=1, steps=2, seed=34)
    (older, newer) = [("resumed-pump", ts, values) for _, ts, values in readings_of(data)]
    config = _config(tmp_path, "fw-resume", engine={"max_batch": 64}, input={"reorder_window_s": 10.0},
                     metrics={"listen": "127.0.0.1:0"})
    with MqttRecorder(broker.host, broker.port, ["faultwatch/+/forecast", "faultwatch/status"]) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config)
        wait_answering(daemon, broker, recorder)
        assert daemon.terminate() == 0
        daemon.start()
        wait_for(lambda: "session present: True" in daemon.log(), timeout=60, message=daemon.log)
        received = daemon.metric("faultwatch_readings_received_total")
        publisher = Publisher(broker)
        publisher.send("sensors/resumed-pump", payload(newer[1], newer[2]))
        wait_for(lambda: daemon.metric("faultwatch_readings_received_total") > received, timeout=30,
                 message=daemon.log)
        publisher.send("sensors/resumed-pump", payload(older[1], older[2]))
        wait_for(lambda: len([d for d, _ in forecasts(recorder.messages()) if d == "resumed-pump"]) == 2,
                 timeout=60, message=daemon.log)
        got = [body for d, body in forecasts(recorder.messages()) if d == "resumed-pump"]
        assert [body["ts"] for body in got] == [older[1], newer[1]]
        assert daemon.terminate() == 0
        publisher.close()


def test_a_kill_and_restart_mid_stream_raises_no_fault(broker, trained, tmp_path):
    """The readings a killed daemon stepped after its last snapshot are acknowledged, so the
    restarted one bridges them as a gap and resumes from an older state: neither is a fault."""
    data = simulate(devices=3, steps=400, seed=37)
    rows = readings_of(data)
    config = _config(tmp_path, "fw-restart") | {"snapshot_interval_s": 2.0}
    model = StepModel(trained.int8)
    uninterrupted = Engine(model, _settings(config)).process(as_readings(rows))
    assert not [o for o in uninterrupted if o.event], "the normal stream alone raises a fault"
    state_file = tmp_path / "state" / "state.npz"
    with MqttRecorder(broker.host, broker.port, ["faultwatch/#"]) as recorder:
        first = Daemon(trained.int8, broker, tmp_path, "first", config)
        wait_answering(first, broker, recorder)
        stream, publisher = _stream(broker, rows, rate=45)

        def data_answered() -> int:
            return len({k for k in answered(recorder.messages()) if k[0] != "probe"})

        wait_for(lambda: data_answered() >= 300 and state_file.exists(), timeout=60, message=first.log)
        mtime = state_file.stat().st_mtime_ns
        wait_for(lambda: state_file.stat().st_mtime_ns != mtime, timeout=30, message="no new snapshot")
        at_snapshot = data_answered()
        # Kill once ~10 readings per device were stepped (and acknowledged) after the snapshot.
        wait_for(lambda: data_answered() >= at_snapshot + 30, timeout=30, message=first.log)
        assert stream.is_alive(), "the stream ended before the kill: make it longer"
        first.kill()
        snapshot = dict(np.load(state_file, allow_pickle=False))
        second = Daemon(trained.int8, broker, tmp_path, "second", config)
        stream.join(timeout=120)
        publisher.wait()
        wanted = {(d, ts) for d, ts, _ in rows}
        wait_for(lambda: wanted <= answered(recorder.messages()), timeout=120,
                 message=lambda: f"{len(wanted - answered(recorder.messages()))} unanswered:\n{second.log()}")
        assert second.terminate() == 0
        publisher.close()
        messages = recorder.messages()
    # The restart really resumed across a gap: some device's first reading after the restart
    # is more than one period after the last one in the snapshot it resumed from.
    devices = [str(d) for d in snapshot["devices"]]
    upto = {d: float(snapshot["last_ts"][devices.index(d)]) for d in data.devices}
    split = max(i for i, m in enumerate(messages)
                if m.topic == "faultwatch/status" and m.payload == b"online")
    first_after = {}
    for device, body in forecasts(messages[split:]):
        first_after.setdefault(device, body["ts"])
    assert any(first_after[d] - upto[d] > 1.5 * data.period_s for d in data.devices), (first_after, upto)
    faults = [m for m in messages if m.topic.endswith("/fault") and b"raised" in m.payload]
    assert faults == [], [m.payload for m in faults]
