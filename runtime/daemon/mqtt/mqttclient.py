"""paho's MQTT client with its per-message costs taken out, for a daemon that handles thousands a second.

Measured with py-spy on the daemon draining queued readings, stock paho 2.x
spends most of its time on system calls and bookkeeping, not on MQTT:

- **reading**: each incoming packet is read with at least three ``recv`` calls
  (the command byte, the length bytes one by one, the body). Here the socket
  is read 64 KiB at a time and packets are cut from that buffer; after a read,
  whatever whole packets the buffer still holds are handled before paho goes
  back to ``select``.
- **decoding**: each incoming PUBLISH gets a Properties object, a message-info
  object with a lock and a condition, and a topic-filter lookup. A QoS 0/1
  PUBLISH without properties is decoded here without them (anything else,
  and any client with per-topic callbacks, takes paho's own path).
- **writing**: each outgoing packet is one ``send`` call. Here the packets that
  paho writes in one go are joined and sent together (the bytes not taken by
  the kernel wait for the socket to be writable, as paho's own would); a
  DISCONNECT first flushes everything before it. The socket gets TCP_NODELAY.
- **publishing and acknowledging**: :meth:`BufferedClient.publish_many_qos0` and
  :meth:`BufferedClient.ack_many` build QoS 0 PUBLISH and PUBACK packets
  themselves, a whole batch as one write, instead of a message-info object
  and a queued packet per message.
- **waking**: every packet queued from another thread writes a byte to a socket
  pair to wake paho's network thread. Inside :meth:`BufferedClient.batch` the
  engine thread queues its packets without that, and wakes it once at the end.
- **flow control**: while ``pause_reading()`` is true nothing more is read from
  the socket, so a burst waits at the broker instead of in memory, while
  writes and keep-alives go on.

Measured with ``faultwatch bench`` (1,000 devices, queued QoS 1 readings drained,
medians of 4 alternating rounds, 2 shared cores): the daemon drains about as fast
as a bare stock-paho subscriber that does nothing with the readings (18,000/s vs
16,600/s); with stock paho it managed 40-66% of that subscriber's rate.

These hook paho's private methods (``_sock_recv``, ``_sock_send``,
``_packet_write``, ``_packet_queue``, ``_handle_publish``, ``loop_read``,
``want_write``) and attributes (``_sockpairW``, ``_sock``, ``_protocol``,
``_out_packet``, ``_in_packet``, ...; :data:`PAHO_METHODS`, :data:`PAHO_ATTRIBUTES`),
present in the paho versions pyproject admits (the ones tested);
``tests/integration/daemon/test_daemon_mqttclient.py`` fails if they go away, and
the daemon falls back to paho's own client (:mod:`.transport`) if the installed
paho lacks one. Bytes
buffered for a connection are dropped when it is lost: QoS 1 messages are
resent by paho on reconnect, unacknowledged readings are redelivered by the
broker.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

READ_CHUNK = 65536
_PUBLISH = 0x30
_PUBACK = 0x40
_PUBACK_HEAD = b"\x40\x02"  # PUBACK, remaining length 2: the packet id (reason 0 omitted, as v5 allows)
WRITE_EVERY = 64  # while reading a long burst, flush the writes every this many packets
_DISCONNECT = 0xE0
_MS_INVALID = mqtt.MessageState.MQTT_MS_INVALID  # the state paho gives a received message (== 0)

# What of paho's private API BufferedClient uses: methods it overrides or calls, attributes it reads.
PAHO_METHODS = ("_sock_recv", "_sock_send", "_packet_write", "_packet_queue", "_handle_publish",
                "_send_puback", "_easy_log", "loop_read", "want_write", "reconnect")
PAHO_ATTRIBUTES = ("_sockpairW", "_sock", "_protocol", "_out_packet", "_in_packet", "_in_callback_mutex",
                   "_manual_ack", "_userdata", "suppress_exceptions")


class _Published:
    """Stands in for paho's MQTTMessageInfo of a fast QoS 0 publish (paho marks it sent)."""

    def _set_as_published(self) -> None:
        pass


