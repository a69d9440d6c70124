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

This module wires the parts and runs the engine loop; each seam has its own module:
:mod:`.intake` (inbox items → readings), :mod:`.emitter` (forecasts, fault events,
discovery, then the acknowledgements), :mod:`.reload`, :mod:`.observability` (histograms, the
``/metrics`` server), :mod:`.status` (a stats snapshot of the parts, health),
:mod:`.mqtt.connection` and its
:mod:`.mqtt.transport`.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from faultwatch.runtime.daemon.clock import ClockGuard, ClockRules
from faultwatch.runtime.daemon.config import Config
from faultwatch.runtime.daemon.daemon_metrics import render
from faultwatch.runtime.daemon.emitter import Emitter
from faultwatch.runtime.daemon.inbox import Inbox, InboxItem
from faultwatch.runtime.daemon.intake import Collected, Intake
from faultwatch.runtime.daemon.logformat import configure_logging
from faultwatch.runtime.daemon.metrics import TimedModel
from faultwatch.runtime.daemon.mqtt.connection import Connection
from faultwatch.runtime.daemon.observability import Observability
from faultwatch.runtime.daemon.outbox import FaultJournal, Outbox
from faultwatch.runtime.daemon.reload import Reloader
from faultwatch.runtime.daemon.snapshot import StateSnapshots
from faultwatch.runtime.daemon.status import DaemonStatus
from faultwatch.runtime.engine.engine import Engine, EngineSettings
from faultwatch.runtime.engine.model import StepModel

log = logging.getLogger("faultwatch")

OUT_BACKLOG = 4 << 20  # bytes queued for paho's network thread before the engine waits for it


