"""BufferedClient: paho with buffered reads, joined writes, one wake per batch, flow control.

It hooks paho internals; the first test fails if a paho upgrade moves them, the others
run it against a real Mosquitto.
"""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
from faultwatch.runtime.daemon.mqtt.mqttclient import BufferedClient
from helpers import MqttRecorder, wait_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def test_the_paho_internals_it_hooks_exist():
    for name in ("_sock_recv", "_sock_send", "_packet_write", "_packet_queue", "loop_read", "want_write",
                 "reconnect", "_handle_publish", "_send_puback", "_easy_log", "message_callback_add"):
        assert callable(getattr(mqtt.Client, name, None)), name
    client = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    for name in ("_sockpairW", "_sock", "_protocol", "_out_packet", "_in_packet", "_in_callback_mutex",
                 "_userdata", "_manual_ack", "suppress_exceptions"):
        assert hasattr(client, name), name
    assert set(mqtt.MQTTMessage.__slots__) == {"_topic", "dup", "info", "mid", "payload", "properties",
                                               "qos", "retain", "state", "timestamp"}


def _connect(client: mqtt.Client, broker, props: Properties | None = None) -> mqtt.Client:
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    client.connect(broker.host, broker.port, keepalive=30, properties=props)
    client.loop_start()
    assert connected.wait(20), "no CONNACK"
    return client


def test_bursts_in_and_out_arrive_whole_and_in_order(broker):
    n = 3000
    received: list[bytes] = []
    sub = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id="buffered", protocol=mqtt.MQTTv5,
                         manual_ack=True)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *args: subscribed.set()

    def on_message(client, userdata, msg):
        received.append(msg.payload)
        client.ack(msg.mid, msg.qos)

    sub.on_message = on_message
    _connect(sub, broker)
    sub.subscribe("in/+", qos=1)
    assert subscribed.wait(20)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(1000)
    _connect(pub, broker)
    with MqttRecorder(broker.host, broker.port, "out/#") as recorder:
        try:
            infos = [pub.publish(f"in/{i % 7}", f"m{i}".encode(), qos=1) for i in range(n)]
            for info in infos:
                info.wait_for_publish(timeout=30)
            wait_for(lambda: len(received) >= n, timeout=60, message=lambda: f"got {len(received)} of {n}")
            assert received == [f"m{i}".encode() for i in range(n)]
            # Out: a batch of fast QoS 0 and paho QoS 1 publishes, woken once.
            with sub.batch():
                for i in range(n):
                    if i % 3:
                        assert sub.publish_qos0(f"out/{i % 5}", f"o{i}".encode())
                    else:
                        sub.publish(f"out/{i % 5}", f"o{i}".encode(), qos=1)
            wait_for(lambda: len(recorder.messages()) >= n, timeout=60,
                     message=lambda: f"recorder got {len(recorder.messages())} of {n}")
            got = sorted(m.payload for m in recorder.messages())
            assert got == sorted(f"o{i}".encode() for i in range(n))
            # The fast QoS 0 publishes keep their order (QoS 1 ones may wait for paho's inflight window).
            fast = [m.payload for m in recorder.messages("out/1") if int(m.payload[1:]) % 3]
            assert fast == [f"o{i}".encode() for i in range(n) if i % 5 == 1 and i % 3]
        finally:
            pub.disconnect()
            pub.loop_stop()
    # A clean disconnect flushes everything before it: no last will.
    with MqttRecorder(broker.host, broker.port, "will/#") as wills:
        sub2 = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        sub2.will_set("will/x", b"dead", qos=1)
        _connect(sub2, broker)
        sub2.publish_qos0("will/last-words", b"bye")
        sub2.disconnect()
        sub2.loop_stop()
        wait_for(lambda: wills.messages("will/last-words"), timeout=20, message="last publish lost")
        assert wills.messages("will/x") == []
    sub.disconnect()
    sub.loop_stop()


def test_pause_reading_holds_messages_at_the_broker(broker):
    paused = [False]
    received: list[bytes] = []
    sub = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id="paused", protocol=mqtt.MQTTv5)
    sub.pause_reading = lambda: paused[0]
    sub.on_message = lambda c, u, m: received.append(m.payload)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *args: subscribed.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 60
    _connect(sub, broker, props)
    sub.subscribe("p", qos=1)
    assert subscribed.wait(20)
    paused[0] = True
    pub = _connect(mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5), broker)
    try:
        for i in range(50):
            pub.publish("p", str(i).encode(), qos=1).wait_for_publish(timeout=20)
        assert received == []
        assert sub.is_connected()  # writes and keep-alives went on
        paused[0] = False
        wait_for(lambda: len(received) == 50, timeout=30, message=lambda: f"got {len(received)}")
        assert received == [str(i).encode() for i in range(50)]
    finally:
        pub.disconnect()
        pub.loop_stop()
        sub.disconnect()
        sub.loop_stop()


def test_messages_with_properties_and_topic_callbacks_take_paho_own_path(broker):
    got: list[tuple[str, bytes, list]] = []
    filtered: list[bytes] = []
    sub = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *args: subscribed.set()
    sub.on_message = lambda c, u, m: got.append(
        (m.topic, m.payload, getattr(m.properties, "UserProperty", [])))
    _connect(sub, broker)
    sub.subscribe([("plain/#", 1), ("props/#", 1), ("filtered/#", 0)])
    assert subscribed.wait(20)
    pub = _connect(mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5), broker)
    try:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = ("site", "north")
        pub.publish("plain/a", b"1", qos=1).wait_for_publish(20)
        pub.publish("props/b", b"2", qos=1, properties=props).wait_for_publish(20)
        pub.publish("plain/c", b"", qos=0).wait_for_publish(20)
        wait_for(lambda: len(got) == 3, timeout=20, message=lambda: str(got))
        assert got == [("plain/a", b"1", []), ("props/b", b"2", [("site", "north")]), ("plain/c", b"", [])]
        sub.message_callback_add("filtered/#", lambda c, u, m: filtered.append(m.payload))
        pub.publish("filtered/x", b"3", qos=0).wait_for_publish(20)
        wait_for(lambda: filtered == [b"3"], timeout=20, message=lambda: str(filtered))
        assert len(got) == 3
    finally:
        pub.disconnect()
        pub.loop_stop()
        sub.disconnect()
        sub.loop_stop()
