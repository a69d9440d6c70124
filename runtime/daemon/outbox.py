"""What the daemon publishes while the broker is unreachable is kept, and sent in order on reconnect.

Every message goes through :meth:`Outbox.publish`. While the client is
connected it goes straight to paho. While it is not, messages wait in one
in-memory queue, in the order they were made, and :meth:`Outbox.drain` sends
them once the connection is back, before anything newer. Forecasts are
*droppable*: at most ``max_held`` of them wait, later ones are dropped and
counted (``outbox_full``). Fault events never are; they are also written to a
journal on disk (:class:`FaultJournal`) until the broker has acknowledged
them, so neither a long outage nor a crash loses one: the next start sends
what the journal still holds, first.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter, OrderedDict, deque
from pathlib import Path
from typing import TextIO

import paho.mqtt.client as mqtt
from faultwatch.runtime.daemon.mqtt.transport import Transport

log = logging.getLogger("faultwatch")


class FaultJournal:
    """Fault events on disk until the broker acknowledges them (JSON lines, one per event).

    :meth:`add` appends; :meth:`sync` fsyncs once per batch (before the readings that
    caused the events are acknowledged); :meth:`prune` drops what the broker has
    acknowledged and compacts the file.
    """

    def __init__(self, path: Path, max_entries: int):
        self.path = path
        self.max_entries = max_entries
        self.entries: OrderedDict[int, list] = OrderedDict()  # seq → [topic, payload, info or None]
        self.counters: Counter = Counter()
        self._seq = 0
        self._dirty = False
        self._dropped_since_rewrite = 0
        self._file: TextIO | None = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            log.error("cannot read the fault journal %s: %s", self.path, exc)
            return
        for line in lines:
            try:
                entry = json.loads(line)
                topic, payload = str(entry["topic"]), str(entry["payload"]).encode()
            except (ValueError, KeyError, TypeError):
                self.counters["journal_bad_lines"] += 1  # a line cut short by a crash: skip it
                continue
            self._seq += 1
            self.entries[self._seq] = [topic, payload, None]
        if self.entries:
            log.info("fault journal %s: %d event(s) not yet acknowledged by the broker, sending them first",
                     self.path, len(self.entries))
        self._rewrite()  # drop bad lines, renumber

    def unsent(self) -> list[tuple[int, str, bytes]]:
        return [(seq, e[0], e[1]) for seq, e in self.entries.items() if e[2] is None]

    def _open(self) -> TextIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        return self._file

    def add(self, topic: str, payload: bytes) -> int:
        if len(self.entries) >= self.max_entries:
            self.entries.popitem(last=False)
            self.counters["fault_journal_full"] += 1
            self._dropped_since_rewrite += 1
        self._seq += 1
        self.entries[self._seq] = [topic, payload, None]
        try:
            self._open().write(json.dumps({"topic": topic, "payload": payload.decode()}) + "\n")
            self._dirty = True
        except OSError as exc:
            self.counters["fault_journal_errors"] += 1
            log.error("cannot write the fault journal %s: %s", self.path, exc)
        return self._seq

    def sent(self, seq: int, info: mqtt.MQTTMessageInfo) -> None:
        entry = self.entries.get(seq)
        if entry is not None:
            entry[2] = info

    def sync(self) -> None:
        if self._dirty and self._file is not None:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as exc:
                self.counters["fault_journal_errors"] += 1
                log.error("cannot sync the fault journal %s: %s", self.path, exc)
            self._dirty = False

    def prune(self) -> None:
        """Forget the events the broker has acknowledged; rewrite the file when that pays."""
        done = [seq for seq, e in self.entries.items() if e[2] is not None and e[2].is_published()]
        for seq in done:
            del self.entries[seq]
        self._dropped_since_rewrite += len(done)
        if self._dropped_since_rewrite and (not self.entries or self._dropped_since_rewrite >= 256):
            self._rewrite()

    def _rewrite(self) -> None:
        """Atomically replace the file with the entries still pending (write, fsync, rename)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._dropped_since_rewrite = 0
        try:
            if not self.entries:
                if self.path.exists():
                    self.path.unlink()
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".outbox.", suffix=".jsonl")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for topic, payload, _ in self.entries.values():
                    f.write(json.dumps({"topic": topic, "payload": payload.decode()}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            self.counters["fault_journal_errors"] += 1
            log.error("cannot rewrite the fault journal %s: %s", self.path, exc)

    def close(self) -> None:
        self.sync()
        if self._file is not None:
            self._file.close()
            self._file = None


class Outbox:
    """One ordered way out for everything the engine thread publishes (see the module doc)."""

    def __init__(self, client: Transport, max_held: int, journal: FaultJournal | None = None):
        self.client = client
        self.max_held = max_held
        self.journal = journal
        self.held: deque[tuple] = deque()  # (topic, payload, qos, retain, droppable, journal seq)
        self.held_droppable = 0
        self.counters: Counter = Counter()
        if journal is not None:
            for seq, topic, payload in journal.unsent():
                self.held.append((topic, payload, 1, True, False, seq))

    def __len__(self) -> int:
        return len(self.held)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                droppable: bool = True, journal: bool = False) -> None:
        seq = self.journal.add(topic, payload) if journal and self.journal is not None else None
        item = (topic, payload, qos, retain, droppable, seq)
        if self.held and self.client.is_connected():
            self.drain()
        if self.held or not self.client.is_connected() or not self._send(item):
            self._hold(item)

    def publish_many(self, topics: list[str], payloads: list[bytes], qos: int = 0) -> None:
        """Droppable messages (forecasts), in order: :meth:`publish` for each, without its overhead."""
        if self.held and self.client.is_connected():
            self.drain()
        start = 0
        if not self.held and self.client.is_connected():
            fast = getattr(self.client, "publish_many_qos0", None) if qos == 0 else None
            if fast is not None and fast(topics, payloads):
                return
            for start in range(len(topics)):
                info = self.client.publish(topics[start], payloads[start], qos=qos)
                if info.rc == mqtt.MQTT_ERR_NO_CONN and qos == 0:
                    break  # the connection just went: this one and the rest wait (QoS 1 waits in paho)
            else:
                return
        for topic, payload in zip(topics[start:], payloads[start:], strict=True):
            self._hold((topic, payload, qos, False, True, None))

    def _hold(self, item: tuple) -> None:
        if item[4]:
            if self.held_droppable >= self.max_held:
                self.counters["outbox_full"] += 1
                return
            self.held_droppable += 1
        self.held.append(item)
        self.counters["outbox_held"] += 1

    def _send(self, item: tuple) -> bool:
        """Hand one message to paho; False when paho says there is no connection (nothing queued)."""
        topic, payload, qos, retain, _, seq = item
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_NO_CONN and qos == 0:
            return False  # paho dropped it; a QoS 1 message stays queued in paho and is sent on reconnect
        if seq is not None and self.journal is not None:
            self.journal.sent(seq, info)
        return True

    def drain(self) -> int:
        """Send what waited, in order, while the connection holds; returns how many were sent."""
        sent = 0
        while self.held and self.client.is_connected():
            item = self.held[0]
            if not self._send(item):
                break
            self.held.popleft()
            if item[4]:
                self.held_droppable -= 1
            sent += 1
        if sent:
            self.counters["outbox_sent"] += sent
        return sent
