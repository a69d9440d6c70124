"""The checks of a daemon config across keys, each problem one line naming its key.

Each key alone is checked against its type and bounds as the TOML is read
(:mod:`.config`); these are the checks that need more than one key, or the
world outside the file: that the files a key names exist and can be read, that
the ids and addresses the daemon will use are not empty. ``--check-config``
runs them all, so a config it passes is one the daemon can start with.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from faultwatch.runtime.daemon.topics import TopicError, TopicMatcher
from faultwatch.runtime.engine.detector import DetectorSettings, DetectorSettingsError

if TYPE_CHECKING:
    from faultwatch.runtime.daemon.config import BrokerConfig, Config

CLIENTS = ("fast", "paho")  # broker.client: see faultwatch.runtime.daemon.mqtt.transport
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("auto", "text", "journald", "json")
MAX_TOPICS = 16


def listen_problem(text: str) -> str | None:
    """Why ``metrics.listen`` is not HOST:PORT, or None."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        return f"metrics.listen = {text!r}: expected HOST:PORT (port 0 = any free one) or \"\""
    return None


def topic_level_prefix(value: str, where: str) -> str | None:
    if not value or value.startswith("/") or value.endswith("/") or any(c in value for c in "+#\0"):
        return f"{where} = {value!r}: needs a topic prefix without wildcards or outer '/'"
    return None


def readable_file(path: str, where: str) -> str | None:
    """Why the daemon could not read the file a key names, or None (checked now, not at connect)."""
    if not os.path.isfile(path):
        return f"{where}: {path!r} is " + ("not a file" if os.path.exists(path) else "missing (no such file)")
    if not os.access(path, os.R_OK):
        return f"{where}: cannot read {path!r} (permission denied)"
    return None


def cross_key_problems(config: Config) -> list[str]:
    """Every check across keys, after every key was checked alone; normalises ``log_level``."""
    problems: list[str] = []
    try:  # names, types and ranges; the model's own settings are only known once it is loaded
        DetectorSettings().with_overrides(config.engine.detector)
    except DetectorSettingsError as exc:
        problems.append(f"engine.{exc}")
    topics = config.topics
    if not 1 <= len(topics) <= MAX_TOPICS:
        problems.append(f"input.topic: give 1 to {MAX_TOPICS} templates")
    else:
        try:
            TopicMatcher(topics)
        except TopicError as exc:
            problems.append(f"input.topic: {exc}")
    problems += filter(None, [topic_level_prefix(config.output.prefix, "output.prefix"),
                              topic_level_prefix(config.homeassistant.prefix, "homeassistant.prefix")])
    if config.log_level.upper() in LOG_LEVELS:
        config.log_level = config.log_level.upper()
    else:
        problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)} (any case), "
                        f"got {config.log_level!r}")
    if config.log.format not in LOG_FORMATS:
        problems.append(f"log.format must be one of {', '.join(LOG_FORMATS)}, got {config.log.format!r}")
    if config.input.partition >= config.input.partitions:
        problems.append(f"input.partition = {config.input.partition} must be below input.partitions = "
                        f"{config.input.partitions} (partitions are numbered from 0)")
    problems += filter(None, [_state_dir_problem(config.state_dir)])
    problems += _broker_problems(config.broker)
    if config.metrics.listen:
        problems += filter(None, [listen_problem(config.metrics.listen)])
    return problems


def _state_dir_problem(state_dir: str) -> str | None:
    """A state dir the daemon could not write would lose every snapshot and fault journal entry."""
    if not state_dir or not os.path.exists(state_dir):
        return None  # none, or made at the first snapshot
    if not os.path.isdir(state_dir):
        return f"state_dir: {state_dir!r} is not a folder"
    if not os.access(state_dir, os.W_OK | os.X_OK):
        return f"state_dir: cannot write to {state_dir!r} (permission denied)"
    return None


def _broker_problems(b: BrokerConfig) -> list[str]:
    problems = []
    if not b.host.strip():
        problems.append("broker.host is empty: give the broker's address (or --broker HOST:PORT)")
    if not b.client_id.strip():
        problems.append("broker.client_id is empty: the persistent session that keeps readings while the "
                        "daemon is down needs a stable id (the default is faultwatch-{hostname})")
    if b.reconnect_min_s > b.reconnect_max_s:
        problems.append("broker.reconnect_min_s must be <= broker.reconnect_max_s")
    if b.client not in CLIENTS:
        problems.append(f"broker.client must be one of {', '.join(map(repr, CLIENTS))}, got {b.client!r}")
    if bool(b.tls_cert_file) != bool(b.tls_key_file):
        problems.append("broker.tls_cert_file and broker.tls_key_file go together")
    if b.tls_cert_file and not b.tls_ca_file:
        problems.append("broker.tls_cert_file needs broker.tls_ca_file")
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file", "password_file"):
        path = getattr(b, key)
        problem = readable_file(path, f"broker.{key}") if path else None
        if problem:
            problems.append(problem)
    return problems