def engine_settings(config: Config) -> EngineSettings:
    """The engine the daemon runs, from its config (a replay of the same readings uses it too)."""
    e = config.engine
    # The decisions come from the model file; [engine.detector] overrides single fields of them.
    return EngineSettings(max_devices=e.max_devices, max_batch=e.max_batch, detector=dict(e.detector))


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.prefix = config.output.prefix
        # Partitioned daemons share the prefix (a device's outputs don't say which one stepped
        # it); each has its own availability and stats: {prefix}/status/{partition}.
        own = "" if config.input.partitions == 1 else f"/{config.input.partition}"
        self.status_topic, self.stats_topic = f"{self.prefix}/status{own}", f"{self.prefix}/stats{own}"
        self.observed = Observability()
        self.model = StepModel(config.model, threads=config.engine.threads)
        self.engine = Engine(self._timed(self.model), engine_settings(config))
        self.stop = threading.Event()
        self.counters: Counter = Counter()  # counted by the engine thread
        self.reloader = Reloader(config, self.counters, self._reload_result)
        # Commands are off unless enabled; off, no topic is one ("" matches none).
        command_topic = f"{self.prefix}/command/reload" if config.commands.enabled else ""
        self.inbox = Inbox(config, self.model.contract.features, command_topic, self.reloader.requested.set)
        self.intake = Intake(config, self.model.contract, self.counters)
        self.clock = ClockGuard(self._clock_rules(), config.engine.max_devices, counters=self.counters)
        self.snapshots = StateSnapshots(config.state_dir, self.counters)
        self.snapshots.restore(self.engine, self.model.sha256)
        subscriptions = [(s, config.input.qos) for s in self.inbox.topics.subscriptions]
        if config.commands.enabled:
            subscriptions.append((command_topic, 0))
        if self.inbox.forget_topic:
            subscriptions.append((self.inbox.forget_topic, 0))
        # QoS 1 readings are never dropped: beyond max_queue they wait at the broker.
        self.connection = Connection(config, self.status_topic, subscriptions, self.inbox.on_message,
                                     self.inbox.full if config.input.qos == 1 else None)
        self.client = self.connection.client
        journal = (FaultJournal(Path(config.state_dir) / "outbox.jsonl", config.output.fault_journal_max)
                   if config.state_dir else None)
        self.outbox = Outbox(self.client, config.output.outbox_max, journal)
        self.emitter = Emitter(config, self.client, self.outbox, self.status_topic, self.model.contract,
                               self.counters, self.engine.fault_active)
        self.status = DaemonStatus(config, self.observed, self.inbox, self.connection, self.intake,
                                   self.engine, self.outbox, self.counters, lambda: self.model, self.stop)

    def _timed(self, model: StepModel) -> TimedModel:
        return TimedModel(model, self.observed.step_seconds, self.observed.batch_sizes)

    @property
    def features(self) -> tuple[str, ...]:
        return self.model.contract.features

    def _clock_rules(self) -> ClockRules:
        i = self.config.input
        return ClockRules(i.max_future_s, i.clock_step_tolerance_s or self.engine.max_gap_s)

    def _snapshot(self) -> None:
        self.snapshots.save(self.engine, self.model.sha256)
        self.emitter.announcements.save()

    # -- one batch -------------------------------------------------------------------------

    def _take_batch(self) -> list[InboxItem]:
        # Output not yet written by paho's thread bounds what the engine takes on: under load
        # the two threads share the GIL, and memory must not fill with packets waiting to go.
        while self.client.backlog() > OUT_BACKLOG and self.client.is_connected() and not self.stop.is_set():
            time.sleep(0.001)  # backpressure
        timeout = 0.2
        deadline = self.intake.frames.next_deadline()
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()))
        e = self.config.engine
        return self.inbox.take(e.max_batch, e.max_latency_ms / 1000.0, timeout, self._settled_at)

    def _settled_at(self) -> float:
        """Just after resuming a session the broker sends what it held, and may send a newer reading
        before an older one it resends: until then, readings gather into one batch (stepped in order)."""
        return self.connection.resumed_at + self.config.input.reorder_window_s

    def _process(self, collected: Collected) -> None:
        for device in collected.forget:
            self._forget(device)
        to_wall = time.time() - time.monotonic()  # `received` is monotonic
        received = collected.received
        outputs = self.clock.step(self.engine, collected.readings, [t + to_wall for t in received])
        evicted, self.engine.evicted_events = self.engine.evicted_events, []
        self.emitter.emit(outputs, collected.acks, self.engine.threshold, evicted)
        self.counters["processed"] += len(outputs)
        if outputs:
            self.observed.mark_seen(self.engine.table.slots, self.engine.capacity,
                                    [out.device for out in outputs])
        if received:
            self.observed.latency.observe(time.monotonic() - np.asarray(received))

    def _forget(self, device: str) -> None:
        """``{prefix}/command/forget``: the device's state, discovery configs and fault state go."""
        held = self.engine.forget(device)
        self.emitter.withdraw(device)
        self.counters["devices_forgotten"] += 1
        log.info("forgot device %s (%s): its Home Assistant configs and fault state deleted", device[:200],
                 "its state dropped" if held else "no state held")

    # -- hot reload ------------------------------------------------------------------------

    def _reload(self) -> None:
        """Load the model file again; swap it in only if it loads and warms up (else keep the old)."""
        model = self.reloader.load(self.model)
        if model is None:
            return
        # Samples being assembled are in the old model's channels: finish them with it.
        closed = self.intake.flush()
        if closed.readings:
            self._process(closed)
        kept = self.engine.swap_model(self._timed(model))
        old, self.model = self.model, model
        # The per-model parts of the daemon (the network thread reads ``inbox.features``).
        self.intake.adopt(model.contract)
        self.emitter.adopt(model.contract)
        self.inbox.features = model.contract.features
        self.reloader.swapped(old, model, kept)
        self.clock.rules = self._clock_rules()  # the tolerance may follow the sample period
        self._snapshot()  # the snapshot on disk is tagged with the model it belongs to

    def _reload_result(self, body: dict) -> None:
        self.emitter.reload_result(body)

    # -- stats ----------------------------------------------------------------------------

    def stats(self) -> dict:
        return self.status.stats()

    def _publish_stats(self) -> None:
        stats = self.stats()
        self.emitter.stats(self.stats_topic, stats)
        log.info("stats %s", json.dumps(stats, sort_keys=True))

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> int:
        self.connection.start()
        def metrics() -> str:
            return render(self.status.snapshot())

        if not self.observed.start_metrics(self.config, metrics, self.status.health):
            self.counters["metrics_errors"] += 1
        i = self.config.input
        part = f" (the devices of partition {i.partition} of {i.partitions})" if i.partitions > 1 else ""
        log.info("faultwatch daemon: model %s (sha256 %s…), %d features, reading %s%s; %s MQTT client",
                 self.config.model, self.model.sha256[:12], len(self.features),
                 ", ".join(self.inbox.topics.subscriptions), part, self.client.kind)
        stats_every = self.config.output.stats_interval_s
        now = time.monotonic()
        next_stats, next_prune = now + (stats_every or float("inf")), now + 1.0
        next_snapshot = now + self.config.snapshot_interval_s
        try:
            while not self.stop.is_set():
                self.observed.heartbeat = time.monotonic()
                batch = self._take_batch()
                try:
                    if batch or self.intake.frames.pending:
                        self._process(self.intake.collect(batch))
                    if self.outbox.held and self.client.is_connected():
                        with self.client.batch():
                            self.outbox.drain()
                except Exception:
                    # Unacked readings are redelivered after a restart; say so and stop.
                    log.exception("engine failure; stopping without acknowledging the batch")
                    return 1
                now = time.monotonic()
                if self.reloader.due(now):
                    self._reload()
                if now >= next_prune:
                    if self.outbox.journal is not None:
                        self.outbox.journal.prune()
                    if self.client.is_connected():
                        self.emitter.announce_due()  # those waiting for their turn
                    self.emitter.announcements.save()
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
        self.observed.stop()


def run_daemon(config: Config) -> int:
    configure_logging(config.log_level, config.log.format)
    daemon = Daemon(config)

    def _stop(signum, frame) -> None:
        daemon.stop.set()

    def _reload(signum, frame) -> None:
        daemon.reloader.requested.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _reload)
    return daemon.run()
