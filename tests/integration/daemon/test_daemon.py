"""The daemon as a user runs it: a real subprocess, a real Mosquitto, a really trained int8 model.

Every test starts ``python -m faultwatch.runtime.cli run --model M --broker 127.0.0.1:PORT
--config C`` and talks to it only over MQTT (and reads its log). Readings come from the
simulator, published as the daemon's input format by ``sim_publish.publish``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from daemon_harness import Daemon
from faultwatch.export.build import TOLERANCE
from faultwatch.runtime.daemon.payload import encode_reading
from faultwatch.runtime.devtools.sim_publish import publish
from faultwatch.runtime.devtools.simulator import CHANNELS, Fault, SimData, simulate
from faultwatch.runtime.engine.engine import Engine, Reading
from faultwatch.runtime.engine.model import StepModel
from helpers import MqttRecorder, Received, wait_for
from model_fixtures import TrainedModels

VALVE_CHANNELS = {"flow_rate", "pressure", "current"}


# -- a daemon subprocess: the shared harness -------------------------------------------


@pytest.fixture
def start_daemon(broker, trained: TrainedModels, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``start_daemon(client_id=..., **{section: {key: value}})``; every daemon is killed at teardown."""
    started: list[Daemon] = []

    def start(client_id: str = "faultwatch-test", **sections: dict) -> Daemon:
        config = {
            "broker": {"client_id": client_id},
            # QoS 1 out as well as in, so "every reading answered" can be asserted exactly.
            "output": {"stats_interval_s": 0.5, "forecast_qos": 1},
            # Any free port: daemons of other tests (or a demo) may be running on this machine.
            "metrics": {"listen": "127.0.0.1:0"},
        }
        for section, values in sections.items():
            config[section] = config.get(section, {}) | values
        daemon = Daemon(trained.int8, broker, tmp_path / "daemon", f"daemon-{len(started)}", config)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


class Publisher:
    """A plain MQTT client publishing at QoS 1 and waiting for each PUBACK."""

    def __init__(self, broker) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=30)
        assert info.is_published(), f"no PUBACK for {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def forecasts(recorder: MqttRecorder, device: str = "+") -> list[tuple[str, dict]]:
    return [(m.topic.split("/")[1], json.loads(m.payload))
            for m in recorder.messages(f"faultwatch/{device}/forecast")]


def wait_until_serving(daemon: Daemon, recorder: MqttRecorder, broker, device: str = "probe") -> None:
    """Online, and answering: readings of ``device`` are published until one is answered."""
    wait_for(lambda: any(m.payload == b"online" for m in recorder.messages("faultwatch/status"))
             or not daemon.alive(), timeout=90, message=lambda: f"daemon never online:\n{daemon.log()}")
    assert daemon.alive(), daemon.log()
    publisher = Publisher(broker)
    sent = [0]

    def answered() -> bool:
        if forecasts(recorder, device):
            return True
        sent[0] += 1
        publisher.send(f"sensors/{device}", encode_reading(1_600_000_000.0 + sent[0],
                                                           dict.fromkeys(CHANNELS, 1.0)))
        return False

    try:
        wait_for(answered, timeout=60, interval=0.3,
                 message=lambda: f"no forecast for {device}:\n{daemon.log()}")
    finally:
        publisher.close()


def retained(broker, topic_filter: str, expect: Callable[[list[Received]], bool]) -> list[Received]:
    """The retained messages a new subscriber gets on ``topic_filter``, once ``expect`` holds."""
    with MqttRecorder(broker.host, broker.port, topic_filter) as late:

        def arrived() -> list[Received] | None:
            messages = late.messages()
            return messages if expect(messages) else None

        return wait_for(arrived, timeout=20, message=lambda: f"retained on {topic_filter}: {late.messages()}")


def sent_ts(data: SimData) -> set[float]:
    return {round(float(ts), 3) for ts in data.timestamps}


