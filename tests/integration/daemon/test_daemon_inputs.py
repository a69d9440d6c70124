"""What reaches the daemon and what it shows: per-channel topics and the frame assembler,
thousands of hostile payloads, a flood of device IDs, Home Assistant discovery, /metrics and
/healthz. Real Mosquitto, real model, subprocess."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections import Counter
from datetime import datetime

import numpy as np
from daemon_harness import (
    Daemon,
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
from faultwatch.runtime.daemon.payload import PayloadError, parse_reading, parse_value
from faultwatch.runtime.daemon.topics import TopicMatcher
from faultwatch.runtime.devtools.simulator import CHANNELS, simulate
from faultwatch.runtime.engine.engine import Engine, EngineSettings
from faultwatch.runtime.engine.model import StepModel
from helpers import MqttRecorder, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TOPICS = ["sensors/{device}", "sensors/{device}/{channel}"]
BASE = {
    "input": {"topic": TOPICS, "frame_max_wait_s": 0.3},
    "output": {"stats_interval_s": 0.3, "forecast_qos": 1},
    "engine": {"max_batch": 1},
    "metrics": {"listen": "127.0.0.1:0"},
}


def _config(client_id: str, **extra) -> dict:
    config = {k: dict(v) for k, v in BASE.items()} | {"broker": {"client_id": client_id}}
    for section, values in extra.items():
        config[section] = config.get(section, {}) | values
    return config


def test_channels_on_separate_topics_become_one_reading(broker, trained, tmp_path):
    data = simulate(devices=2, steps=3, seed=41)
    (a, b), stamps = data.devices, [round(float(t), 3) for t in data.timestamps]
    with MqttRecorder(broker.host, broker.port, ["faultwatch/+/forecast", "faultwatch/status"]) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", _config("fw-frames"))
        wait_answering(daemon, broker, recorder)
        publisher = Publisher(broker)
        frames = []  # (device, ts, values as the daemon will step them)
        # Device a, step 0: every channel on its own topic, with the sample's timestamp.
        for i, ch in enumerate(CHANNELS):
            publisher.send(f"sensors/{a}/{ch}", json.dumps({"value": data.values[0, 0, i],
                                                            "ts": stamps[0]}).encode())
        frames.append((a, stamps[0], data.values[0, 0]))
        # Device b, step 0: two channels never come; the frame is stepped after the wait.
        for i, ch in enumerate(CHANNELS[:6]):
            publisher.send(f"sensors/{b}/{ch}", json.dumps({"value": data.values[1, 0, i],
                                                            "ts": stamps[0]}).encode())
        frames.append((b, stamps[0], np.concatenate([data.values[1, 0, :6], [np.nan, np.nan]])))
        publisher.wait()
        wait_for(lambda: len([d for d, _ in forecasts(recorder.messages()) if d != "probe"]) >= 2,
                 timeout=30, message=daemon.log)
        # Device a, step 1: a whole JSON reading on the device topic works alongside.
        publisher.send(f"sensors/{a}", payload(stamps[1], data.values[0, 1]))
        frames.append((a, stamps[1], data.values[0, 1]))
        # A channel the model does not know is ignored (counted), not an error.
        publisher.send(f"sensors/{a}/humidity", b"41.5")
        publisher.wait()
        wait_for(lambda: len([d for d, _ in forecasts(recorder.messages()) if d != "probe"]) >= 3,
                 timeout=30, message=daemon.log)
        got = {(d, body["ts"]): body for d, body in forecasts(recorder.messages()) if d != "probe"}
        assert set(got) == {(d, ts) for d, ts, _ in frames}
        assert got[(a, stamps[0])]["imputed"] == []
        assert got[(b, stamps[0])]["imputed"] == list(CHANNELS[6:])
        model = StepModel(trained.int8)
        engine = Engine(model, EngineSettings(max_batch=1))
        want = expected_messages(engine.process(as_readings(frames)), model.contract.targets,
                                 model.contract.calibration.threshold)
        assert got == want
        assert daemon.metric("faultwatch_frames_total", 'how="complete"') == 1
        assert daemon.metric("faultwatch_frames_total", 'how="timeout"') == 1
        wait_for(lambda: daemon.metric("faultwatch_readings_dropped_total", 'reason="ignored_channel"') == 1,
                 timeout=10, message=lambda: daemon.get("/metrics")[1])
        assert daemon.terminate() == 0
        publisher.close()


# -- hostile payloads ----------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(10**300, 10**330),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_any = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
bodies = st.one_of(
    st.dictionaries(st.sampled_from([*CHANNELS, "ts", "junk"]), json_any, max_size=6)
    .map(lambda d: json.dumps(d, allow_nan=True).encode()),
    json_any.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.binary(max_size=200),
    st.integers(100, 20_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(16_385, 40_000).map(lambda n: b"7" * n),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda v: repr(v).encode()),
)
# Any topic level Mosquitto lets through (it disconnects a client publishing control characters,
# non-characters or wildcards; the daemon never sees those).
devices = st.one_of(st.sampled_from(["pump-a", "pump-b"]), st.just("x" * 300), st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Cn"), blacklist_characters="/+#"),
    min_size=1, max_size=12))
messages = st.tuples(devices, st.sampled_from([None, *CHANNELS, "humidity"]), bodies)


def _expected_reason(matcher: TopicMatcher, topic: str, body: bytes) -> str | None:
    """The stats key the daemon must count this message under (rejected_<reason>, ignored_channel),
    or None for a reading it steps."""
    found = matcher.match(topic)
    if found is None:
        return "rejected_bad_topic"
    try:
        if found[1] is None:
            ts, _ = parse_reading(body, CHANNELS, now=0.0)
        else:
            ts, _ = parse_value(body, now=0.0)
    except PayloadError as exc:
        return f"rejected_{exc.reason}"
    if ts > time.time() + 300.0:  # input.max_future_s
        return "rejected_future_ts"
    return None if found[1] in (None, *CHANNELS) else "ignored_channel"


def test_thousands_of_hostile_payloads_are_counted_and_valid_readings_still_answered(
        broker, trained, tmp_path):
    matcher = TopicMatcher(TOPICS)
    expected: Counter = Counter()
    with MqttRecorder(broker.host, broker.port, ["faultwatch/#"]) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", _config("fw-hostile"))
        wait_answering(daemon, broker, recorder)
        publisher = Publisher(broker)

        @settings(max_examples=2500, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(messages)
        def send(message) -> None:
            device, channel, body = message
            topic = f"sensors/{device}" + ("" if channel is None else f"/{channel}")
            reason = _expected_reason(matcher, topic, body)
            if reason is not None:
                expected[reason] += 1
                publisher.send(topic, body)
            if sum(expected.values()) % 50 == 0:  # valid readings in the middle of the flood
                valid.append((len(valid), 1_700_000_000.0 + len(valid)))
                publisher.send("sensors/pump-valid", payload(valid[-1][1], row))

        valid: list[tuple[int, float]] = []
        row = simulate(steps=1, seed=42).values[0, 0]
        send()
        publisher.wait(timeout=120)
        assert sum(expected.values()) > 2000 and len(expected) >= 8, expected
        good_ts = 1_750_000_000.0  # in the past: a ts from the future is rejected
        publisher.send("sensors/pump-after", payload(good_ts, simulate(steps=1, seed=42).values[0, 0]))
        publisher.wait()
        wait_for(lambda: ("pump-after", good_ts) in answered(recorder.messages()), timeout=60,
                 message=lambda: f"the reading after the flood was not answered:\n{daemon.log()[-3000:]}")

        def counted() -> Counter:
            for m in reversed(recorder.messages("faultwatch/stats")):
                stats = json.loads(m.payload)
                return Counter({k: v for k, v in stats.items()
                                if k.startswith("rejected_") or k == "ignored_channel"})
            return Counter()

        wait_for(lambda: counted() == expected, timeout=30,
                 message=lambda: f"counted {counted()} != sent {expected}")
        assert {("pump-valid", ts) for _, ts in valid} <= answered(recorder.messages())
        assert daemon.alive()
        status, health = daemon.get("/healthz")
        assert status == 200 and json.loads(health)["connected"] is True
        for key, n in expected.items():
            label = key.removeprefix("rejected_")
            assert daemon.metric("faultwatch_readings_dropped_total", f'reason="{label}"') == n
        assert daemon.metric("faultwatch_callback_errors_total") == 0
        assert daemon.terminate() == 0
        publisher.close()
    log = daemon.log()
    assert "Traceback" not in log
    # Rate-limited: at most one line per 5 s (counted by the gaps, not by how long the flood took,
    # which a loaded machine stretches).
    stamps = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp()
              for t in re.findall(r"^(\S+ \S+) WARNING rejected reading on", log, re.MULTILINE)]
    assert stamps and all(b - a >= 4.99 for a, b in itertools.pairwise(stamps)), stamps


def test_a_flood_of_device_ids_stays_within_the_caps(broker, trained, tmp_path):
    row = simulate(steps=1, seed=43).values[0, 0]
    config = _config("fw-flood", engine={"max_devices": 200, "max_batch": 256},
                     input={"max_open_frames": 50}, output={"forecasts": False})
    topics = ["faultwatch/status", "homeassistant/#", "faultwatch/+/forecast"]
    with MqttRecorder(broker.host, broker.port, topics) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config)
        wait_for(lambda: any(m.payload == b"online" for m in recorder.messages("faultwatch/status")),
                 timeout=90, message=daemon.log)
        publisher = Publisher(broker)
        for i in range(3000):
            publisher.send(f"sensors/intruder-{i}", payload(1_700_000_000.0, row), qos=0)
            publisher.send(f"sensors/partial-{i}/current", b"2.5", qos=0)
        publisher.send("sensors/last", payload(1_700_000_000.0, row))
        publisher.wait(timeout=120)
        wait_for(lambda: daemon.metric("faultwatch_devices_evicted_total") >= 5000, timeout=90,
                 message=lambda: daemon.get("/metrics")[1])
        assert daemon.metric("faultwatch_devices") <= 200
        assert daemon.metric("faultwatch_open_frames") <= 50
        assert daemon.metric("faultwatch_frames_total", 'how="evicted"') >= 1
        # forecasts off: Home Assistant gets the fault sensor only, one per device seen
        assert recorder.messages("homeassistant/sensor/#") == []
        assert recorder.messages("faultwatch/+/forecast") == []
        assert daemon.terminate() == 0
        publisher.close()


def test_home_assistant_discovery_metrics_and_health(broker, trained, tmp_path):
    data = simulate(devices=2, steps=5, seed=44)
    config = _config("fw-ha", homeassistant={"prefix": "ha"})
    topics = ["ha/#", "faultwatch/+/forecast", "faultwatch/status"]
    with MqttRecorder(broker.host, broker.port, topics) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config)
        wait_answering(daemon, broker, recorder)
        publisher = Publisher(broker)
        publisher.send_readings(readings_of(data))
        publisher.wait()
        wait_for(lambda: len(answered(recorder.messages())) >= 10, timeout=30, message=daemon.log)
        configs = recorder.messages("ha/#")
        topics = Counter(m.topic for m in configs)
        for device in [*data.devices, "probe"]:
            assert topics[f"ha/binary_sensor/faultwatch_{device}/fault/config"] == 1  # once per device
            assert topics[f"ha/sensor/faultwatch_{device}/anomaly_score/config"] == 1
        assert len(configs) == 6 and all(m.retain is False for m in configs)  # live: not flagged retained
        fault = json.loads(next(m.payload for m in configs if "pump-000/fault" in m.topic))
        assert fault["state_topic"] == "faultwatch/pump-000/fault"
        assert fault["availability"][0]["topic"] == "faultwatch/status"
        # ...and retained, for a Home Assistant that starts later.
        with MqttRecorder(broker.host, broker.port, "ha/#") as late:
            wait_for(lambda: len(late.messages()) == 6, timeout=20, message=lambda: str(late.messages()))
            assert all(m.retain for m in late.messages())

        status, text = daemon.get("/metrics")
        assert status == 200
        for line in text.splitlines():  # the text format, line by line
            assert line.startswith("# HELP ") or line.startswith("# TYPE ") or re.fullmatch(
                r'[a-z_]+(\{[a-z_0-9]+="[^"]*"(,[a-z_0-9]+="[^"]*")*\})? [-+0-9.eE]+|.* [-+]Inf|.* NaN',
                line), line
        names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
        for name in ("faultwatch_readings_received_total", "faultwatch_readings_processed_total",
                     "faultwatch_readings_dropped_total", "faultwatch_step_batch_size",
                     "faultwatch_step_seconds", "faultwatch_queue_depth", "faultwatch_devices",
                     "faultwatch_faults_active", "faultwatch_device_staleness_seconds",
                     "faultwatch_devices_stale", "faultwatch_reading_latency_seconds"):
            assert name in names, name
        assert daemon.metric("faultwatch_readings_processed_total") >= 10
        assert daemon.metric("faultwatch_devices") == 3
        assert daemon.metric("faultwatch_connected") == 1
        assert daemon.metric("faultwatch_step_seconds_count") >= 10
        assert 0 <= daemon.metric("faultwatch_device_staleness_seconds", 'device="pump-000"') < 120
        status, body = daemon.get("/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert daemon.get("/readyz")[0] == 200
        assert daemon.terminate() == 0
        publisher.close()


def test_qos0_input_drops_beyond_its_queue_and_counts_every_message(broker, trained, tmp_path):
    row = simulate(steps=1, seed=45).values[0, 0]
    config = _config("fw-qos0", input={"qos": 0, "max_queue": 5}, engine={"max_batch": 1},
                     output={"forecasts": False}, homeassistant={"discovery": False})
    with MqttRecorder(broker.host, broker.port, ["faultwatch/status"]) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config)
        wait_for(lambda: any(m.payload == b"online" for m in recorder.messages("faultwatch/status")),
                 timeout=90, message=daemon.log)
        # The subscription follows `online`; a reading that gets through proves it is in place.
        publisher = Publisher(broker)
        wait_for(lambda: publisher.send("sensors/probe", payload(1e9 + len(publisher.sent), row), qos=0)
                 or daemon.metric("faultwatch_readings_received_total") > 0, timeout=30, interval=0.2)
        before = daemon.metric("faultwatch_readings_received_total")
        n = 3000
        for i in range(n):
            publisher.send(f"sensors/pump-{i % 50}", payload(1_700_000_000.0 + i, row), qos=0)

        def settled() -> bool:
            received = daemon.metric("faultwatch_readings_received_total") - before
            return received >= n and daemon.metric("faultwatch_queue_depth") == 0

        wait_for(settled, timeout=60, message=lambda: daemon.get("/metrics")[1])
        dropped = daemon.metric("faultwatch_readings_dropped_total", 'reason="queue_full"')
        duplicates = daemon.metric("faultwatch_readings_dropped_total", 'reason="duplicate"')
        processed = daemon.metric("faultwatch_readings_processed_total")
        received = daemon.metric("faultwatch_readings_received_total")
        assert dropped > 0, "the flood never filled a queue of 5: nothing was tested"
        assert processed + dropped + duplicates == received  # every message processed or counted
        assert daemon.alive() and daemon.terminate() == 0
        publisher.close()


def test_forecast_every_nth_reading(broker, trained, tmp_path):
    data = simulate(devices=2, steps=7, seed=46)
    config = _config("fw-every", output={"forecast_every": 3})
    with MqttRecorder(broker.host, broker.port, ["faultwatch/+/forecast", "faultwatch/status"]) as recorder:
        daemon = Daemon(trained.int8, broker, tmp_path, "daemon", config)
        wait_answering(daemon, broker, recorder)
        publisher = Publisher(broker)
        publisher.send_readings(readings_of(data))
        publisher.wait()
        wait_for(lambda: daemon.metric("faultwatch_readings_processed_total") >= 15, timeout=30,
                 message=daemon.log)
        for device in data.devices:
            stamps = [b["ts"] for d, b in forecasts(recorder.messages()) if d == device]
            assert stamps == [round(float(data.timestamps[k]), 3) for k in (0, 3, 6)]
        assert daemon.terminate() == 0
        publisher.close()
