"""Publishing simulated readings to a broker in the daemon's input format, at a steady rate."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
from faultwatch.runtime.daemon.payload import encode_reading
from faultwatch.runtime.devtools.simulator import CHANNELS, SimData


def publish(
    data: SimData,
    host: str,
    port: int,
    *,
    rate: float = 10.0,
    topic: str = "sensors/{device}",
    qos: int = 1,
    client_id: str = "",
    timeout_s: float = 30.0,
) -> int:
    """Publish every reading, one simulated step per 1/``rate`` seconds (0 = as fast as possible).

    Returns the number of readings the broker acknowledged (QoS 1) or that were sent (QoS 0).
    """
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        infos = []
        start = time.monotonic()
        steps = len(data.timestamps)
        for k in range(steps):
            for d, device in enumerate(data.devices):
                payload = encode_reading(float(data.timestamps[k]),
                                         dict(zip(CHANNELS, data.values[d, k].tolist(), strict=True)))
                infos.append(client.publish(topic.format(device=device), payload, qos=qos))
            if rate > 0:
                delay = start + (k + 1) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # pacing the stream, not waiting on a condition
        deadline = time.monotonic() + timeout_s
        for info in infos:
            info.wait_for_publish(timeout=max(0.0, deadline - time.monotonic()))
        return sum(info.is_published() for info in infos)
    finally:
        client.disconnect()
        client.loop_stop()
