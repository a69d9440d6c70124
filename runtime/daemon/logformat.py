"""The daemon's log lines, in the shape the system around it reads (``log.format``).

- ``text``: ``2026-12-01 03:12:00,123 WARNING message``, for a terminal or a file.
- ``journald``: ``<4>message``. systemd-journald stores each stderr line at the
  syslog priority of its ``<N>`` prefix (SyslogLevelPrefix=, on by default), so
  ``journalctl -p err`` finds the errors; the journal adds its own time stamp.
- ``json``: one JSON object per line (``ts``, ``level``, ``message``, and
  ``exception`` when there is one), for a log shipper.
- ``auto`` (the default): ``journald`` when stderr is the journal (systemd sets
  ``JOURNAL_STREAM`` for a unit whose output goes there, and it is not a
  terminal), else ``text``.

>>> record = logging.LogRecord("faultwatch", logging.ERROR, __file__, 1, "refused: %s", ("x",), None)
>>> JournaldFormatter().format(record)
'<3>refused: x'
>>> json.loads(JsonFormatter().format(record))["level"]
'ERROR'
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TextIO

#: syslog priorities (RFC 5424): err, warning, info, debug.
SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
                   logging.DEBUG: 7}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between two take the more severe)."""
    for level in sorted(SYSLOG_PRIORITY, reverse=True):
        if levelno >= level:
            return SYSLOG_PRIORITY[level]
    return 7


class JournaldFormatter(logging.Formatter):
    """``<priority>message``; a traceback's lines each carry the prefix too (each is a journal entry)."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (epoch seconds), ``level``, ``message`` [, ``exception``]."""

    def format(self, record: logging.LogRecord) -> str:
        body = {"ts": round(record.created, 3), "level": record.levelname, "message": record.getMessage()}
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def under_journald(stream: TextIO, environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """Whether ``stream`` goes to the journal: ``JOURNAL_STREAM`` is set and it is not a terminal."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return bool(environ.get("JOURNAL_STREAM")) and not tty


def formatter(kind: str, stream: TextIO) -> logging.Formatter:
    """The formatter of ``log.format`` = ``kind`` ("auto", "text", "journald", "json")."""
    if kind == "auto":
        kind = "journald" if under_journald(stream) else "text"
    if kind == "journald":
        return JournaldFormatter()
    if kind == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, kind: str, stream: TextIO | None = None) -> None:
    """The root logger writes to stderr (or ``stream``) at ``level``, in the format ``kind``."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(kind, stream))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
