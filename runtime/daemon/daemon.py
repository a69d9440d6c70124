"""``faultwatch run``: the edge daemon. MQTT readings in; forecasts and fault events out.

Two threads. paho's network thread only parses and enqueues (:mod:`.inbox`), so
a slow model step never stalls keep-alives. The engine thread, here, takes what
is queued, up to ``max_batch`` messages or ``max_latency_ms``, assembles
per-channel messages into readings (:mod:`.frames`), steps them in one
onnxruntime call, publishes the outputs (through the :mod:`.outbox`, which
keeps them while the broker is away), and only then acknowledges the readings
to the broker (MQTT v5 manual ack). A reading the daemon dies holding is
redelivered: the persistent session (:mod:`.connection`) keeps it queued while
the daemon is away, and a reading already processed (same device, same or
older timestamp) is recognised and not stepped twice.

The engine thread also owns everything else that changes state: snapshots,
hot reload (SIGHUP or ``{prefix}/command/reload``), Home Assistant discovery,
stats. ``/metrics`` and ``/healthz`` are served by a third, read-only thread.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
from faultwatch.runtime.daemon.config import Config, listen_address
from faultwatch.runtime.daemon.daemon_metrics import render
from faultwatch.runtime.daemon.discovery import Announced, discovery_messages
from faultwatch.runtime.daemon.frames import FrameAssembler
from faultwatch.runtime.daemon.inbox import CHANNEL, OTHER, READING, Inbox
from faultwatch.runtime.daemon.metrics import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    Histogram,
    MetricsServer,
    TimedModel,
)
from faultwatch.runtime.daemon.mqtt.connection import Connection
from faultwatch.runtime.daemon.outbox import FaultJournal, Outbox
from faultwatch.runtime.daemon.payload import REJECTED, ForecastEncoder, fault_message
from faultwatch.runtime.daemon.snapshot import load_snapshot, save_snapshot
from faultwatch.runtime.engine.engine import Engine, EngineSettings, Reading
from faultwatch.runtime.engine.model import ModelError, StepModel

log = logging.getLogger("faultwatch")

OUT_BACKLOG = 4 << 20  # bytes queued for paho's network thread before the engine waits for it


def engine_settings(config: Config) -> EngineSettings:
    """The engine the daemon runs, from its config (a replay of the same readings uses it too)."""
    e = config.engine
    # The decisions come from the model file; [engine.detector] overrides single fields of them.
    return EngineSettings(max_devices=e.max_devices, max_batch=e.max_batch, detector=dict(e.detector))


def in_time_order(readings: list[Reading], received: list[float]) -> tuple[list[Reading], list[float]]:
    """Each device's readings of one batch in time order, ``received`` (arrival times) alike.

    The engine drops a reading older than one already stepped for its device, so an older
    reading resent after a newer one (as a broker may when a session resumes) would be lost.
    Sorting is stable: equal timestamps keep their order (the second is a duplicate).

    >>> r = [Reading("a", 2.0, None), Reading("b", 1.0, None), Reading("a", 1.0, None)]
    >>> [(x.device, x.ts) for x in in_time_order(r, [0.0, 0.1, 0.2])[0]]
    [('b', 1.0), ('a', 1.0), ('a', 2.0)]
    """
    last: dict[str, float] = {}
    for r in readings:
        if r.ts < last.get(r.device, -np.inf):
            break
        last[r.device] = r.ts
    else:
        return readings, received  # the usual case: nothing to do
    order = sorted(range(len(readings)), key=lambda i: readings[i].ts)
    return [readings[i] for i in order], [received[i] for i in order]


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.prefix = config.output.prefix
        # Partitioned daemons share the prefix (a device's outputs don't say which one stepped
        # it); each has its own availability and stats: {prefix}/status/{partition}.
        own = "" if config.input.partitions == 1 else f"/{config.input.partition}"
        self.status_topic, self.stats_topic = f"{self.prefix}/status{own}", f"{self.prefix}/stats{own}"
        self.step_seconds = Histogram(LATENCY_BUCKETS)
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)  # reading received → its outputs handed to paho
        self.model = StepModel(config.model, threads=config.engine.threads)
        self.engine = Engine(self._timed(self.model), engine_settings(config))
        self.stop = threading.Event()
        self.reload_requested = threading.Event()
        command_topic = f"{self.prefix}/command/reload"
        self.inbox = Inbox(config, self.model.contract.features, command_topic, self.reload_requested.set)
        self._adopt_contract()
        self.counters: Counter = Counter()  # counted by the engine thread
        self._last_reload = -float("inf")
        self.started = self.heartbeat = time.monotonic()
        self.announced = Announced(config.engine.max_devices)
        self._nth: OrderedDict[str, int] = OrderedDict()  # readings since the last forecast, per device
        self.seen_at = np.zeros(0)  # per engine slot: wall-clock time of its last processed reading
        self.state_dir = Path(config.state_dir) if config.state_dir else None
        self._restore()
        subscriptions = [(s, config.input.qos) for s in self.inbox.topics.subscriptions]
        if config.reload.mqtt_command:
            subscriptions.append((command_topic, 0))
        # QoS 1 readings are never dropped: beyond max_queue they wait at the broker.
        self.connection = Connection(config, self.status_topic, subscriptions, self.inbox.on_message,
                                     self.inbox.full if config.input.qos == 1 else None)
        self.client = self.connection.client
        journal = (FaultJournal(self.state_dir / "outbox.jsonl", config.output.fault_journal_max)
                   if self.state_dir else None)
        self.outbox = Outbox(self.client, config.output.outbox_max, journal)
        self.metrics_server: MetricsServer | None = None

    def _timed(self, model: StepModel) -> TimedModel:
        return TimedModel(model, self.step_seconds, self.batch_sizes)

    def _adopt_contract(self) -> None:
        """The per-model parts of the daemon (the network thread reads ``inbox.features``)."""
        c = self.model.contract
        self.features = c.features
        self.feature_index = {name: i for i, name in enumerate(c.features)}
        self.encoder = ForecastEncoder(c.targets)
        self.frames = FrameAssembler(len(c.features), tolerance_s=c.sample_period_s / 2,
                                     max_wait_s=self.config.input.frame_max_wait_s,
                                     max_pending=self.config.input.max_open_frames)
        self.inbox.features = c.features

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

    # -- one batch -------------------------------------------------------------------------

    def _take_batch(self) -> list[tuple]:
        # Output not yet written by paho's thread bounds what the engine takes on: under load
        # the two threads share the GIL, and memory must not fill with packets waiting to go.
        while self.client.backlog() > OUT_BACKLOG and self.client.is_connected() and not self.stop.is_set():
            time.sleep(0.001)  # backpressure
        timeout = 0.2
        deadline = self.frames.next_deadline()
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()))
        e = self.config.engine
        return self.inbox.take(e.max_batch, e.max_latency_ms / 1000.0, timeout, self._settled_at)

    def _settled_at(self) -> float:
        """Just after resuming a session the broker sends what it held, and may send a newer reading
        before an older one it resends: until then, readings gather into one batch (stepped in order)."""
        return self.connection.resumed_at + self.config.input.reorder_window_s

    def _remap(self, values: np.ndarray, features: tuple[str, ...]) -> np.ndarray:
        """A reading parsed for the previous model, in this model's feature order."""
        index = {name: i for i, name in enumerate(features)}
        return np.array([values[index[f]] if f in index else np.nan for f in self.features])

    def _handle(self, batch: list[tuple]) -> None:
        readings: list[Reading] = []
        acks: list[int] = []  # mids of the QoS 1 messages these readings came in
        received: list[float] = []
        frames = self.frames

        def add_frame(frame) -> None:
            readings.append(Reading(frame.device, frame.ts, frame.values))
            acks.extend(mid for mid, qos in frame.acks if qos)
            received.append(frame.opened)

        for item in batch:
            kind = item[0]
            if kind == READING:
                _, device, ts, values, features, mid, qos, t = item
                if features is not self.features:
                    values = self._remap(values, features)
                if frames.pending and device in frames.pending:
                    add_frame(frames.close_device(device))
                readings.append(Reading(device, ts, values))
                if qos:
                    acks.append(mid)
                received.append(t)
            elif kind == CHANNEL:
                _, device, ts, value, channel, mid, qos, t = item
                index = self.feature_index.get(channel)
                if index is None:
                    self.counters["ignored_channel"] += 1
                    if qos:
                        acks.append(mid)
                    continue
                for frame in frames.add(device, index, ts, value, (mid, qos), t):
                    add_frame(frame)
            elif kind == OTHER:
                _, mid, qos = item
                self.counters["other_partition"] += 1
                if qos:
                    acks.append(mid)
            else:
                _, reason, mid, qos = item
                self.counters[REJECTED + reason] += 1
                if qos:
                    acks.append(mid)
        for frame in frames.expire(time.monotonic()):
            add_frame(frame)
        self._process(readings, acks, received)

    def _process(self, readings: list[Reading], acks: list[int], received: list[float]) -> None:
        readings, received = in_time_order(readings, received)
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
            # The outputs are queued with paho, in order: only now are the readings acknowledged.
            self.client.ack_many(acks)
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
                scores=self.config.output.forecasts, model=Path(self.config.model).name,
                status_topic=self.status_topic):
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
        closed = self.frames.flush()
        if closed:
            self._process([Reading(f.device, f.ts, f.values) for f in closed],
                          [mid for f in closed for mid, qos in f.acks if qos], [f.opened for f in closed])
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
        stats = dict(self.inbox.counters) | dict(self.connection.counters) | dict(self.counters)
        stats |= {f"engine_{k}": v for k, v in dict(self.engine.counters).items()}
        stats |= {f"frames_{k}": v for k, v in dict(self.frames.counters).items()}
        stats |= dict(self.outbox.counters)
        stats["devices"] = len(self.engine.table.slots)
        stats["queue"] = len(self.inbox)
        return stats

    def _publish_stats(self) -> None:
        stats = self.stats()
        self.outbox.publish(self.stats_topic, json.dumps(stats).encode(), qos=0)
        log.info("stats %s", json.dumps(stats, sort_keys=True))

    def health(self) -> tuple[bool, bool, dict]:
        """(engine loop alive, connected, details) for /healthz and /readyz."""
        live = time.monotonic() - self.heartbeat < 30.0 and not self.stop.is_set()
        ready = self.connection.is_connected()
        return live, ready, {
            "status": "ok" if live else "stalled", "connected": ready,
            "connection_error": self.connection.error, "model_sha256": self.model.sha256,
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
        self.connection.start()
        self._start_metrics()
        i = self.config.input
        part = f" (the devices of partition {i.partition} of {i.partitions})" if i.partitions > 1 else ""
        log.info("faultwatch daemon: model %s (sha256 %s…), %d features, reading %s%s",
                 self.config.model, self.model.sha256[:12], len(self.features),
                 ", ".join(self.inbox.topics.subscriptions), part)
        stats_every = self.config.output.stats_interval_s
        now = time.monotonic()
        next_stats, next_prune = now + (stats_every or float("inf")), now + 1.0
        next_snapshot = now + self.config.snapshot_interval_s
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
        self.connection.stop(before_stopped=self.outbox.drain)
        if self.outbox.journal is not None:
            self.outbox.journal.prune()
            self.outbox.journal.close()
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
