"""The daemon's MQTT session: one client, a persistent session, availability, reconnection.

- MQTT v5, ``clean_start=False`` with a session expiry, so QoS 1 readings wait at the
  broker while the daemon is away; a Receive Maximum bounds what is in flight to it.
- Availability on ``{prefix}/status``: ``online`` (retained) on every connect, ``offline``
  as the retained last will, ``stopped`` on a clean exit.
- Subscriptions are made in ``on_connect``, so every reconnect renews them.
- Reconnection with exponential backoff (``broker.reconnect_min_s`` .. ``reconnect_max_s``).
  A refused connection (bad credentials, ...) is logged and counted as refused, and the
  session is not reported connected; a broker that can't be reached (or whose TLS
  handshake fails, with the reason: an unknown CA, a name mismatch) is logged at most every 30 s.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

from faultwatch.runtime.daemon.config import Config
from faultwatch.runtime.daemon.mqtt.transport import make_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger("faultwatch")

SESSION_TAKEN_OVER = 142  # MQTT v5 DISCONNECT reason code (Mosquitto 2.0.11 just closes the socket)
QUICK_DROP_S = 10.0  # a connection closed sooner than this after connecting backs the next attempt off


def connect_failure(exc: BaseException | None) -> str:
    """One line on why a connection attempt failed, for the log and /healthz.

    >>> connect_failure(ConnectionRefusedError(111, "Connection refused"))
    'unreachable: Connection refused'
    >>> e = ssl.SSLCertVerificationError(1, "certificate verify failed")
    >>> e.verify_message = "unable to get local issuer certificate"
    >>> connect_failure(e)
    'TLS handshake failed: unable to get local issuer certificate (check broker.tls_ca_file)'
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = getattr(exc, "verify_message", None) or str(exc)
        return f"TLS handshake failed: {why} (check broker.tls_ca_file)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return f"unreachable: {exc.strerror or exc}"
    return "unreachable"


