"""Log lines in the shape the system around the daemon reads: journald level prefixes under
systemd (so ``journalctl -p err`` finds errors), JSON lines on request, plain text on a terminal."""

from __future__ import annotations

import io
import json
import logging

import pytest
from faultwatch.runtime.daemon.logformat import configure_logging, formatter, under_journald


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def emit(kind: str, stream: io.StringIO) -> list[str]:
    configure_logging("DEBUG", kind, stream)
    log = logging.getLogger("faultwatch")
    log.debug("step")
    log.info("connected")
    log.warning("reconnecting")
    log.error("refused")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("engine failure")
    return stream.getvalue().splitlines()


def test_journald_lines_carry_the_syslog_priority_of_their_level(restore_root_logger):
    lines = emit("journald", io.StringIO())
    assert lines[:4] == ["<7>step", "<6>connected", "<4>reconnecting", "<3>refused"]
    # A traceback is several journal entries: every one of them is an error, none at info.
    assert len(lines) > 5 and all(line.startswith("<3>") for line in lines[4:])


def test_json_lines_are_one_object_each(restore_root_logger):
    lines = emit("json", io.StringIO())
    records = [json.loads(line) for line in lines]
    assert [r["level"] for r in records] == ["DEBUG", "INFO", "WARNING", "ERROR", "ERROR"]
    assert records[1]["message"] == "connected" and "ValueError: boom" in records[4]["exception"]


def test_text_lines_have_time_and_level(restore_root_logger):
    lines = emit("text", io.StringIO())
    assert " INFO connected" in lines[1] and not lines[1].startswith("<")


@pytest.mark.parametrize(("env", "stream", "expected"), [
    ({"JOURNAL_STREAM": "8:12345"}, io.StringIO(), "JournaldFormatter"),
    ({"JOURNAL_STREAM": "8:12345"}, Terminal(), "Formatter"),  # a terminal: journalctl -f piped to a tty
    ({}, io.StringIO(), "Formatter"),
])
def test_auto_picks_journald_only_when_stderr_is_the_journal(monkeypatch, env, stream, expected):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert under_journald(stream) == (expected == "JournaldFormatter")
    assert type(formatter("auto", stream)).__name__ == expected
