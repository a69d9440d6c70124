"""The daemon's own state files (snapshot, fault journal): one way to read them, and to set a bad one aside.

A daemon under systemd that exits on a corrupt state file exits again at every
restart: a crash loop that only a person can end. So every state file goes
through :func:`read_state_file`: a file that is missing is no news; one that
is not a regular file, cannot be parsed or fails its checks is reported in one
line and renamed to ``<name>.corrupt-<UTC time>`` (kept for a post-mortem,
out of the daemon's way), and the daemon starts fresh.

The model and the config are not the daemon's to move: a bad one is refused
with one line (:class:`~faultwatch.runtime.engine.model.ModelError`,
:class:`~faultwatch.runtime.daemon.config.ConfigError`), at start, under
``--check-config`` and on reload (which keeps the old model running).

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> _ = (folder / "state.npz").write_bytes(b"PK\\x03\\x04 cut short")
>>> read_state_file(folder / "state.npz", int, "state snapshot",
...                 now=lambda: 0.0) is None
True
>>> sorted(p.name for p in folder.iterdir())
['state.npz.corrupt-19700101T000000Z']
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("faultwatch")

T = TypeVar("T")


class StateFileError(ValueError):
    """A state file's content fails a check; the message says which, in one line."""


def corrupt_name(path: Path, now: float) -> Path:
    """``<name>.corrupt-<UTC time>``, beside ``path``; a free name even when two go aside in a second."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists() or target.is_symlink():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    return target


def set_aside(path: Path, what: str, why: str, now: Callable[[], float] = time.time) -> Path | None:
    """Rename a bad state file (or a folder in its place) out of the daemon's way; log one line.

    Returns the new path, or None when even the rename failed (then the reason is logged too).
    """
    target = corrupt_name(path, now())
    try:
        os.rename(path, target)
    except OSError as exc:
        log.error("%s %s is unusable (%s) and cannot be moved aside (%s): starting fresh without it",
                  what, path, why, exc.strerror or exc)
        return None
    log.error("%s %s is unusable (%s): moved aside to %s, starting fresh", what, path, why, target.name)
    return target


def read_state_file(path: Path, parse: Callable[[bytes], T], what: str,
                    now: Callable[[], float] = time.time) -> T | None:
    """``parse(bytes of path)``, or None: missing (nothing said), or bad (set aside, one line logged).

    ``parse`` raises any exception for content it refuses (:class:`StateFileError` with a
    readable reason where it can); whatever it raises, the file goes aside and the caller
    starts fresh. A file that cannot be read for a reason outside it (permissions) is left
    where it is, and logged.
    """
    if not os.path.lexists(path):
        return None
    if not path.is_file():
        set_aside(path, what, "not a regular file", now)
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        log.error("cannot read %s %s (%s): starting fresh without it", what, path, exc.strerror or exc)
        return None
    if not data:
        set_aside(path, what, "empty", now)
        return None
    try:
        return parse(data)
    except Exception as exc:  # any parser error means the same thing here: this file can't be used
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        set_aside(path, what, reason[:200], now)
        return None
