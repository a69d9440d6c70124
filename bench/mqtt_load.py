"""The load side of the daemon benchmark (:mod:`.speed_daemon`): simulated devices published over
MQTT, listeners that time what arrives, and the two actors that run as processes of their own
(the paced publisher and the bare paho subscriber the daemon is compared with).

The bench's own publisher and listeners set TCP_NODELAY: one connection stands in for a
thousand devices, each of which would send on its own idle connection, where Nagle's
algorithm never holds a packet. The bare subscriber keeps paho's defaults, as the daemon does.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import paho.mqtt.client as mqtt
from faultwatch.runtime.daemon.payload import encode_reading
from faultwatch.runtime.devtools.simulator import CHANNELS, simulate
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PROBE = "bench-probe"
TOPIC = "sensors/{device}"
PREFIX = "faultwatch"


def wait_until(predicate, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)  # polling interval
    return True


# -- MQTT helpers ------------------------------------------------------------------------


def _nodelay(client, userdata, sock) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_client(host: str, port: int, client_id: str = "", persistent: bool = False) -> mqtt.Client:
    """A connected paho client of the bench (TCP_NODELAY) with its network thread running."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.on_socket_open = _nodelay
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set()
    props = None
    if persistent:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
    client.connect(host, port, keepalive=60, clean_start=not persistent, properties=props)
    client.loop_start()
    if not connected.wait(10):
        client.loop_stop()
        raise RuntimeError(f"bench: no CONNACK from {host}:{port}")
    return client


def subscribe(client: mqtt.Client, topics: list[str]) -> None:
    done = threading.Event()
    client.on_subscribe = lambda c, u, mid, rcs, p: done.set()
    client.subscribe([(t, 1) for t in topics])
    if not done.wait(10):
        raise RuntimeError(f"bench: no SUBACK for {len(topics)} topic(s)")


