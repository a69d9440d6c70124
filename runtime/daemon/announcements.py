"""Which devices Home Assistant has been told about: capped, rate-limited, kept on disk.

Each announcement is a retained config at the broker (two per device), so a sender that
invents device IDs would otherwise fill the broker with them. The daemon announces

- at most ``homeassistant.max_devices`` devices in all (later ones are counted,
  ``discovery_capped``, and not announced: their readings are still stepped);
- at most ``homeassistant.announce_per_s`` a second (a token bucket; the rest wait, in order);
- each device once: the announced set is saved in the state dir (``announced.json``), so a
  restart announces nothing again.

A device is withdrawn (its retained configs and fault topic deleted) by the
``{prefix}/command/forget`` command, which frees its place under the cap.

>>> a = Announcements(None, max_devices=2, per_s=1.0)
>>> for d in ("p1", "p2", "p3", "p1"):
...     a.want(d)
>>> a.due(now=0.0), a.due(now=0.5), a.due(now=1.0), a.counters["discovery_capped"]
(['p1'], [], ['p2'], 1)
>>> a.forget("p1"), a.forget("p1"), len(a)
(True, False, 1)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path

log = logging.getLogger("faultwatch")

FILENAME = "announced.json"
FORMAT = 1


class Announcements:
    def __init__(self, state_dir: Path | None, max_devices: int, per_s: float,
                 counters: Counter | None = None):
        self.path = None if state_dir is None else state_dir / FILENAME
        self.max_devices = max_devices
        self.per_s = per_s
        self.burst = max(1.0, per_s)  # tokens held at most: one second's worth
        self.tokens = self.burst
        self.refilled_at: float | None = None
        self.announced: OrderedDict[str, None] = OrderedDict.fromkeys(self._load())
        self.pending: OrderedDict[str, None] = OrderedDict()  # waiting for a token
        self.dirty = False
        self.counters: Counter = Counter() if counters is None else counters  # discovery_capped

    def __len__(self) -> int:
        return len(self.announced)

    def want(self, device: str) -> None:
        """``device`` was seen: announce it (when due) unless it already is, or the cap is reached."""
        if device in self.announced or device in self.pending:
            return
        if len(self.announced) + len(self.pending) >= self.max_devices:
            self.counters["discovery_capped"] += 1
            return
        self.pending[device] = None

    def due(self, now: float) -> list[str]:
        """The devices to announce now (``now``: time.monotonic()); they count as announced."""
        if not self.pending:
            return []
        if self.refilled_at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.refilled_at) * self.per_s)
        self.refilled_at = now
        out: list[str] = []
        while self.pending and self.tokens >= 1.0:
            device, _ = self.pending.popitem(last=False)
            self.announced[device] = None
            self.tokens -= 1.0
            out.append(device)
        self.dirty |= bool(out)
        return out

    def forget(self, device: str) -> bool:
        """No longer announced (its configs are being deleted); False if it was not."""
        known = self.announced.pop(device, 0) is None or self.pending.pop(device, 0) is None
        self.dirty |= known
        return known

    # -- on disk ---------------------------------------------------------------------------

    def _load(self) -> list[str]:
        if self.path is None or not self.path.exists():
            return []
        try:
            body = json.loads(self.path.read_text())
            devices = body["devices"] if body.get("format") == FORMAT else None
            if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
                raise ValueError("not a list of device ids")
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
            log.warning("announced devices %s unreadable (%s): Home Assistant configs will be "
                        "announced again", self.path, exc)
            return []
        return devices[-self.max_devices:]

    def save(self) -> None:
        """Write the announced set if it changed (atomically: write, fsync, rename)."""
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".announced.", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": FORMAT, "devices": list(self.announced)}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.dirty = False
