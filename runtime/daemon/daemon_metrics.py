"""The daemon's ``/metrics``: what it counts, rendered in the Prometheus text format.

Rendered from a :class:`~faultwatch.runtime.daemon.observability.StatsSnapshot` (taken on
the HTTP thread). Every label value comes from a fixed set, except ``device``, which is
only used while there are at most ``metrics.per_device_max`` devices.
"""

from __future__ import annotations

import time

import numpy as np
from faultwatch.runtime.daemon.metrics import STALE_AFTER_S, family, process_memory_bytes
from faultwatch.runtime.daemon.observability import StatsSnapshot
from faultwatch.runtime.daemon.payload import REJECTED


def _drops(net: dict, counters: dict, outbox: dict) -> list[tuple[dict, int]]:
    """Readings (or outputs) not processed (sent), by reason."""
    reasons = {k.removeprefix(REJECTED): v for k, v in counters.items() if k.startswith(REJECTED)}
    reasons["queue_full"] = net.get("dropped_queue_full", 0)
    reasons["duplicate"] = counters.get("dropped_out_of_order", 0)
    reasons["ignored_channel"] = counters.get("ignored_channel", 0)
    reasons["outbox_full"] = outbox.get("outbox_full", 0)
    return [({"reason": r}, v) for r, v in sorted(reasons.items())]


def _staleness(s: StatsSnapshot) -> list[str]:
    per_device_max = s.per_device_max
    known = s.last_seen  # device → time of its last processed reading
    now = time.time()
    ages = now - np.fromiter(known.values(), float, len(known)) if known else np.zeros(0)
    lines = family("faultwatch_devices_stale", "gauge",
                   "devices whose last processed reading is older than older_than_s seconds",
                   [({"older_than_s": str(s)}, int((ages > s).sum())) for s in STALE_AFTER_S])
    lines += family("faultwatch_device_staleness_max_seconds", "gauge",
                    "age of the oldest last reading over all devices",
                    [(None, float(ages.max()) if len(ages) else 0.0)])
    if s.devices <= per_device_max:
        lines += family("faultwatch_device_staleness_seconds", "gauge",
                        f"seconds since the device's last processed reading (while devices <= "
                        f"{per_device_max})",
                        [({"device": dev}, float(age)) for dev, age in zip(known, ages, strict=True)])
    return lines


def render(s: StatsSnapshot) -> str:
    """The whole exposition of the daemon's snapshot ``s``."""
    net, counters, engine, frames, outbox = s.network, s.counters, s.engine, s.frames, s.outbox
    lines: list[str] = []

    def counter(name: str, help_text: str, value) -> None:
        lines.extend(family(f"faultwatch_{name}", "counter", help_text, [(None, value)]))

    def gauge(name: str, help_text: str, value) -> None:
        lines.extend(family(f"faultwatch_{name}", "gauge", help_text, [(None, value)]))

    counter("readings_received_total", "messages received on the input topics", net.get("received", 0))
    counter("readings_processed_total", "readings stepped and answered", counters.get("processed", 0))
    lines += family("faultwatch_readings_dropped_total", "counter",
                    "readings (or forecasts) dropped, by reason", _drops(net, counters, outbox))
    counter("engine_steps_total", "onnxruntime calls for readings", engine.get("steps", 0))
    counter("engine_imputed_values_total", "channel values missing and imputed",
            engine.get("imputed_values", 0))
    for histogram, name, help_text in (
            (s.batch_sizes, "faultwatch_step_batch_size", "devices per onnxruntime call"),
            (s.step_seconds, "faultwatch_step_seconds", "duration of one onnxruntime call"),
            (s.latency, "faultwatch_reading_latency_seconds",
             "reading received → its outputs queued for the broker")):
        if histogram is not None:
            lines += histogram.render(name, help_text)
    gauge("queue_depth", "messages waiting for the engine thread", s.queue)
    gauge("open_frames", "per-channel samples being assembled", s.open_frames)
    gauge("outbox_depth", "messages waiting for the broker connection", s.outbox_depth)
    gauge("fault_journal_pending", "fault events on disk not yet acknowledged by the broker",
          s.journal_pending)
    lines += family("faultwatch_frames_total", "counter", "per-channel samples stepped, by how they closed",
                    [({"how": how}, frames.get(how, 0))
                     for how in ("complete", "timeout", "superseded", "evicted", "flushed")])
    gauge("devices", "devices with state in memory", s.devices)
    gauge("devices_max", "engine.max_devices", s.devices_max)
    counter("devices_evicted_total", "least recently seen devices evicted at the cap",
            engine.get("devices_evicted", 0))
    counter("other_partition_total", "messages of devices another daemon's partition steps (acknowledged)",
            counters.get("other_partition", 0))
    gauge("faults_active", "devices with a fault raised now", s.faults_active)
    counter("faults_raised_total", "fault events raised", engine.get("faults_raised", 0))
    counter("faults_cleared_total", "fault events cleared", engine.get("faults_cleared", 0))
    lines += _staleness(s)
    gauge("connected", "1 while connected to the broker", int(s.connected))
    counter("connects_total", "successful connections to the broker", net.get("connects", 0))
    counter("connect_refused_total", "connections the broker refused", net.get("connect_refused", 0))
    counter("connect_failures_total", "connection attempts that failed (unreachable, TLS handshake)",
            net.get("connect_failures", 0))
    counter("disconnects_total", "connections lost", net.get("disconnects", 0))
    counter("outbox_sent_total", "messages sent after waiting for the connection",
            outbox.get("outbox_sent", 0))
    counter("snapshots_total", "state snapshots written", counters.get("snapshots", 0))
    counter("snapshot_errors_total", "state snapshots that failed", counters.get("snapshot_errors", 0))
    lines += family("faultwatch_reloads_total", "counter", "model reloads, by result",
                    [({"result": r}, counters.get(f"reloads_{r}", 0))
                     for r in ("kept", "reset", "unchanged", "failed")])
    counter("discovery_announced_total", "devices announced to Home Assistant",
            counters.get("discovery_announced", 0))
    counter("callback_errors_total", "exceptions caught in MQTT callbacks", net.get("callback_errors", 0))
    lines += family("faultwatch_model_info", "gauge", "the model running now",
                    [({"sha256": s.model_sha256, "quantization": s.quantization,
                       "features": str(s.features)}, 1)])
    gauge("uptime_seconds", "seconds since start", round(s.uptime_s, 3))
    gauge("process_resident_memory_bytes", "resident set size", process_memory_bytes())
    return "\n".join(lines) + "\n"