_PUBLISHED = _Published()


def _varint(n: int) -> bytes:
    """MQTT's variable byte integer."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


class BufferedClient(mqtt.Client):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._wbuf = bytearray()
        self._batch_thread: int | None = None
        self._batch_queued = False
        #: When set and true, nothing more is read from the socket (what is buffered is handled).
        self.pause_reading: Callable[[], bool] | None = None
        self._lean_receive = True

    # -- reading ---------------------------------------------------------------------------

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            if self.pause_reading is not None and self.pause_reading():
                # Flow control: leave the rest in the socket (and so at the broker) for now. The
                # short sleep keeps the loop from spinning; writes and keep-alives go on.
                time.sleep(0.001)
                raise BlockingIOError
            data = super()._sock_recv(READ_CHUNK)  # raises BlockingIOError when nothing is there
            if not data:
                return data  # the connection closed
            self._rbuf, self._rpos = data, 0
        end = self._rpos + bufsize
        chunk = self._rbuf[self._rpos:end]
        self._rpos = min(end, len(self._rbuf))
        return chunk

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        # select() only knows about the socket: handle what is already buffered now, writing
        # now and then so that acknowledgements flow while a long burst is read.
        n = 0
        while rc == mqtt.MQTT_ERR_SUCCESS and self._rpos < len(self._rbuf) and self._sock is not None:
            n += 1
            if n % WRITE_EVERY == 0 and self.want_write():
                rc = self.loop_write()
                if rc != mqtt.MQTT_ERR_SUCCESS or self._sock is None:
                    break
            rc = super().loop_read(max_packets)
        return rc

    def reconnect(self) -> mqtt.MQTTErrorCode:
        # Bytes of a dead connection mean nothing on a new one.
        self._rbuf, self._rpos = b"", 0
        self._wbuf.clear()
        rc = super().reconnect()
        # Writes are joined here already: Nagle's algorithm would only add delay (~40 ms
        # with delayed ACKs) to each batch's forecasts and acknowledgements.
        with contextlib.suppress(OSError, AttributeError):
            sock: Any = self._sock  # a socket.socket, or an SSLSocket around one
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return rc

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        """An incoming QoS 0/1 PUBLISH without properties, decoded without paho's per-message
        costs (a Properties object, a message-info object with its lock and condition, a
        topic-filter lookup, struct formats built per call). Anything else goes to paho."""
        header, packet = self._in_packet["command"], self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        if qos == 2 or not self._lean_receive:
            return super()._handle_publish()
        end = 2 + int.from_bytes(packet[0:2], "big")
        topic = bytes(packet[2:end])
        if len(topic) != end - 2 or (not topic and self._protocol != mqtt.MQTTv5):
            return super()._handle_publish()  # malformed: paho says so
        mid = 0
        if qos:
            mid = int.from_bytes(packet[end:end + 2], "big")
            end += 2
        if self._protocol == mqtt.MQTTv5:
            if len(packet) <= end or packet[end] != 0:  # properties present (or malformed): paho's
                return super()._handle_publish()
            end += 1
        if len(packet) < end:
            return super()._handle_publish()
        message = mqtt.MQTTMessage.__new__(mqtt.MQTTMessage)
        message.timestamp, message.state, message.properties = 0.0, _MS_INVALID, None
        message.info = None  # type: ignore[assignment]  # no MQTTMessageInfo (its lock is the cost saved)
        message.mid, message._topic, message.qos = mid, topic, qos
        message.dup, message.retain = bool(header & 0x08), bool(header & 0x01)
        message.payload = bytes(packet[end:])
        on_message = self.on_message
        if on_message is not None:
            with self._in_callback_mutex:
                try:
                    on_message(self, self._userdata, message)
                except Exception as err:
                    self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                    if not self.suppress_exceptions:
                        raise
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return mqtt.MQTT_ERR_SUCCESS

    def message_callback_add(self, sub, callback) -> None:
        self._lean_receive = False  # per-topic callbacks: paho's own dispatch
        super().message_callback_add(sub, callback)

    # -- writing ---------------------------------------------------------------------------

    def _sock_send(self, buf) -> int:
        if buf[:1] and buf[0] & 0xF0 == _DISCONNECT:
            if self._flush() != mqtt.MQTT_ERR_SUCCESS:
                raise BlockingIOError  # paho keeps the DISCONNECT queued and tries again
            return super()._sock_send(buf)
        self._wbuf += buf
        return len(buf)

    def _flush(self) -> mqtt.MQTTErrorCode:
        while self._wbuf:
            try:
                sent = super()._sock_send(self._wbuf)
            except BlockingIOError:
                return mqtt.MQTT_ERR_AGAIN
            except OSError:
                self._wbuf.clear()
                return mqtt.MQTT_ERR_CONN_LOST
            del self._wbuf[:sent]
        return mqtt.MQTT_ERR_SUCCESS

    def _packet_write(self) -> mqtt.MQTTErrorCode:
        rc = super()._packet_write()  # paho's bookkeeping; the bytes land in _wbuf
        if self._sock is None:
            self._wbuf.clear()
            return rc
        flushed = self._flush()
        return rc if rc != mqtt.MQTT_ERR_SUCCESS else flushed

    def want_write(self) -> bool:
        return super().want_write() or bool(self._wbuf)

    def publish_qos0(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """A QoS 0 PUBLISH without paho's per-message bookkeeping (no MQTTMessageInfo, no lock).

        ``topic`` must be a valid topic name (no wildcards). Returns False, sending nothing,
        when there is no connection.
        """
        return self.publish_many_qos0([topic], [payload], retain)

    def publish_many_qos0(self, topics: list[str], payloads: list[bytes], retain: bool = False) -> bool:
        """Many QoS 0 PUBLISHes, in order, queued as one write: paho handles them as one packet."""
        if self._sock is None or not self.is_connected():
            return False
        props = b"\x00" if self._protocol == mqtt.MQTTv5 else b""  # no properties
        head = bytes((_PUBLISH | bool(retain),))
        parts: list[bytes] = []
        for topic, payload in zip(topics, payloads, strict=True):
            name = topic.encode()
            parts += (head, _varint(2 + len(name) + len(props) + len(payload)),
                      len(name).to_bytes(2, "big"), name, props, payload)
        self._packet_queue(_PUBLISH, b"".join(parts), 0, 0, _PUBLISHED)
        return True

    def ack_many(self, mids: list[int]) -> None:
        """PUBACKs (success) for QoS 1 messages, in order, queued as one write."""
        if mids and self._sock is not None:
            self._packet_queue(_PUBACK, b"".join(_PUBACK_HEAD + mid.to_bytes(2, "big") for mid in mids),
                               0, 0, None)

    def backlog(self) -> int:
        """Bytes queued for the network thread to write."""
        return sum(packet["to_process"] for packet in list(self._out_packet)) + len(self._wbuf)

    # -- waking the network thread once per batch --------------------------------------------

    def _packet_queue(self, *args, **kwargs):
        if self._batch_thread != threading.get_ident():
            return super()._packet_queue(*args, **kwargs)
        self._batch_queued = True
        wake, self._sockpairW = self._sockpairW, None
        try:
            return super()._packet_queue(*args, **kwargs)
        finally:
            if self._sockpairW is None:  # unless a reconnect made a new pair meanwhile
                self._sockpairW = wake

    @contextlib.contextmanager
    def batch(self):
        """Publish and acknowledge many messages from this thread, waking paho once at the end."""
        self._batch_thread, self._batch_queued = threading.get_ident(), False
        try:
            yield self
        finally:
            self._batch_thread = None
            if self._batch_queued:
                wake = getattr(self, "_sockpairW", None)
                if wake is not None:
                    with contextlib.suppress(OSError):
                        wake.send(b"0")
