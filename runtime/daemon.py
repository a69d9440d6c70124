"""``faultwatch run``: the edge daemon. MQTT readings in; forecasts and fault events out.

Two threads. paho's network thread only parses and enqueues (a slow model
step must never stall keep-alives). The engine thread takes what is queued,
up to ``max_batch`` messages or ``max_latency_ms``, assembles per-channel
messages into frames (:mod:`.frames`), steps the readings in one onnxruntime
call, publishes the outputs (through the :mod:`.outbox`, which keeps them
while the broker is away), and only then acknowledges the readings to the
broker (MQTT v5 manual ack). A reading the daemon dies holding is
redelivered by the broker: the persistent session (``clean_start=False``)
keeps it queued while the daemon is away, and a reading already processed
(same device, same or older timestamp) is recognised and not stepped twice.

The engine thread also owns everything else that changes state: snapshots,
hot reload (SIGHUP or ``{prefix}/command/reload``), Home Assistant discovery,
stats. ``/metrics`` and ``/healthz`` are served by a third, read-only thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import ssl
import threading
import time
from collections import Counter, OrderedDict, deque
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import Config, listen_address
from .daemon_metrics import render
from .discovery import Announced, discovery_messages
from .engine import Engine, EngineSettings, Reading
from .frames import FrameAssembler
from .metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Histogram, MetricsServer, TimedModel
from .model import ModelError, StepModel
from .mqttclient import BufferedClient
from .outbox import FaultJournal, Outbox
from .payload import ForecastEncoder, PayloadError, fault_message, parse_reading, parse_value
from .snapshot import load_snapshot, save_snapshot
from .topics import TopicMatcher

log = logging.getLogger("faultwatch")

# What the network thread queues for the engine thread (plain tuples: thousands a second).
READING, CHANNEL, REJECT = 0, 1, 2
# (READING, device, ts, values [F], features they are ordered by, mid, qos, received monotonic)
# (CHANNEL, device, ts, value, channel name, mid, qos, received monotonic)
# (REJECT, reason, mid, qos)
OUT_BACKLOG = 4096  # packets queued for paho's network thread before the engine waits for it


def engine_settings(config: Config) -> EngineSettings:
    """The engine the daemon runs, from its config (``replay`` of the same readings uses it too)."""
    e = config.engine
    return EngineSettings(
        max_devices=e.max_devices, max_batch=e.max_batch,
        threshold=e.threshold or None, warmup=None if e.warmup < 0 else e.warmup,
        raise_k=e.raise_k, window_n=e.window_n, clear_m=e.clear_m, clear_ratio=e.clear_ratio,
        max_gap_periods=e.max_gap_periods,
    )


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.step_seconds = Histogram(LATENCY_BUCKETS)
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)  # reading received → its outputs handed to paho
        self.model = StepModel(config.model, threads=config.engine.threads)
        self.engine = Engine(self._timed(self.model), engine_settings(config))
        self._adopt_contract()
        self.topics = TopicMatcher(config.topics)
        self.prefix = config.output.prefix
        self.status_topic = f"{self.prefix}/status"
        self.command_topic = f"{self.prefix}/command/reload"
        self.inbox: deque[tuple] = deque()
        self._wakeup = threading.Event()
        self.stop = threading.Event()
        self.reload_requested = threading.Event()
        self.connected = threading.Event()
        self.net: Counter = Counter()  # counted by the network thread
        self.counters: Counter = Counter()  # counted by the engine thread
        self.connection_error = ""
        self._last_bad_log = self._last_fail_log = 0.0
        self._last_reload = -float("inf")
        self.started = time.monotonic()
        self.heartbeat = time.monotonic()
        self.announced = Announced(config.engine.max_devices)
        self._nth: OrderedDict[str, int] = OrderedDict()  # readings since the last forecast, per device
        self.seen_at = np.zeros(0)  # per engine slot: wall-clock time of its last processed reading
        self.state_dir = Path(config.state_dir) if config.state_dir else None
        self._restore()
        self.client = self._client()
        journal = (FaultJournal(self.state_dir / "outbox.jsonl", config.output.fault_journal_max)
                   if self.state_dir else None)
        self.outbox = Outbox(self.client, config.output.outbox_max, journal)
        self.metrics_server: MetricsServer | None = None

    def _timed(self, model: StepModel) -> TimedModel:
        return TimedModel(model, self.step_seconds, self.batch_sizes)

    def _adopt_contract(self) -> None:
        """Per-model state of the daemon (the network thread reads ``features`` as one reference)."""
        c = self.model.contract
        self.targets = c.targets
        self.feature_index = {name: i for i, name in enumerate(c.features)}
        self.encoder = ForecastEncoder(c.targets)
        self.frames = FrameAssembler(len(c.features), tolerance_s=c.sample_period_s / 2,
                                     max_wait_s=self.config.input.frame_max_wait_s,
                                     max_pending=self.config.input.max_open_frames)
        self.features = c.features

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

    # -- MQTT (callbacks run on paho's network thread) -------------------------------------

    def _client(self) -> BufferedClient:
        b = self.config.broker
        client = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id=b.client_id,
                                protocol=mqtt.MQTTv5, manual_ack=True)
        if b.username:
            client.username_pw_set(b.username, self.config.password())
        if b.tls_ca_file:
            client.tls_set(ca_certs=b.tls_ca_file, certfile=b.tls_cert_file or None,
                           keyfile=b.tls_key_file or None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=b.reconnect_min_s, max_delay=b.reconnect_max_s)
        client.max_queued_messages_set(0)
        # Every QoS 1 output goes out at once, in order with the acks queued after it.
        client.max_inflight_messages_set(0)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        if self.config.input.qos == 1:
            # QoS 1 readings are never dropped: beyond max_queue they wait at the broker.
            max_queue = self.config.input.max_queue
            client.pause_reading = lambda: len(self.inbox) >= max_queue
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        b = self.config.broker
        if reason_code.is_failure:
            self.net["connect_refused"] += 1
            self.connection_error = f"refused: {reason_code}"
            log.error("broker %s:%d refused the connection: %s", b.host, b.port, reason_code)
            return
        self.net["connects"] += 1
        self.connection_error = ""
        self.connected.set()
        log.info("connected to %s:%d (session present: %s)", b.host, b.port, flags.session_present)
        client.publish(self.status_topic, "online", qos=1, retain=True)
        # Subscribing here renews the subscriptions after every reconnect.
        subscriptions = [(s, self.config.input.qos) for s in self.topics.subscriptions]
        if self.config.reload.mqtt_command:
            subscriptions.append((self.command_topic, 0))
        client.subscribe(subscriptions)

    def _on_connect_fail(self, client, userdata) -> None:
        self.net["connect_failures"] += 1
        self.connection_error = "unreachable"
        now = time.monotonic()
        if now - self._last_fail_log > 30.0:
            self._last_fail_log = now
            log.warning("cannot reach the broker at %s:%d; retrying with backoff (up to %g s)",
                        self.config.broker.host, self.config.broker.port, self.config.broker.reconnect_max_s)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self.stop.is_set():
            self.net["disconnects"] += 1
            log.warning("disconnected from broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        """Network thread: parse and enqueue, nothing more. Never raises (paho's thread would die)."""
        try:
            mid, qos = message.mid, message.qos
            try:
                topic = message.topic
            except UnicodeDecodeError:
                topic = ""
            if topic == self.command_topic:
                self.net["reload_commands"] += 1
                self.reload_requested.set()
                return
            self.net["received"] += 1
            found = self.topics.match(topic) if topic else None
            if found is None:
                item = (REJECT, "bad_topic", mid, qos)
            else:
                device, channel = found
                max_bytes = self.config.input.max_payload_bytes
                try:
                    if channel is None:
                        features = self.features
                        ts, values = parse_reading(message.payload, features, time.time(), max_bytes)
                        item = (READING, device, ts, values, features, mid, qos, time.monotonic())
                    else:
                        ts, value = parse_value(message.payload, time.time(), max_bytes)
                        item = (CHANNEL, device, ts, value, channel, mid, qos, time.monotonic())
                except PayloadError as exc:
                    item = (REJECT, exc.reason, mid, qos)
                    self._log_bad(topic, exc)
            if qos == 0 and len(self.inbox) >= self.config.input.max_queue:
                self.net["dropped_queue_full"] += 1
                return
            self.inbox.append(item)
            if not self._wakeup.is_set():
                self._wakeup.set()
        except Exception:  # a bug here must not kill paho's network thread
            self.net["callback_errors"] += 1
            log.exception("error in on_message")

    def _log_bad(self, topic: str, exc: PayloadError) -> None:
        now = time.monotonic()
        if now - self._last_bad_log > 5.0:  # at most one line per 5 s: a flood must not flood the log
            self._last_bad_log = now
            log.warning("rejected reading on %s: %s (at most one such line per 5 s; all are counted)",
                        topic[:200], exc)

    # -- engine thread ---------------------------------------------------------------------

    def _take_batch(self) -> list[tuple]:
        # Output not yet written by paho's thread bounds what the engine takes on: under load
        # the two threads share the GIL, and memory must not fill with packets waiting to go.
        while self.client.backlog() > OUT_BACKLOG and self.client.is_connected() and not self.stop.is_set():
            time.sleep(0.001)  # backpressure
        timeout = 0.2
        deadline = self.frames.next_deadline()
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()))
        if not self.inbox:
            self._wakeup.wait(timeout)
        self._wakeup.clear()
        batch: list[tuple] = []
        limit = self.config.engine.max_batch
        end = time.monotonic() + self.config.engine.max_latency_ms / 1000.0
        while True:
            while self.inbox and len(batch) < limit:
                batch.append(self.inbox.popleft())
            if not batch or len(batch) >= limit:
                return batch
            remaining = end - time.monotonic()
            if remaining <= 0:
                return batch
            self._wakeup.wait(remaining)
            self._wakeup.clear()

    def _remap(self, values: np.ndarray, features: tuple[str, ...]) -> np.ndarray:
        """A reading parsed for the previous model, in this model's feature order."""
        index = {name: i for i, name in enumerate(features)}
        return np.array([values[index[f]] if f in index else np.nan for f in self.features])

    def _handle(self, batch: list[tuple]) -> None:
        now = time.monotonic()
        readings: list[Reading] = []
        acks: list = []  # per reading: its (mid, qos) tokens
        received: list[float] = []
        rejected: list[tuple[int, int]] = []
        frames = self.frames
        for item in batch:
            kind = item[0]
            if kind == READING:
                _, device, ts, values, features, mid, qos, t = item
                if features is not self.features:
                    values = self._remap(values, features)
                if frames.pending and device in frames.pending:
                    self._add_frame(frames.close_device(device), readings, acks, received)
                readings.append(Reading(device, ts, values))
                acks.append((mid, qos))
                received.append(t)
            elif kind == CHANNEL:
                _, device, ts, value, channel, mid, qos, t = item
                index = self.feature_index.get(channel)
                if index is None:
                    self.counters["ignored_channel"] += 1
                    rejected.append((mid, qos))
                    continue
                for frame in frames.add(device, index, ts, value, (mid, qos), t):
                    self._add_frame(frame, readings, acks, received)
            else:
                self.counters[f"bad_{item[1]}"] += 1
                rejected.append((item[2], item[3]))
        for frame in frames.expire(now):
            self._add_frame(frame, readings, acks, received)
        self._process(readings, acks, received, rejected)

    @staticmethod
    def _add_frame(frame, readings: list, acks: list, received: list) -> None:
        readings.append(Reading(frame.device, frame.ts, frame.values))
        acks.append(frame.acks)
        received.append(frame.opened)

    def _process(self, readings: list[Reading], acks: list, received: list[float],
                 rejected: list[tuple[int, int]]) -> None:
        outputs = [out for out in (self.engine.process(readings) if readings else []) if out is not None]
        self.counters["dropped_out_of_order"] += len(readings) - len(outputs)  # duplicates, or older
        out_cfg = self.config.output
        every = out_cfg.forecast_every if out_cfg.forecasts else 0
        forecast = [out for out in outputs if every == 1 or (every and self._due(out.device, every))]
        with self.client.batch():
            if forecast:
                prefix = self.prefix
                self.outbox.publish_many([f"{prefix}/{out.device}/forecast" for out in forecast],
                                         self.encoder.encode_batch(forecast, self.engine.threshold),
                                         qos=out_cfg.forecast_qos)
            discovery = self.config.homeassistant.discovery
            for out in outputs:
                if out.event is not None:
                    self._publish_event(out.event)
                if discovery and self.announced.new(out.device):
                    self._announce(out.device)
            if self.outbox.journal is not None:
                self.outbox.journal.sync()  # fault events on disk before their readings are acked
            # Outputs are queued with paho; only now is each reading acknowledged.
            for token in acks:
                if isinstance(token, list):
                    for mid, qos in token:
                        if qos:
                            self.client.ack(mid, qos)
                elif token[1]:
                    self.client.ack(*token)
            for mid, qos in rejected:
                if qos:
                    self.client.ack(mid, qos)
        self.counters["processed"] += len(outputs)
        if outputs:
            self._mark_seen([out.device for out in outputs])
        if received:
            self.latency.observe(time.monotonic() - np.asarray(received))

    def _due(self, device: str, every: int) -> bool:
        count = self._nth.pop(device, every - 1) + 1  # a device's first reading is published
        if count >= every:
            count = 0
        elif len(self._nth) >= self.config.engine.max_devices:
            self._nth.popitem(last=False)
        self._nth[device] = count
        return count == 0

    def _mark_seen(self, devices: list[str]) -> None:
        if len(self.seen_at) < self.engine.capacity:
            grown = np.zeros(self.engine.capacity)
            grown[:len(self.seen_at)] = self.seen_at
            self.seen_at = grown
        slots = self.engine.table.slots
        self.seen_at[[slots[d] for d in devices if d in slots]] = time.time()

    def _publish_event(self, event) -> None:
        self.outbox.publish(f"{self.prefix}/{event.device}/fault", fault_message(event), qos=1,
                            retain=True, droppable=False, journal=True)
        log.info("fault %s on %s (score %.2f, threshold %.2f)%s", event.state, event.device,
                 event.peak_score, event.threshold,
                 "".join(f" {c['channel']}={c['reading']:.4g} (forecast {c['forecast']:.4g})"
                         for c in event.top_channels))

    def _announce(self, device: str) -> None:
        for topic, payload in discovery_messages(
                device, self.prefix, self.config.homeassistant.prefix,
                scores=self.config.output.forecasts, model=Path(self.config.model).name):
            self.outbox.publish(topic, payload, qos=1, retain=True, droppable=False)
        self.counters["discovery_announced"] += 1

    # -- hot reload ------------------------------------------------------------------------

    def _reload(self) -> None:
        """Load the model file again; swap it in only if it loads and warms up (else keep the old)."""
        self.reload_requested.clear()
        self._last_reload = time.monotonic()
        path = self.config.model
        try:
            model = StepModel(path, threads=self.config.engine.threads)
        except ModelError as exc:
            self.counters["reloads_failed"] += 1
            log.error("reload rejected, still running %s (sha256 %s…): %s", path, self.model.sha256[:12], exc)
            self._reload_result({"ok": False, "error": str(exc), "sha256": self.model.sha256})
            return
        if model.sha256 == self.model.sha256:
            self.counters["reloads_unchanged"] += 1
            log.info("reload: %s is unchanged (sha256 %s…)", path, model.sha256[:12])
            self._reload_result({"ok": True, "state": "unchanged", "sha256": model.sha256})
            return
        # Samples being assembled are in the old model's channels: finish them with it.
        pending = [(Reading(f.device, f.ts, f.values), f.acks, f.opened) for f in self.frames.flush()]
        if pending:
            readings, acks, received = (list(x) for x in zip(*pending, strict=True))
            self._process(readings, acks, received, [])
        kept = self.engine.swap_model(self._timed(model))
        old, self.model = self.model, model
        self._adopt_contract()
        state = "kept" if kept else "reset"
        self.counters[f"reloads_{state}"] += 1
        log.info("reloaded %s: sha256 %s… → %s…, device state %s%s", path, old.sha256[:12],
                 model.sha256[:12], state, "" if kept else " (another contract: devices warm up again)")
        self._reload_result({"ok": True, "state": state, "sha256": model.sha256})
        self._snapshot()  # the snapshot on disk is tagged with the model it belongs to

    def _reload_result(self, body: dict) -> None:
        self.outbox.publish(f"{self.prefix}/reload", json.dumps({"model": self.config.model} | body).encode(),
                            qos=1, droppable=False)

    # -- stats and health ------------------------------------------------------------------

    def stats(self) -> dict:
        stats = dict(self.net) | dict(self.counters)
        stats |= {f"engine_{k}": v for k, v in dict(self.engine.counters).items()}
        stats |= {f"frames_{k}": v for k, v in dict(self.frames.counters).items()}
        stats |= dict(self.outbox.counters)
        stats["devices"] = len(self.engine.table.slots)
        stats["queue"] = len(self.inbox)
        return stats

    def _publish_stats(self) -> None:
        stats = self.stats()
        self.outbox.publish(f"{self.prefix}/stats", json.dumps(stats).encode(), qos=0)
        log.info("stats %s", json.dumps(stats, sort_keys=True))

    def health(self) -> tuple[bool, bool, dict]:
        """(engine loop alive, connected, details) for /healthz and /readyz."""
        stalled_s = time.monotonic() - self.heartbeat
        live = stalled_s < 30.0 and not self.stop.is_set()
        ready = self.client.is_connected()
        return live, ready, {
            "status": "ok" if live else "stalled", "connected": ready,
            "connection_error": self.connection_error, "model_sha256": self.model.sha256,
            "devices": len(self.engine.table.slots), "queue": len(self.inbox),
            "uptime_s": round(time.monotonic() - self.started, 1),
        }

    def _start_metrics(self) -> None:
        if not self.config.metrics.listen:
            return
        host, port = listen_address(self.config.metrics.listen)
        try:
            self.metrics_server = MetricsServer(host, port, lambda: render(self), self.health).start()
        except OSError as exc:  # detection goes on without metrics, loudly
            self.counters["metrics_errors"] += 1
            log.error("cannot serve metrics on %s: %s (continuing without /metrics)",
                      self.config.metrics.listen, exc)
            return
        log.info("metrics on http://%s:%d/metrics (and /healthz)", host, self.metrics_server.port)

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> int:
        b = self.config.broker
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = b.session_expiry_s
        props.ReceiveMaximum = b.receive_maximum
        self.client.connect_async(b.host, b.port, keepalive=b.keepalive_s, clean_start=False,
                                  properties=props)
        self.client.loop_start()
        self._start_metrics()
        log.info("faultwatch daemon: model %s (sha256 %s…), %d features, reading %s",
                 self.config.model, self.model.sha256[:12], len(self.features),
                 ", ".join(self.topics.subscriptions))
        stats_every = self.config.output.stats_interval_s
        next_stats = time.monotonic() + (stats_every or float("inf"))
        next_snapshot = time.monotonic() + self.config.snapshot_interval_s
        next_prune = time.monotonic() + 1.0
        try:
            while not self.stop.is_set():
                self.heartbeat = time.monotonic()
                batch = self._take_batch()
                try:
                    if batch or self.frames.pending:
                        self._handle(batch)
                    if self.outbox.held and self.client.is_connected():
                        with self.client.batch():
                            self.outbox.drain()
                except Exception:
                    # Unacked readings are redelivered after a restart; say so and stop.
                    log.exception("engine failure; stopping without acknowledging the batch")
                    return 1
                now = time.monotonic()
                if (self.reload_requested.is_set()
                        and now - self._last_reload >= self.config.reload.min_interval_s):
                    self._reload()
                if now >= next_prune and self.outbox.journal is not None:
                    self.outbox.journal.prune()
                    next_prune = now + 1.0
                if now >= next_snapshot:
                    self._snapshot()
                    next_snapshot = time.monotonic() + self.config.snapshot_interval_s
                if now >= next_stats:
                    self._publish_stats()
                    next_stats = time.monotonic() + stats_every
        finally:
            self._shutdown()
        return 0

    def _shutdown(self) -> None:
        self.stop.set()
        self._snapshot()
        log.info("stopping: %s", json.dumps(self.stats(), sort_keys=True))
        if self.client.is_connected():
            with contextlib.suppress(RuntimeError, ValueError):
                self.outbox.drain()
                info = self.client.publish(self.status_topic, "stopped", qos=1, retain=True)
                info.wait_for_publish(timeout=5)
        if self.outbox.journal is not None:
            self.outbox.journal.prune()
            self.outbox.journal.close()
        self.client.disconnect()
        self.client.loop_stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()


def run_daemon(config: Config) -> int:
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(message)s")
    daemon = Daemon(config)

    def _stop(signum, frame) -> None:
        daemon.stop.set()

    def _reload(signum, frame) -> None:
        daemon.reload_requested.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _reload)
    return daemon.run()