def close_client(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


class Arrivals:
    """(topic, payload, monotonic time) of every message; the network thread only appends."""

    def __init__(self, host: str, port: int, topics: list[str]):
        self.items: list[tuple[str, bytes | bytearray, float]] = []
        self.client = connect_client(host, port)
        self.client.on_message = lambda c, u, m: self.items.append((m.topic, m.payload, time.monotonic()))
        subscribe(self.client, topics)

    def count(self, suffix: str) -> int:
        """Messages on topics ending with ``suffix``, the cold-start probe's left out."""
        return sum(1 for topic, _, _ in list(self.items) if topic.endswith(suffix) and PROBE not in topic)

    def by_reading(self, kind: str) -> dict[tuple[str, float], float]:
        """(device, ts) → receipt time, of the forecasts (kind "forecast") or readings ("reading")."""
        head, tail = (PREFIX, "forecast") if kind == "forecast" else (TOPIC.split("/")[0], None)
        out = {}
        for topic, payload, t in list(self.items):
            parts = topic.split("/")
            if parts[0] == head and (tail is None or parts[-1] == tail):
                out[(parts[1], round(json.loads(payload)["ts"], 3))] = t
        return out

    def close(self) -> None:
        close_client(self.client)


def reading_payloads(devices: int, steps: int, seed: int) -> tuple[list[str], np.ndarray, list[list[bytes]]]:
    """Simulated readings as ready MQTT payloads: ids, timestamps [T], payloads[t][d]."""
    data = simulate(devices=devices, steps=steps, seed=seed)
    values = data.values.tolist()
    payloads = [[encode_reading(float(ts), dict(zip(CHANNELS, values[d][k], strict=True)))
                 for d in range(devices)] for k, ts in enumerate(data.timestamps)]
    return data.devices, data.timestamps, payloads


def publish_all(publisher: mqtt.Client, ids: list[str], payloads: list[list[bytes]],
                 timeout: float = 120) -> None:
    infos = [publisher.publish(TOPIC.format(device=d), p, qos=1)
             for step in payloads for d, p in zip(ids, step, strict=True)]
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
    if not all(info.is_published() for info in infos):
        raise RuntimeError("bench: the broker did not acknowledge every queued reading")


# -- paced load (a child process) --------------------------------------------------------


@dataclass(frozen=True)
class Paced:
    """What the paced publisher sends: steps [first, last) of a simulated fleet, one reading
    per device per ``period_s``, the devices spread over the period in 20 slices."""

    host: str
    port: int
    devices: int
    total_steps: int  # of the simulated stream, so every phase continues the same time line
    seed: int
    first: int
    last: int
    period_s: float
    every: int  # send times are reported for every `every`-th device


def paced_publisher() -> None:
    """Child process: publish as :class:`Paced` (JSON in argv[1]) says; print the send times."""
    spec = Paced(**json.loads(sys.argv[1]))
    ids, stamps, payloads = reading_payloads(spec.devices, spec.total_steps, spec.seed)
    client = connect_client(spec.host, spec.port)
    slices = 20
    per = -(-len(ids) // slices)
    sent, infos = [], []
    start = time.monotonic()
    for k in range(spec.first, spec.last):
        ts = round(float(stamps[k]), 3)
        for j in range(slices):
            delay = start + ((k - spec.first) + j / slices) * spec.period_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing: the devices report spread over the period
            for d in range(j * per, min((j + 1) * per, len(ids))):
                if d % spec.every == 0:
                    sent.append((ids[d], ts, time.monotonic()))
                infos.append(client.publish(TOPIC.format(device=ids[d]), payloads[k][d], qos=1))
    elapsed = time.monotonic() - start
    for info in infos:
        info.wait_for_publish(timeout=60)
    close_client(client)
    print(json.dumps({"sent": sent, "start": start, "elapsed": elapsed,
                      "acked": sum(info.is_published() for info in infos)}))


def run_paced(spec: Paced) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", "from faultwatch.bench.mqtt_load import paced_publisher; "
         "paced_publisher()", json.dumps(asdict(spec))],
        capture_output=True, text=True, timeout=(spec.last - spec.first) * spec.period_s + 120, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench: the paced publisher failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the baseline: a bare subscriber (a child process) -------------------------------------


class BareSubscriber:
    """The baseline: a paho client with a persistent QoS 1 session that only counts.

    It runs in a process of its own, as the daemon does, so neither shares an
    interpreter (GIL, garbage collector) with the bench's publisher and listeners.
    """

    client_id = "bench-bare-subscriber"

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._child("subscribe", 0)

    def _child(self, mode: str, expected: int, timeout: float = 120) -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", "from faultwatch.bench.mqtt_load import bare_subscriber; "
             "bare_subscriber()", self.host, str(self.port), mode, str(expected)],
            capture_output=True, text=True, timeout=timeout + 30, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"bench: the bare subscriber failed:\n{proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def drain(self, expected: int) -> float:
        """Connect, take the queued readings, disconnect; messages/s from the first to the last."""
        return self._child("drain", expected)["rate"]


def bare_subscriber() -> None:
    """Child process of :class:`BareSubscriber`; argv: host port subscribe|drain expected."""
    host, port, mode, expected = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    if mode == "subscribe":
        client = connect_client(host, port, BareSubscriber.client_id, persistent=True)
        subscribe(client, [TOPIC.format(device="+")])
        close_client(client)
        print(json.dumps({"subscribed": True}))
        return
    times: list[float] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=BareSubscriber.client_id,
                         protocol=mqtt.MQTTv5)
    client.on_message = lambda c, u, m: times.append(time.monotonic())
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect(host, port, keepalive=60, clean_start=False, properties=props)
    client.loop_start()
    try:
        wait_until(lambda: len(times) >= expected, 120)
    finally:
        close_client(client)
    if len(times) < expected:
        raise SystemExit(f"got {len(times)} of {expected} readings")
    print(json.dumps({"rate": (len(times) - 1) / (times[-1] - times[0]), "received": len(times)}))
