"""The seam between the daemon and its MQTT client: what the daemon uses of one, and two of them.

Both are paho ``Client`` subclasses, so :mod:`.connection` configures them (credentials,
TLS, last will, backoff) and gets its callbacks from them through paho's public API. Chosen by
``broker.client``:

- ``"fast"`` (the default): :class:`~faultwatch.runtime.daemon.mqtt.mqttclient.BufferedClient`,
  paho with its per-message costs taken out by overriding private methods. If the installed paho
  lacks one of them, the daemon falls back to ``"paho"`` with one warning line.
- ``"paho"``: :class:`StockClient`, paho's public API only (``manual_ack_set``/``ack``). One
  packet, one system call and one wake-up per forecast and per acknowledgement, so it drains
  a backlog more slowly, and it has no flow control of its own: what is in flight to the
  daemon is bounded by the broker honouring ``broker.receive_maximum`` (readings are
  acknowledged only after they are processed), not by ``input.max_queue``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import paho.mqtt.client as mqtt

if TYPE_CHECKING:
    from faultwatch.runtime.daemon.mqtt.mqttclient import BufferedClient

log = logging.getLogger("faultwatch")


class Transport(Protocol):
    """What the daemon uses of an MQTT client (paho's signatures; callbacks are paho's VERSION2)."""

    on_connect: Callable[..., None] | None
    on_connect_fail: Callable[..., None] | None
    on_subscribe: Callable[..., None] | None
    on_disconnect: Callable[..., None] | None
    on_message: Callable[..., None] | None
    #: When set and true, the client reads nothing more from the broker for now (flow control).
    pause_reading: Callable[[], bool] | None

    def connect_async(self, host: str, port: int = 1883, keepalive: int = 60, bind_address: str = "",
                      bind_port: int = 0, clean_start: Any = ..., properties: Any = None) -> None: ...
    def loop_start(self) -> Any: ...
    def loop_stop(self) -> Any: ...
    def disconnect(self, *args: Any, **kwargs: Any) -> Any: ...
    def is_connected(self) -> bool: ...
    def subscribe(self, topic: Any, *args: Any, **kwargs: Any) -> tuple[Any, int | None]: ...
    def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False,
                properties: Any = None) -> mqtt.MQTTMessageInfo: ...

    def ack_many(self, mids: list[int]) -> None:
        """Acknowledge these QoS 1 messages (manual acknowledgement), in order."""

    def backlog(self) -> int:
        """Bytes queued for the network thread to write (0 when the client can't tell)."""

    def batch(self) -> contextlib.AbstractContextManager[Any]:
        """Around many publishes and acks from the engine thread (the fast client wakes paho once)."""


class StockClient(mqtt.Client):
    """paho's client as shipped, public API only; see the module doc for what that costs."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        #: Accepted for the Transport protocol; paho's public API has no way to stop reading.
        self.pause_reading: Callable[[], bool] | None = None

    def ack_many(self, mids: list[int]) -> None:
        for mid in mids:
            self.ack(mid, 1)

    def backlog(self) -> int:
        return 0  # paho keeps no public count of what waits to be written

    @contextlib.contextmanager
    def batch(self) -> Iterator[StockClient]:
        yield self


def missing_hooks() -> list[str]:
    """The private parts of paho's client that BufferedClient uses and the installed paho lacks."""
    from faultwatch.runtime.daemon.mqtt.mqttclient import PAHO_ATTRIBUTES, PAHO_METHODS

    missing = [name for name in PAHO_METHODS if not callable(getattr(mqtt.Client, name, None))]
    probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)  # opens no socket
    return missing + [name for name in PAHO_ATTRIBUTES if not hasattr(probe, name)]


def paho_version() -> str:
    import paho.mqtt

    return str(getattr(paho.mqtt, "__version__", "?"))


def make_client(kind: str, client_id: str) -> BufferedClient | StockClient:
    """An MQTT v5 client with manual acknowledgement, of ``kind`` ("fast" or "paho")."""
    if kind == "fast":
        missing = missing_hooks()
        if not missing:
            from faultwatch.runtime.daemon.mqtt.mqttclient import BufferedClient

            return BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5, manual_ack=True)
        log.warning("broker.client = \"fast\" needs paho's %s, which paho-mqtt %s lacks: using paho's "
                    "own client (slower)", ", ".join(missing), paho_version())
    client = StockClient(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.manual_ack_set(True)
    return client
