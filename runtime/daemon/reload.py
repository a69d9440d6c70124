"""Hot reload: SIGHUP or ``{prefix}/command/reload`` loads the model file again.

A request only sets :attr:`Reloader.requested` (from a signal handler or paho's thread);
the engine thread acts on it when :meth:`Reloader.due`, at most once per
``reload.min_interval_s`` (requests in between are merged). The new model is swapped in
only if it loads and warms up; otherwise the old one keeps running. Either way the
outcome is counted, logged and published on ``{prefix}/reload``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from faultwatch.runtime.daemon.config import Config
from faultwatch.runtime.engine.model import ModelError, StepModel

log = logging.getLogger("faultwatch")


class Reloader:
    def __init__(self, config: Config, counters: Counter, publish_result: Callable[[dict], None]):
        self.config = config
        self.counters = counters  # the daemon's engine-thread counters
        self.publish_result = publish_result  # {prefix}/reload
        self.requested = threading.Event()
        self._last_reload = -float("inf")

    def due(self, now: float) -> bool:
        return self.requested.is_set() and now - self._last_reload >= self.config.reload.min_interval_s

    def load(self, current: StepModel) -> StepModel | None:
        """The model file loaded again, if it differs from ``current`` and loads; else None
        (counted, logged and published here)."""
        self.requested.clear()
        self._last_reload = time.monotonic()
        path = self.config.model
        try:
            model = StepModel(path, threads=self.config.engine.threads)
        except ModelError as exc:
            self.counters["reloads_failed"] += 1
            log.error("reload rejected, still running %s (sha256 %s…): %s", path, current.sha256[:12], exc)
            self.publish_result({"ok": False, "error": str(exc), "sha256": current.sha256})
            return None
        if model.sha256 == current.sha256:
            self.counters["reloads_unchanged"] += 1
            log.info("reload: %s is unchanged (sha256 %s…)", path, model.sha256[:12])
            self.publish_result({"ok": True, "state": "unchanged", "sha256": model.sha256})
            return None
        return model

    def swapped(self, old: StepModel, model: StepModel, kept: bool) -> None:
        """``model`` now runs instead of ``old``; ``kept``: the devices' state carried over."""
        state = "kept" if kept else "reset"
        self.counters[f"reloads_{state}"] += 1
        log.info("reloaded %s: sha256 %s… → %s…, device state %s%s", self.config.model, old.sha256[:12],
                 model.sha256[:12], state, "" if kept else " (another contract: devices warm up again)")
        self.publish_result({"ok": True, "state": state, "sha256": model.sha256})
