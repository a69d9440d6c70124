"""Observability: what the daemon measures, one snapshot of it, and where it is shown.

:class:`.status.DaemonStatus` fills a :class:`StatsSnapshot` (plain values, copied when it
is taken) from the daemon's parts; the ``/metrics`` exposition (:func:`.daemon_metrics.render`)
and the ``{prefix}/stats`` messages are both made from one, so neither reaches into the
daemon's parts. Snapshots for ``/metrics`` are taken on the HTTP thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from faultwatch.runtime.daemon.config import Config, listen_address
from faultwatch.runtime.daemon.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Histogram, MetricsServer

log = logging.getLogger("faultwatch")


@dataclass(frozen=True)
class StatsSnapshot:
    """Everything ``/metrics`` and ``{prefix}/stats`` show, at one moment."""

    network: dict  # counted on paho's thread: the inbox's, then the connection's
    counters: dict  # counted on the engine thread (readings, rejections, snapshots, reloads...)
    engine: dict  # the engine's counters
    frames: dict  # the frame assembler's counters (how samples closed)
    outbox: dict  # the outbox's counters
    devices: int  # devices with state in memory
    queue: int  # messages waiting for the engine thread
    open_frames: int
    outbox_depth: int
    journal_pending: int  # fault events on disk not yet acknowledged by the broker
    faults_active: int
    connected: bool
    model_sha256: str
    quantization: str
    features: int
    uptime_s: float
    devices_max: int
    per_device_max: int
    # device → wall-clock time of its last processed reading (devices without one left out)
    last_seen: dict[str, float] = field(default_factory=dict)
    step_seconds: Histogram | None = None  # duration of each onnxruntime call
    batch_sizes: Histogram | None = None  # devices per onnxruntime call
    latency: Histogram | None = None  # reading received → its outputs handed to paho

    def as_stats(self) -> dict:
        """The body of ``{prefix}/stats`` and of the log's ``stopping:`` line."""
        stats = self.network | self.counters
        stats |= {f"engine_{k}": v for k, v in self.engine.items()}
        stats |= {f"frames_{k}": v for k, v in self.frames.items()}
        stats |= self.outbox
        stats["devices"] = self.devices
        stats["queue"] = self.queue
        return stats


class Observability:
    """The daemon's histograms, per-device last-seen times, liveness heartbeat and HTTP server."""

    def __init__(self) -> None:
        self.step_seconds = Histogram(LATENCY_BUCKETS)
        self.batch_sizes = Histogram(BATCH_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)  # reading received → its outputs handed to paho
        self.seen_at = np.zeros(0)  # per engine slot: wall-clock time of its last processed reading
        self.started = self.heartbeat = time.monotonic()
        self.metrics_server: MetricsServer | None = None

    def mark_seen(self, slots: dict[str, int], capacity: int, devices: list[str]) -> None:
        """``devices`` (their engine ``slots``, of ``capacity`` in all) processed a reading now."""
        if len(self.seen_at) < capacity:
            grown = np.zeros(capacity)
            grown[:len(self.seen_at)] = self.seen_at
            self.seen_at = grown
        self.seen_at[[slots[d] for d in devices if d in slots]] = time.time()

    def last_seen(self, slots: dict[str, int]) -> dict[str, float]:
        seen_at = self.seen_at
        return {dev: float(seen_at[s]) for dev, s in slots.items() if s < len(seen_at) and seen_at[s] > 0}

    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    def start_metrics(self, config: Config, render: Callable[[], str],
                      health: Callable[[], tuple[bool, bool, dict]]) -> bool:
        """Serve ``/metrics`` and ``/healthz`` if ``metrics.listen`` says so; False if that failed."""
        if not config.metrics.listen:
            return True
        host, port = listen_address(config.metrics.listen)
        try:
            self.metrics_server = MetricsServer(host, port, render, health).start()
        except OSError as exc:  # detection goes on without metrics, loudly
            log.error("cannot serve metrics on %s: %s (continuing without /metrics)",
                      config.metrics.listen, exc)
            return False
        log.info("metrics on http://%s:%d/metrics (and /healthz)", host, self.metrics_server.port)
        return True

    def stop(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
