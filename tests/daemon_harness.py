"""What the daemon's integration tests share: the daemon as a subprocess, a persistent
recorder that survives broker restarts, and readings published as the simulator makes them.

``faultwatch run`` runs exactly as a user starts it; its config is written from a dict of
sections, its log read back, its /metrics scraped on the port it reports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from faultwatch.runtime.daemon.payload import ForecastEncoder, encode_reading
from faultwatch.runtime.devtools.simulator import CHANNELS, SimData
from faultwatch.runtime.engine.engine import Output, Reading
from helpers import Received, wait_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def _value(v) -> str:
    """JSON scalars and string lists are valid TOML; a dict becomes an inline table."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def toml(sections: dict) -> str:
    top = [f"{k} = {_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {_value(vv)}" for kk, vv in v.items())
              for k, v in sections.items() if isinstance(v, dict)]
    return "\n".join(top + tables) + "\n"


_STARTED: list[Daemon] = []


@pytest.fixture(autouse=True)
def kill_daemons_at_teardown():
    """Import this into a test module: no daemon outlives its test, whatever the test did."""
    yield
    while _STARTED:
        _STARTED.pop().kill()


class Daemon:
    """``python -m faultwatch.runtime.cli run`` with a config of its own; output in ``log_path``.

    It connects to ``broker.address`` unless given ``address`` (a broker's secure listener);
    ``env`` is added to its environment (a password, say).
    Every one started is killed at the test's teardown (``kill_daemons_at_teardown``).
    """

    def __init__(self, model: Path, broker, workdir: Path, name: str, config: dict, *,
                 address: str | None = None, env: dict[str, str] | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(toml(config))
        self.log_path = workdir / f"{name}.log"
        self.argv = [sys.executable, "-m", "faultwatch.runtime.cli", "run", "--model", str(model),
                     "--broker", address or broker.address, "--config", str(self.config_path)]
        self.env = os.environ | (env or {})
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> Daemon:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env)
        _STARTED.append(self)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.alive(), self.log()
        self.proc.send_signal(signum)

    def terminate(self, timeout: float = 60.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon ignored SIGTERM for {timeout:g} s:\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL: no snapshot, no `stopped`, nothing flushed."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()

    def metrics_port(self) -> int:
        found = wait_for(lambda: re.findall(r"metrics on http://[\d.]+:(\d+)/metrics", self.log()),
                         timeout=60, message=lambda: f"no metrics line in the log:\n{self.log()}")
        return int(found[-1])

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port()}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of /metrics (``labels`` as written, e.g. ``reason="bad_value"``), 0 if absent."""
        _, text = self.get("/metrics")
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def wait_answering(daemon: Daemon, broker, recorder) -> None:
    """Until ``daemon`` said ``online`` and answers a probe reading published on ``broker``
    (the recorder subscribes to ``faultwatch/#``, or at least its status and forecasts)."""
    wait_for(lambda: any(m.payload == b"online" for m in recorder.messages("faultwatch/status")),
             timeout=90, message=lambda: f"never online:\n{daemon.log()}")
    # The subscription follows `online` on the same connection: a probe proves it is in place.
    publisher = Publisher(broker)
    n = [0]

    def probe() -> bool:
        if any(d == "probe" for d, _ in forecasts(recorder.messages())):
            return True
        assert daemon.alive(), daemon.log()
        n[0] += 1
        publisher.send("sensors/probe", payload(1_500_000_000.0 + n[0], np.ones(len(CHANNELS))))
        return False

    try:
        wait_for(probe, timeout=90, interval=0.3, message=lambda: f"daemon not answering:\n{daemon.log()}")
    finally:
        publisher.close()


class PersistentRecorder:
    """A QoS 1 subscriber with a persistent session: it misses nothing across a broker restart."""

    def __init__(self, broker, topics: list[str], client_id: str) -> None:
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()
        wait_for(self._subscribed.is_set, timeout=20, message="PersistentRecorder: no SUBACK")

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self._messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def messages(self, topic_filter: str | None = None) -> list[Received]:
        with self._lock:
            snapshot = list(self._messages)
        return [m for m in snapshot if topic_filter is None or mqtt.topic_matches_sub(topic_filter, m.topic)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> PersistentRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def forecasts(messages: list[Received]) -> list[tuple[str, dict]]:
    """(device, body) of the forecast messages among ``messages``, in arrival order."""
    return [(m.topic.split("/")[1], json.loads(m.payload)) for m in messages
            if m.topic.startswith("faultwatch/") and m.topic.endswith("/forecast")]


def answered(messages: list[Received]) -> set[tuple[str, float]]:
    return {(device, body["ts"]) for device, body in forecasts(messages)}


def readings_of(data: SimData) -> list[tuple[str, float, np.ndarray]]:
    """(device, ts as published, values) in publishing order: step by step, device by device."""
    return [(d, round(float(ts), 3), data.values[i, k])
            for k, ts in enumerate(data.timestamps) for i, d in enumerate(data.devices)]


def payload(ts: float, values: np.ndarray) -> bytes:
    return encode_reading(ts, dict(zip(CHANNELS, values.tolist(), strict=True)))


class Publisher:
    """QoS 1 publishing that survives a broker restart (paho queues and resends), in order.

    paho marks a new connection usable (and lets ``publish`` send at once) before it resends
    what the old one left unacknowledged, so a reading published in that moment overtakes
    older ones, and the daemon drops those as out of order. So after a disconnection,
    :meth:`send` waits until everything outstanding at that moment has been acknowledged.
    """

    def __init__(self, broker) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(200)
        self.client.reconnect_delay_set(0.2, 1)
        self._lock = threading.Condition()
        self.sent: set[int] = set()
        self.acked: set[int] = set()  # by PUBACK (info.is_published() raises for a message that
        self.client.on_publish = self._on_publish  # waited out a disconnection, though paho resent it)
        self._resending: set[int] = set()  # unacknowledged at the last disconnection
        self._disconnects = 0
        self.client.on_disconnect = self._on_disconnect
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self.acked.add(mid)
            self._resending.discard(mid)
            self._lock.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            self._disconnects += 1
            self._resending = self.sent - self.acked

    def send(self, topic: str, body: bytes, qos: int = 1) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: not self._resending, timeout=120):
                raise AssertionError(f"{len(self._resending)} publishes not resent after a reconnection")
            disconnects = self._disconnects
        # Not under the lock: paho calls on_publish holding its own lock, which publish takes too.
        info = self.client.publish(topic, body, qos=qos)
        with self._lock:
            self.sent.add(info.mid)
            if self._disconnects != disconnects and info.mid not in self.acked:
                self._resending.add(info.mid)  # went out (or waits) across that disconnection

    def send_readings(self, rows: list[tuple[str, float, np.ndarray]]) -> None:
        """Each (device, ts, values) of ``rows`` (as :func:`readings_of` makes them) to sensors/{device}."""
        for device, ts, values in rows:
            self.send(f"sensors/{device}", payload(ts, values))

    def wait(self, timeout: float = 60.0) -> None:
        def missing() -> int:
            with self._lock:
                return len(self.sent - self.acked)

        wait_for(lambda: missing() == 0, timeout=timeout, message=lambda: f"{missing()} publishes not acked")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def expected_messages(outputs: list[Output | None], targets, threshold: float) -> dict[tuple, dict]:
    """What the daemon publishes for these engine outputs, keyed by (device, ts)."""
    encoder = ForecastEncoder(targets)
    kept = [o for o in outputs if o is not None]
    return {(o.device, o.ts): json.loads(m) for o, m in zip(kept, encoder.encode_batch(kept, threshold),
                                                            strict=True)}


def as_readings(rows: list[tuple[str, float, np.ndarray]]) -> list[Reading]:
    return [Reading(d, ts, v.copy()) for d, ts, v in rows]


def renamed_feature_model(src: Path, dst: Path) -> Path:
    """The same graph with another contract: one feature renamed in the metadata."""
    import onnx
    from faultwatch.runtime.engine.contract import METADATA_KEY

    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            contract = json.loads(prop.value)
            contract["features"] = ["supply_voltage" if f == "voltage" else f for f in contract["features"]]
            contract["targets"] = ["supply_voltage" if f == "voltage" else f for f in contract["targets"]]
            prop.value = json.dumps(contract)
    onnx.save(model, str(dst))
    return dst
