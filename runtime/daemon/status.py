"""What the daemon reports about itself: a stats snapshot of its parts, and its health.

:class:`DaemonStatus` is handed the daemon's parts once, at start, and reads them when asked:
for ``/metrics`` (on the HTTP thread), ``{prefix}/stats`` and the log's ``stopping:`` line
(:class:`.observability.StatsSnapshot`), and ``/healthz`` / ``/readyz``. Counters are copied
with ``dict()`` (one C call, atomic under the GIL), lengths read as they are.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from faultwatch.runtime.daemon.config import Config
from faultwatch.runtime.daemon.inbox import Inbox
from faultwatch.runtime.daemon.intake import Intake
from faultwatch.runtime.daemon.mqtt.connection import Connection
from faultwatch.runtime.daemon.observability import Observability, StatsSnapshot
from faultwatch.runtime.daemon.outbox import Outbox
from faultwatch.runtime.engine.engine import Engine
from faultwatch.runtime.engine.model import StepModel

STALLED_AFTER_S = 30.0  # an engine loop without a heartbeat this long is not live


@dataclass
class DaemonStatus:
    """The daemon's parts, read for stats and health. ``model`` gives the model running now
    (a hot reload replaces it); ``counters`` are the engine thread's."""

    config: Config
    observed: Observability
    inbox: Inbox
    connection: Connection
    intake: Intake
    engine: Engine
    outbox: Outbox
    counters: Counter
    model: Callable[[], StepModel]
    stop: threading.Event

    def snapshot(self, per_device: bool = True) -> StatsSnapshot:
        """What the daemon counts now (``per_device``: with each device's last-seen time)."""
        engine, outbox, journal = self.engine, self.outbox, self.outbox.journal
        slots = dict(engine.table.slots)  # device → slot
        model = self.model()
        return StatsSnapshot(
            network=dict(self.inbox.counters) | dict(self.connection.counters),
            counters=dict(self.counters), engine=dict(engine.counters),
            frames=dict(self.intake.frames.counters), outbox=dict(outbox.counters),
            devices=len(slots), queue=len(self.inbox), open_frames=len(self.intake.frames.pending),
            outbox_depth=len(outbox.held), journal_pending=0 if journal is None else len(journal.entries),
            faults_active=int(np.count_nonzero(engine.detector.active)),
            connected=self.connection.client.is_connected(), model_sha256=model.sha256,
            quantization=model.contract.quantization, features=len(model.contract.features),
            uptime_s=self.observed.uptime_s(), devices_max=self.config.engine.max_devices,
            per_device_max=self.config.metrics.per_device_max,
            last_seen=self.observed.last_seen(slots) if per_device else {},
            step_seconds=self.observed.step_seconds, batch_sizes=self.observed.batch_sizes,
            latency=self.observed.latency,
        )

    def stats(self) -> dict:
        """The body of ``{prefix}/stats`` (no per-device times)."""
        return self.snapshot(per_device=False).as_stats()

    def health(self) -> tuple[bool, bool, dict]:
        """(engine loop alive, connected, details) for /healthz and /readyz."""
        live = time.monotonic() - self.observed.heartbeat < STALLED_AFTER_S and not self.stop.is_set()
        ready = self.connection.is_connected()
        return live, ready, {
            "status": "ok" if live else "stalled", "connected": ready,
            "connection_error": self.connection.error, "model_sha256": self.model().sha256,
            "devices": len(self.engine.table.slots), "queue": len(self.inbox),
            "uptime_s": round(self.observed.uptime_s(), 1),
        }