# -- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["fast", "paho"])
def test_answers_every_reading_and_reports_its_status(broker, start_daemon, trained: TrainedModels,
                                                      client: str):
    with MqttRecorder(broker.host, broker.port, "faultwatch/#") as recorder:
        daemon = start_daemon(client_id=f"faultwatch-test-{client}", broker={"client": client})
        wait_until_serving(daemon, recorder, broker)
        assert f"; {client} MQTT client" in daemon.log()
        online = retained(broker, "faultwatch/status", lambda msgs: len(msgs) >= 1)
        assert [(m.payload, m.retain) for m in online] == [(b"online", True)]

        data = simulate(devices=2, steps=40, seed=21)
        assert publish(data, broker.host, broker.port, rate=0, qos=1) == data.values[:, :, 0].size

        def all_answered() -> bool:
            return all(len(forecasts(recorder, d)) >= len(data.timestamps) for d in data.devices)

        wait_for(all_answered, timeout=90, message=lambda: f"forecasts missing:\n{daemon.log()}")
        contract = StepModel(trained.int8).contract
        # The same readings through an in-process engine: what the daemon should have said.
        engine = Engine(StepModel(trained.int8))
        expected = {(o.device, o.ts): o for o in engine.process(
            [Reading(d, ts, v.copy()) for ts, d, v, _ in data.rows()])}
        scale = np.asarray(contract.scaler.scale)[list(contract.target_index)]
        for device in data.devices:
            got = forecasts(recorder, device)
            assert len(got) == len(data.timestamps)  # one forecast per reading, no more
            assert {body["ts"] for _, body in got} == sent_ts(data)  # each with its reading's ts
            for _, body in got:
                assert list(body["forecast"]) == list(contract.targets)
                values = np.array(list(body["forecast"].values()))
                want = expected[(device, body["ts"])]
                assert np.all(np.abs(values - want.forecast) <= TOLERANCE["int8"] * scale)
                assert math.isfinite(body["score"]) and body["score"] >= 0
                # The model's detector decides: a per-device threshold, as the engine computes it
                # (int8 batches differ between the two runs, so the scores it learns from do too).
                assert body["threshold"] == pytest.approx(want.threshold, rel=0.05)
                assert body["imputed"] == [] and body["fault"] is False

        assert daemon.terminate() == 0
        stopped = retained(broker, "faultwatch/status", lambda msgs: len(msgs) >= 1)
        assert [(m.payload, m.retain) for m in stopped] == [(b"stopped", True)]
        assert "stopping" in daemon.log()

        # Every reading was acknowledged: its persistent session resumed, the broker has none
        # of them to send again (the restarted daemon, without a state_dir, would answer them).
        # The broker sends what it held before the probe, so the probe's answer comes after theirs.
        answered = [f for f in forecasts(recorder) if f[0] in data.devices]
        daemon.start()
        wait_until_serving(daemon, recorder, broker, device="probe-after-restart")
        assert "session present: True" in daemon.current_log()
        assert [f for f in forecasts(recorder) if f[0] in data.devices] == answered, daemon.current_log()
        assert daemon.terminate() == 0


def test_online_is_announced_only_once_readings_are_subscribed(broker, start_daemon):
    """A first-ever session: the one reading sent on seeing `online` must be answered."""
    with MqttRecorder(broker.host, broker.port, "faultwatch/#") as recorder:
        daemon = start_daemon(client_id="never-seen-before")
        wait_for(lambda: any(m.payload == b"online" for m in recorder.messages("faultwatch/status"))
                 or not daemon.alive(), timeout=90, message=lambda: f"daemon never online:\n{daemon.log()}")
        publisher = Publisher(broker)
        try:
            publisher.send("sensors/first", encode_reading(1_700_000_000.0, {c: 1.0 for c in CHANNELS}))
        finally:
            publisher.close()
        wait_for(lambda: forecasts(recorder, "first"), timeout=60,
                 message=lambda: f"the reading sent on `online` was never answered:\n{daemon.log()}")


