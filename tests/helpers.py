"""Small helpers shared by the tests: polling instead of sleeping, and an MQTT recorder.

Import them as ``from helpers import wait_for, MqttRecorder`` (pyproject's pytest
``pythonpath = ["tests"]`` puts this folder on ``sys.path`` for every test below it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple, TypeVar

import paho.mqtt.client as mqtt

T = TypeVar("T")

#: ``../shared/data`` beside the checkout: real recordings tests read when present.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that value.

    Raises ``AssertionError`` with ``message`` (a string, or a callable evaluated at
    timeout so it can describe the state at that moment) if ``timeout`` seconds pass.
    Exceptions raised by ``predicate`` propagate.

    >>> wait_for(lambda: 42)
    42
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g} s: {text}")
        time.sleep(interval)


class Received(NamedTuple):
    topic: str
    payload: bytes
    retain: bool


class MqttRecorder:
    """Subscribe to ``topics`` at QoS 1 and record every message that arrives.

    Subscriptions are made in ``on_connect`` (so they survive reconnects); the
    constructor returns once the broker has acknowledged them, so a message
    published afterwards is guaranteed to be recorded.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topics: str | Iterable[str],
        *,
        client_id: str = "",
        timeout: float = 20.0,
    ) -> None:
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self._subscribed = threading.Event()
        self._sub_error: str | None = None
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()
        try:
            wait_for(
                self._subscribed.is_set,
                timeout=timeout,
                message=f"MqttRecorder: no SUBACK from {host}:{port} for {self.topics}",
            )
            if self._sub_error:
                raise AssertionError(f"MqttRecorder: subscription refused: {self._sub_error}")
        except BaseException:
            self.close()
            raise

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            client.subscribe([(topic, 1) for topic in self.topics])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            self._sub_error = ", ".join(failed)
        self._subscribed.set()

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self._messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def messages(self, topic_filter: str | None = None) -> list[Received]:
        """A snapshot of the recorded messages, optionally only those matching an
        MQTT topic filter (wildcards ``+`` and ``#`` allowed)."""
        with self._lock:
            snapshot = list(self._messages)
        if topic_filter is None:
            return snapshot
        return [m for m in snapshot if mqtt.topic_matches_sub(topic_filter, m.topic)]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> MqttRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The training side's packages, which the edge install never has.
HEAVY = ("torch", "onnx", "onnxscript", "optuna")

#: Python source that makes :data:`HEAVY` unimportable in the process that runs it (as on an edge
#: install); a test prepends it to the code it runs with ``python -c``.
WITHOUT_HEAVY = f"""
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None

sys.meta_path.insert(0, NotInstalled())
"""
