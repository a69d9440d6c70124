"""``faultwatch run``: the edge daemon. MQTT readings in; forecasts and fault events out.

Two threads. paho's network thread only parses and enqueues (a slow model
step must never stall keep-alives). The engine thread takes what is queued,
up to ``max_batch`` readings or ``max_latency_ms``, steps them in one
onnxruntime call, publishes the outputs, and only then acknowledges the
readings to the broker (MQTT v5 manual ack), in the order they arrived. A
reading the daemon dies holding is redelivered by the broker: the persistent
session (``clean_start=False``) keeps it queued while the daemon is away.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import signal
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import Config
from .engine import Engine, EngineSettings, Reading
from .model import StepModel
from .payload import PayloadError, fault_message, forecast_message, parse_reading
from .snapshot import load_snapshot, save_snapshot

log = logging.getLogger("faultwatch")

MAX_DEVICE_ID = 128


@dataclass(frozen=True)
class Inbound:
    """What the network thread hands the engine: a reading, or a rejection reason; and what to ack."""

    reading: Reading | None
    reason: str | None
    mid: int
    qos: int


class TopicMatcher:
    """``sensors/{device}`` ↔ the subscription ``sensors/+`` and the device id of a topic."""

    def __init__(self, template: str):
        self.prefix, _, self.suffix = template.partition("{device}")
        self.subscription = f"{self.prefix}+{self.suffix}"

    def device(self, topic: str) -> str | None:
        if not (topic.startswith(self.prefix) and topic.endswith(self.suffix)):
            return None
        device = topic[len(self.prefix):len(topic) - len(self.suffix)]
        if not device or len(device) > MAX_DEVICE_ID or "/" in device:
            return None
        return device


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.model = StepModel(config.model, threads=config.engine.threads)
        e = config.engine
        self.engine = Engine(self.model, EngineSettings(
            max_devices=e.max_devices, max_batch=e.max_batch,
            threshold=e.threshold or None, warmup=None if e.warmup < 0 else e.warmup,
            raise_k=e.raise_k, window_n=e.window_n, clear_m=e.clear_m,
        ))
        self.features = self.model.contract.features
        self.targets = self.model.contract.targets
        self.topics = TopicMatcher(config.input.topic)
        self.prefix = config.output.prefix
        self.status_topic = f"{self.prefix}/status"
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.counters: Counter = Counter()
        self._last_bad_log = 0.0
        self.state_dir = Path(config.state_dir) if config.state_dir else None
        self._restore()
        self.client = self._client()

    # -- state snapshots -------------------------------------------------------------------

    def _restore(self) -> None:
        if self.state_dir is None:
            return
        saved = load_snapshot(self.state_dir, self.model.sha256)
        if saved is None:
            return
        try:
            n = self.engine.import_state(saved)
        except (KeyError, ValueError) as exc:
            log.warning("state snapshot does not fit the model (%s): starting fresh", exc)
            return
        log.info("restored the state of %d device(s) from %s", n, self.state_dir)

    def _snapshot(self) -> None:
        if self.state_dir is None:
            return
        try:
            save_snapshot(self.state_dir, self.engine.export_state(), self.model.sha256)
            self.counters["snapshots"] += 1
        except OSError as exc:
            self.counters["snapshot_errors"] += 1
            log.error("cannot write state snapshot to %s: %s", self.state_dir, exc)

    # -- MQTT ------------------------------------------------------------------------------

    def _client(self) -> mqtt.Client:
        b = self.config.broker
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=b.client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        if b.username:
            client.username_pw_set(b.username, self.config.password())
        if b.tls_ca_file:
            client.tls_set(ca_certs=b.tls_ca_file, certfile=b.tls_cert_file or None,
                           keyfile=b.tls_key_file or None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            self.counters["connect_refused"] += 1
            return
        self.connected.set()
        self.counters["connects"] += 1
        log.info("connected to %s:%d (session present: %s)", self.config.broker.host,
                 self.config.broker.port, flags.session_present)
        client.publish(self.status_topic, "online", qos=1, retain=True)
        # Subscribing here renews the subscription after every reconnect.
        client.subscribe(self.topics.subscription, qos=self.config.input.qos)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self.stop.is_set():
            log.warning("disconnected from broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        """Network thread: parse and enqueue, nothing more. Never raises (paho's thread would die)."""
        try:
            self.counters["received"] += 1
            device = self.topics.device(message.topic)
            reading, reason = None, None
            if device is None:
                reason = "bad_topic"
            else:
                try:
                    ts, values = parse_reading(message.payload, self.features, now=time.time(),
                                               max_bytes=self.config.input.max_payload_bytes)
                    reading = Reading(device, ts, values)
                except PayloadError as exc:
                    reason = exc.reason
                    self._log_bad(message.topic, exc)
            if message.qos == 0 and self.inbox.qsize() >= self.config.input.max_queue:
                self.counters["dropped_queue_full"] += 1
                return
            self.inbox.put(Inbound(reading, reason, message.mid, message.qos))
        except Exception:  # a bug here must not kill paho's network thread
            self.counters["callback_errors"] += 1
            log.exception("error in on_message")

    def _log_bad(self, topic: str, exc: PayloadError) -> None:
        now = time.monotonic()
        if now - self._last_bad_log > 5.0:  # at most one line per 5 s: a flood must not flood the log
            self._last_bad_log = now
            log.warning("rejected reading on %s: %s (bad payloads so far: %d)", topic[:200], exc,
                        sum(v for k, v in self.counters.items() if k.startswith("bad_")) + 1)

    # -- engine thread ---------------------------------------------------------------------

    def _take_batch(self) -> list[Inbound]:
        try:
            first = self.inbox.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.config.engine.max_latency_ms / 1000.0
        while len(batch) < self.config.engine.max_batch:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(self.inbox.get(timeout=remaining))
                except queue.Empty:
                    break
        return batch

    def _handle(self, batch: list[Inbound]) -> None:
        good = [item for item in batch if item.reading is not None]
        for item in batch:
            if item.reason:
                self.counters[f"bad_{item.reason}"] += 1
        outputs = self.engine.process([item.reading for item in good])
        for item, out in zip(good, outputs, strict=True):
            if out is None:
                self.counters["dropped_out_of_order"] += 1
                continue
            device = item.reading.device
            if self.config.output.forecasts:
                self.client.publish(f"{self.prefix}/{device}/forecast",
                                    forecast_message(out, self.targets, self.engine.threshold),
                                    qos=self.config.output.forecast_qos)
            if out.event is not None:
                self.client.publish(f"{self.prefix}/{device}/fault", fault_message(out.event),
                                    qos=1, retain=True)
                log.info("fault %s on %s (score %.2f, threshold %.2f)%s", out.event.state, device,
                         out.event.peak_score, out.event.threshold,
                         "".join(f" {c['channel']}={c['reading']:.4g} (forecast {c['forecast']:.4g})"
                                 for c in out.event.top_channels))
            self.counters["processed"] += 1
        # Outputs are queued with paho; only now is each reading acknowledged, in arrival order.
        for item in batch:
            if item.qos > 0:
                self.client.ack(item.mid, item.qos)

    def _publish_stats(self) -> None:
        stats = dict(self.counters) | {f"engine_{k}": v for k, v in self.engine.counters.items()}
        stats["devices"] = len(self.engine.devices)
        stats["queue"] = self.inbox.qsize()
        self.client.publish(f"{self.prefix}/stats", json.dumps(stats), qos=0)
        log.info("stats %s", json.dumps(stats, sort_keys=True))

    def run(self) -> int:
        b = self.config.broker
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = b.session_expiry_s
        self.client.connect_async(b.host, b.port, keepalive=b.keepalive_s, clean_start=False,
                                  properties=props)
        self.client.loop_start()
        log.info("faultwatch daemon: model %s (sha256 %s…), %d features, reading %s",
                 self.config.model, self.model.sha256[:12], len(self.features),
                 self.topics.subscription)
        next_stats = time.monotonic() + (self.config.output.stats_interval_s or float("inf"))
        next_snapshot = time.monotonic() + self.config.snapshot_interval_s
        try:
            while not self.stop.is_set():
                batch = self._take_batch()
                if batch:
                    try:
                        self._handle(batch)
                    except Exception:
                        # Unacked readings are redelivered after a restart; say so and stop.
                        log.exception("engine failure; stopping without acknowledging the batch")
                        return 1
                if time.monotonic() >= next_snapshot:
                    self._snapshot()
                    next_snapshot = time.monotonic() + self.config.snapshot_interval_s
                if time.monotonic() >= next_stats:
                    self._publish_stats()
                    next_stats = time.monotonic() + self.config.output.stats_interval_s
        finally:
            self._shutdown()
        return 0

    def _shutdown(self) -> None:
        self._snapshot()
        log.info("stopping: %s", json.dumps(dict(self.counters), sort_keys=True))
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, "stopped", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()


def run_daemon(config: Config) -> int:
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(message)s")
    daemon = Daemon(config)

    def _stop(signum, frame) -> None:
        daemon.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return daemon.run()