def test_last_will_says_offline_when_the_daemon_dies(broker, start_daemon):
    with MqttRecorder(broker.host, broker.port, "faultwatch/#") as recorder:
        daemon = start_daemon()
        wait_until_serving(daemon, recorder, broker)
        daemon.kill()  # SIGKILL: no clean shutdown, the broker sends the will
        status = retained(broker, "faultwatch/status",
                          lambda msgs: any(m.payload == b"offline" for m in msgs))
        assert [(m.payload, m.retain) for m in status] == [(b"offline", True)]


def test_injected_fault_is_published_retained_and_clean_pump_stays_quiet(broker, start_daemon):
    fault = Fault("valve_closure", "pump-000", start=200, duration=60)
    data = simulate(devices=2, steps=300, seed=22, faults=[fault])
    with MqttRecorder(broker.host, broker.port, "faultwatch/#") as recorder:
        # clear_m beyond the stream: the retained state at the end is the raised event.
        daemon = start_daemon(engine={"detector": {"clear_m": 1000}})
        wait_until_serving(daemon, recorder, broker)
        publish(data, broker.host, broker.port, rate=0, qos=1)
        wait_for(lambda: all(len(forecasts(recorder, d)) >= len(data.timestamps) for d in data.devices),
                 timeout=120, message=lambda: f"forecasts missing:\n{daemon.log()}")

        # Announced to Home Assistant with the fault state "ok" (its Fault sensor: off, not Unknown),
        # then the fault event.
        states = [json.loads(m.payload) for m in recorder.messages("faultwatch/pump-000/fault")]
        assert states and states[0] == {"device": "pump-000", "state": "ok"}, daemon.log()
        faults = states[1:]
        assert faults, daemon.log()
        event = faults[0]
        assert event["device"] == "pump-000" and event["state"] == "raised"
        t0 = data.timestamps[0]
        assert t0 + fault.start <= event["ts"] < t0 + fault.start + fault.duration
        assert event["peak_score"] > event["threshold"] > 0
        assert event["top_channels"] and event["top_channels"][0]["channel"] in VALVE_CHANNELS
        assert {"channel", "reading", "forecast", "share"} <= set(event["top_channels"][0])
        quiet = recorder.messages("faultwatch/pump-001/fault")
        assert [json.loads(m.payload)["state"] for m in quiet] == ["ok"]
        # Forecasts say so too, from the raising reading on.
        flagged = [body["ts"] for _, body in forecasts(recorder, "pump-000") if body["fault"]]
        assert flagged and min(flagged) == event["ts"]
        assert not any(body["fault"] for _, body in forecasts(recorder, "pump-001"))

    # A dashboard connecting later sees the current fault state, retained.
    state = retained(broker, "faultwatch/+/fault", lambda msgs: len(msgs) >= 3)  # and the probe's
    assert all(m.retain for m in state)
    assert {m.topic: json.loads(m.payload)["state"] for m in state} == {
        "faultwatch/pump-000/fault": "raised", "faultwatch/pump-001/fault": "ok",
        "faultwatch/probe/fault": "ok"}
    assert daemon.terminate() == 0


MAX_BYTES = 16_384  # InputConfig.max_payload_bytes default