class Connection:
    def __init__(self, config: Config, status_topic: str, subscriptions: list[tuple[str, int]],
                 on_message: Callable, pause_reading: Callable[[], bool] | None = None):
        self.config = config
        self.status_topic = status_topic
        self.subscriptions = subscriptions
        self._subscribe_mid = -1  # the SUBACK that announces `online`
        self.counters: Counter = Counter()  # counted on the network thread only
        self.error = ""  # why the last connection attempt failed: "refused: ...", "unreachable"
        self.resumed_at = -float("inf")  # time.monotonic() of the last connect to a present session
        self.connected = threading.Event()
        self.stopping = False
        self._last_fail_log = 0.0
        self._quick_drops = 0  # connections in a row closed soon after connecting (a session takeover?)
        self._connected_at = -float("inf")
        b = config.broker
        client = make_client(b.client, b.client_id)
        if b.username:
            client.username_pw_set(b.username, config.password())
        if b.tls_ca_file:
            client.tls_set(ca_certs=b.tls_ca_file, certfile=b.tls_cert_file or None,
                           keyfile=b.tls_key_file or None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.will_set(status_topic, "offline", qos=1, retain=True)
        # paho annotates the delays as int; they are used as seconds, fractions included.
        client.reconnect_delay_set(min_delay=b.reconnect_min_s, max_delay=b.reconnect_max_s)  # type: ignore[arg-type]
        client.max_queued_messages_set(0)
        # Every QoS 1 output goes out at once, in order with the acknowledgements queued after it.
        client.max_inflight_messages_set(0)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = on_message
        client.pause_reading = pause_reading
        self.client = client

    def start(self) -> None:
        b = self.config.broker
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = b.session_expiry_s
        props.ReceiveMaximum = b.receive_maximum
        self.client.connect_async(b.host, b.port, keepalive=b.keepalive_s, clean_start=False,
                                  properties=props)
        self.client.loop_start()

    def is_connected(self) -> bool:
        return self.client.is_connected()

    def stop(self, before_stopped: Callable[[], object] | None = None) -> None:
        """Publish ``stopped`` (after ``before_stopped``, while connected) and disconnect."""
        self.stopping = True
        if self.client.is_connected():
            with contextlib.suppress(RuntimeError, ValueError):
                if before_stopped is not None:
                    before_stopped()
                info = self.client.publish(self.status_topic, "stopped", qos=1, retain=True)
                info.wait_for_publish(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()

    # -- callbacks, on paho's network thread ------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        b = self.config.broker
        if reason_code.is_failure:
            self.counters["connect_refused"] += 1
            self.error = f"refused: {reason_code}"
            log.error("broker %s:%d refused the connection: %s", b.host, b.port, reason_code)
            return
        self.counters["connects"] += 1
        self.error = ""
        if flags.session_present:
            self.resumed_at = time.monotonic()
        self.connected.set()
        self._connected_at = time.monotonic()
        log.info("connected to %s:%d (session present: %s)", b.host, b.port, flags.session_present)
        # `online` waits for the SUBACK (_on_subscribe): a publisher that starts sending when it
        # sees `online` must not hit the window before a first-ever subscription exists.
        # Retain handling 2: retained messages are never sent at a subscribe. A retained reading
        # or command would otherwise come again at every reconnect (each renews the
        # subscriptions); messages published while we are subscribed still come, retained or not.
        _, self._subscribe_mid = client.subscribe(
            [(topic, SubscribeOptions(qos=qos, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))
             for topic, qos in self.subscriptions])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            self.counters["subscribe_refused"] += 1
            self.error = f"subscription refused: {', '.join(refused)}"
            log.error("broker refused the subscription to %s: %s", self.subscriptions, ", ".join(refused))
            return
        client.publish(self.status_topic, "online", qos=1, retain=True)

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this from inside its `except OSError:`, so the exception says why.
        self.counters["connect_failures"] += 1
        self.error = connect_failure(sys.exc_info()[1])
        now = time.monotonic()
        if now - self._last_fail_log > 30.0:
            self._last_fail_log = now
            b = self.config.broker
            log.warning("cannot connect to the broker at %s:%d: %s; retrying with backoff (up to %g s)",
                        b.host, b.port, self.error, b.reconnect_max_s)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        lasted = time.monotonic() - self._connected_at
        self._connected_at = -float("inf")
        if self.stopping:
            return
        self.counters["disconnects"] += 1
        b = self.config.broker
        taken_over = getattr(reason_code, "value", None) == SESSION_TAKEN_OVER
        if not taken_over and lasted >= QUICK_DROP_S:
            if self._quick_drops:
                self._quick_drops = 0
                client.reconnect_delay_set(min_delay=b.reconnect_min_s, max_delay=b.reconnect_max_s)
            log.warning("disconnected from broker (%s); reconnecting", reason_code)
            return
        # Closed soon after connecting, or told so: another client took our session. Two daemons
        # with one client_id take it from each other at once, a storm of reconnections; back
        # off instead, doubling the wait at each one in a row.
        self._quick_drops += 1
        delay = min(b.reconnect_max_s, b.reconnect_min_s * 2.0 ** self._quick_drops)
        client.reconnect_delay_set(min_delay=delay, max_delay=max(delay, b.reconnect_max_s))
        if taken_over:
            why = "session taken over by another client (reason code 142)"
        elif self._quick_drops >= 2:
            why = (f"connection closed by the broker {self._quick_drops} times in a row, each within "
                   f"{QUICK_DROP_S:g} s of connecting: most likely a session takeover (MQTT reason code "
                   f"142, which this broker does not send)")
        else:
            log.warning("disconnected from broker (%s) %.1f s after connecting; reconnecting in %.1f s",
                        reason_code, lasted, delay)
            return
        self.counters["session_takeovers"] += 1
        log.error("%s: two daemons (or another client) use broker.client_id %r and take the session "
                  "from each other; give each daemon its own broker.client_id. Reconnecting in %.1f s",
                  why, b.client_id, delay)
