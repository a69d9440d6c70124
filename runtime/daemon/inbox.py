"""The daemon's way in: paho's network thread parses each message and queues it here for the
engine thread, nothing more (a slow model step must never stall keep-alives).

Queued items are small named tuples (thousands a second), one type per kind:
:class:`ReadingItem` (a whole reading), :class:`ChannelItem` (one channel's value, on a
per-channel topic), :class:`RejectItem` (counted by the engine thread, acknowledged all
the same) and :class:`OtherPartitionItem` (a device of another daemon's partition,
``input.partitions``: counted and acknowledged, not parsed). :mod:`.intake` turns them
into readings.

``received`` is ``time.monotonic()`` at arrival. The queue is bounded: beyond
``input.max_queue`` a QoS 0 reading is dropped (counted), while for QoS 1 the
client stops reading from its socket (:attr:`BufferedClient.pause_reading`), so
the broker keeps the rest until the engine catches up.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import paho.mqtt.client as mqtt
from faultwatch.runtime.daemon.config import Config
from faultwatch.runtime.daemon.payload import PayloadError, parse_reading, parse_value
from faultwatch.runtime.daemon.topics import TopicMatcher, device_partition

log = logging.getLogger("faultwatch")



class ReadingItem(NamedTuple):
    """A whole reading: every channel in one payload."""

    device: str
    ts: float
    values: np.ndarray  # [F], in the order of `features`
    features: tuple[str, ...]  # the model's features when it was parsed (a reload may change them)
    mid: int
    qos: int
    received: float


class ChannelItem(NamedTuple):
    """One channel's value, from a per-channel topic (``{device}/{channel}``)."""

    device: str
    ts: float
    value: float
    channel: str
    mid: int
    qos: int
    received: float


class RejectItem(NamedTuple):
    """A message that is not a reading (``reason`` names why): counted, acknowledged."""

    reason: str
    mid: int
    qos: int


class OtherPartitionItem(NamedTuple):
    """A reading of a device another daemon's partition steps: counted, acknowledged, not parsed."""

    mid: int
    qos: int


class ForgetItem(NamedTuple):
    """``{prefix}/command/forget`` (``commands.enabled``): withdraw ``device``."""

    device: str


InboxItem = ReadingItem | ChannelItem | RejectItem | OtherPartitionItem | ForgetItem

MAX_DEVICE_ID = 256  # characters of a device id in a forget command


def device_id(payload: bytes | bytearray) -> str | None:
    """The device id a forget command names (one topic level), or None.

    >>> device_id(b" pump-7 "), device_id(b"a/b"), device_id(b"#"), device_id(b"")
    ('pump-7', None, None, None)
    """
    try:
        text = payload[:4 * MAX_DEVICE_ID + 1].decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if not 0 < len(text) <= MAX_DEVICE_ID or any(c in text for c in "/+#\0"):
        return None
    return text


class Inbox:
    def __init__(self, config: Config, features: tuple[str, ...], command_topic: str,
                 on_command: Callable[[], None]):
        self.topics = TopicMatcher(config.topics)
        self.features = features  # replaced (one reference) when a reload changes the model
        self.max_queue = config.input.max_queue
        self.max_bytes = config.input.max_payload_bytes
        self.partitions, self.partition = config.input.partitions, config.input.partition
        self.command_topic = command_topic
        self.on_command = on_command
        self.forget_topic = f"{config.output.prefix}/command/forget" if config.commands.enabled else None
        self.items: deque[InboxItem] = deque()
        self.wakeup = threading.Event()
        self.counters: Counter = Counter()  # counted on the network thread only
        self._last_bad_log = 0.0

    def __len__(self) -> int:
        return len(self.items)

    def full(self) -> bool:
        return len(self.items) >= self.max_queue

    # -- network thread --------------------------------------------------------------------

    def on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        """paho's on_message. Never raises (paho's thread would die)."""
        try:
            mid, qos = message.mid, message.qos
            try:
                topic = message.topic
            except UnicodeDecodeError:
                topic = ""
            if topic == self.command_topic:
                self.counters["reload_commands"] += 1
                self.on_command()
                return
            if topic == self.forget_topic:
                self._forget(message.payload)
                return
            self.counters["received"] += 1
            found = self.topics.match(topic) if topic else None
            item: InboxItem
            if found is None:
                item = RejectItem("bad_topic", mid, qos)
            elif self.partitions > 1 and device_partition(found[0], self.partitions) != self.partition:
                item = OtherPartitionItem(mid, qos)
            else:
                device, channel = found
                try:
                    if channel is None:
                        features = self.features
                        # No ts: NaN, placed in the device's clock by the engine thread (.clock).
                        ts, values = parse_reading(message.payload, features, math.nan, self.max_bytes)
                        item = ReadingItem(device, ts, values, features, mid, qos, time.monotonic())
                    else:
                        ts, value = parse_value(message.payload, time.time(), self.max_bytes)
                        item = ChannelItem(device, ts, value, channel, mid, qos, time.monotonic())
                except PayloadError as exc:
                    item = RejectItem(exc.reason, mid, qos)
                    self._log_bad(topic, exc)
            if qos == 0 and len(self.items) >= self.max_queue:
                self.counters["dropped_queue_full"] += 1
                return
            self.items.append(item)
            if not self.wakeup.is_set():
                self.wakeup.set()
        except Exception:  # a bug here must not kill paho's network thread
            self.counters["callback_errors"] += 1
            log.exception("error in on_message")

    def _forget(self, payload: bytes | bytearray) -> None:
        device = device_id(payload)
        if device is None:
            self.counters["commands_rejected"] += 1
            log.warning("forget command rejected: the payload must be one device id (at most %d "
                        "characters, no '/', '+' or '#')", MAX_DEVICE_ID)
            return
        self.counters["forget_commands"] += 1
        self.items.append(ForgetItem(device))
        self.wakeup.set()

    def _log_bad(self, topic: str, exc: PayloadError) -> None:
        now = time.monotonic()
        if now - self._last_bad_log > 5.0:  # at most one line per 5 s: a flood must not flood the log
            self._last_bad_log = now
            log.warning("rejected reading on %s: %s (at most one such line per 5 s; all are counted)",
                        topic[:200], exc)

    # -- engine thread ---------------------------------------------------------------------

    def take(self, limit: int, max_latency_s: float, timeout: float,
             hold_until: Callable[[], float] | None = None) -> list[InboxItem]:
        """Up to ``limit`` items: waits up to ``timeout`` for a first one, then up to
        ``max_latency_s`` for the batch to fill, or until ``hold_until()`` (a time.monotonic()
        value, asked once the first item is there) if that is later."""
        if not self.items:
            self.wakeup.wait(timeout)
        self.wakeup.clear()  # before taking: an item added from now on sets it again
        batch: list[InboxItem] = []
        end = time.monotonic() + max_latency_s
        if hold_until is not None and self.items:
            end = max(end, hold_until())
        while True:
            while self.items and len(batch) < limit:
                batch.append(self.items.popleft())
            if not batch or len(batch) >= limit:
                return batch
            remaining = end - time.monotonic()
            if remaining <= 0:
                return batch
            self.wakeup.wait(remaining)
            self.wakeup.clear()