def _bad_payloads() -> list[tuple[str, bytes, str]]:
    """(topic, payload, the reason the daemon must count it under)."""
    valid = encode_reading(1_700_000_000.0, dict.fromkeys(CHANNELS, 1.0))
    deep = b'{"current": ' + b"[" * 8000 + b"]" * 8000 + b"}"
    assert len(deep) < MAX_BYTES  # too deep, not too large
    t = "sensors/pump-bad"
    return [
        (t, b"this is not json", "not_json"),
        (t, b'{"current": 1.0', "not_json"),
        (t, b"\xff\xfe{\x00}", "not_utf8"),
        (t, b'{"current": "hot"}', "bad_value"),
        (t, b'{"current": true}', "bad_value"),
        (t, b'{"current": [1.0]}', "bad_value"),
        (t, b'{"current": {"value": 1.0}}', "bad_value"),
        (t, b'{"current": NaN}', "bad_value"),
        (t, b'{"current": Infinity}', "bad_value"),
        (t, b'{"pressure": -Infinity}', "bad_value"),
        (t, b'{"current": 1e999}', "bad_value"),
        (t, b'{"ts": "yesterday", "current": 1.0}', "bad_ts"),
        (t, b'{"ts": NaN, "current": 1.0}', "bad_ts"),
        (t, b"[1.0, 2.0]", "not_object"),
        (t, b'{"speed": 1.0}', "no_channels"),
        (t, b'{"current": ' + b"1" * (MAX_BYTES + 100) + b"}", "too_large"),
        (t, deep, "not_json"),
        ("sensors/" + "d" * 300, valid, "bad_topic"),
        ("sensors/", valid, "bad_topic"),
    ]


def test_malformed_readings_are_counted_logged_and_skipped(broker, start_daemon):
    bad = _bad_payloads()
    with MqttRecorder(broker.host, broker.port, "faultwatch/#") as recorder:
        daemon = start_daemon()
        wait_until_serving(daemon, recorder, broker)
        publisher = Publisher(broker)
        try:
            for topic, payload, _ in bad:
                publisher.send(topic, payload)
            good_ts = 1_700_000_123.0
            publisher.send("sensors/pump-bad", encode_reading(
                good_ts, dict(zip(CHANNELS, simulate(steps=1, seed=23).values[0, 0], strict=True))))
        finally:
            publisher.close()

        # The reading after the flood is answered.
        wait_for(lambda: [b for _, b in forecasts(recorder, "pump-bad") if b["ts"] == good_ts],
                 timeout=60, message=lambda: f"valid reading not answered:\n{daemon.log()}")
        assert len(forecasts(recorder, "pump-bad")) == 1  # and nothing bad was answered
        expected = Counter(f"rejected_{reason}" for _, _, reason in bad)

        def stats_with_all_rejections() -> dict | None:
            for m in reversed(recorder.messages("faultwatch/stats")):
                stats = json.loads(m.payload)
                if {k: v for k, v in stats.items() if k.startswith("rejected_")} == expected:
                    return stats
            return None

        stats = wait_for(stats_with_all_rejections, timeout=30, message=lambda: (
            f"stats never showed {dict(expected)}; last: "
            f"{[m.payload for m in recorder.messages('faultwatch/stats')][-1:]}\n{daemon.log()}"))
        assert "callback_errors" not in stats
        assert stats["received"] >= len(bad) + 1
        assert daemon.alive()

    log = daemon.log()
    # Logged (rate-limited, so at least the first): its topic and reason.
    assert any("sensors/pump-bad" in line and "not_json" in line for line in log.splitlines()), log
    assert "Traceback" not in log
    assert daemon.terminate() == 0


def test_readings_sent_while_stopped_are_answered_after_a_restart(broker, start_daemon):
    client_id = "faultwatch-persistent"
    data = simulate(devices=2, steps=50, seed=24)
    with MqttRecorder(broker.host, broker.port, "faultwatch/#") as recorder:
        first = start_daemon(client_id=client_id)
        wait_until_serving(first, recorder, broker)  # the session and its subscription exist
        assert first.terminate() == 0

        # The daemon is away: the broker queues these for its persistent session.
        assert publish(data, broker.host, broker.port, rate=0, qos=1) == data.values[:, :, 0].size
        assert not any(forecasts(recorder, d) for d in data.devices)

        second = start_daemon(client_id=client_id)
        wait_for(lambda: all(len(forecasts(recorder, d)) >= len(data.timestamps) for d in data.devices),
                 timeout=120, message=lambda: f"queued readings not answered:\n{second.log()}")
        for device in data.devices:
            got = forecasts(recorder, device)
            assert sorted(b["ts"] for _, b in got) == sorted(sent_ts(data))  # each exactly once
        assert "session present: True" in second.log()
        assert second.terminate() == 0
