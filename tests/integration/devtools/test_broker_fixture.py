"""The broker fixture is a real Mosquitto, and a restart keeps what a restart must keep."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
from helpers import MqttRecorder, Received, wait_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def _publisher(host: str, port: int) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    return client


def _publish_qos1(client: mqtt.Client, topic: str, payload: bytes, retain: bool = False) -> None:
    info = client.publish(topic, payload, qos=1, retain=retain)
    info.wait_for_publish(timeout=20)  # returns once the broker's PUBACK is in
    assert info.is_published(), f"no PUBACK for {topic}"


class PersistentSubscriber:
    """MQTT v5, clean_start=False, session expiry 3600 s, QoS 1 — like the daemon."""

    def __init__(self, host: str, port: int, client_id: str, topic: str) -> None:
        self.topic = topic
        self.session_present: bool | None = None
        self.subscribed = threading.Event()
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(host, port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.session_present = flags.session_present
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.received.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def messages(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_qos1_message_and_retained_state(broker):
    assert broker.address == f"127.0.0.1:{broker.port}"
    with MqttRecorder(broker.host, broker.port, ["fwtest/#"]) as recorder:
        pub = _publisher(broker.host, broker.port)
        try:
            _publish_qos1(pub, "fwtest/pump-1/reading", b'{"flow": 1.5}')
            _publish_qos1(pub, "fwtest/pump-1/fault", b"bearing", retain=True)
        finally:
            pub.disconnect()
            pub.loop_stop()
        wait_for(
            lambda: len(recorder.messages()) >= 2,
            timeout=20,
            message=lambda: f"recorder got {recorder.messages()}",
        )
        assert recorder.messages("fwtest/+/reading") == [
            Received("fwtest/pump-1/reading", b'{"flow": 1.5}', False)
        ]

    # The retained fault survives a restart and reaches a late subscriber as retained.
    broker.stop()
    assert not broker.running
    broker.start()
    with MqttRecorder(broker.host, broker.port, "fwtest/+/fault") as late:
        wait_for(lambda: late.messages(), timeout=20, message="retained message not delivered")
        assert late.messages() == [Received("fwtest/pump-1/fault", b"bearing", True)]


def test_restart_keeps_qos1_queued_for_absent_persistent_session(broker):
    topic = "fwtest/queued/reading"
    client_id = "fwtest-persistent-subscriber"

    # 1. The subscriber creates its session and subscription, then goes away.
    first = PersistentSubscriber(broker.host, broker.port, client_id, topic)
    wait_for(first.subscribed.is_set, timeout=20, message="first SUBACK")
    assert first.session_present is False
    first.close()

    # 2. Readings are published while it is away: the broker queues them for the session.
    pub = _publisher(broker.host, broker.port)
    try:
        for i in range(3):
            _publish_qos1(pub, topic, f"reading-{i}".encode())
    finally:
        pub.disconnect()
        pub.loop_stop()

    # 3. The broker restarts (same port, state saved on SIGTERM and reloaded).
    broker.stop()
    broker.start()
    assert "mosquitto.db" in {p.name for p in broker.data_dir.iterdir()}

    # 4. The subscriber comes back and receives what was queued while it was away.
    second = PersistentSubscriber(broker.host, broker.port, client_id, topic)
    try:
        wait_for(
            lambda: len(second.messages()) >= 3,
            timeout=20,
            message=lambda: f"got {second.messages()}; broker log:\n{broker.log_text()}",
        )
        assert second.session_present is True
        assert [m.payload for m in second.messages()] == [b"reading-0", b"reading-1", b"reading-2"]
    finally:
        second.close()


def test_broker_factory_gives_independent_brokers(broker, broker_factory):
    other = broker_factory()
    assert other.port != broker.port
    assert other.running and broker.running
    broker.stop()
    assert other.running
    assert "mosquitto" in other.log_text()
