"""Daemon configuration: TOML, validated at start, unknown keys rejected with their path.

Every option has a default, so ``faultwatch run --model M --broker H:P`` needs
no file; ``example-config.toml`` documents each one at its default (a test
keeps the two equal). Secrets never live in the config text: the broker
password comes from an environment variable or a file named here.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from faultwatch.runtime.daemon.topics import TopicError, TopicMatcher
from faultwatch.runtime.engine.detector import DetectorSettings, DetectorSettingsError


class ConfigError(ValueError):
    """The configuration is wrong; the message names the key."""


@dataclass
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "faultwatch"  # also names the persistent session at the broker
    username: str = ""
    password_env: str = "FAULTWATCH_MQTT_PASSWORD"  # read from this environment variable, or
    password_file: str = ""  # from this file (first line), when set
    keepalive_s: int = 30
    session_expiry_s: int = 86_400  # how long the broker queues readings for us while we're away
    reconnect_min_s: float = 1.0  # backoff between reconnection attempts doubles from this...
    reconnect_max_s: float = 30.0  # ...up to this
    receive_maximum: int = 4096  # QoS 1 readings in flight to us, unacknowledged: bounds memory
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""


@dataclass
class InputConfig:
    # One template or a list; {device} and {channel} are whole topic levels.
    topic: str | list[str] = "sensors/{device}"
    qos: int = 1
    max_payload_bytes: int = 16_384
    max_queue: int = 10_000  # messages waiting for the engine: QoS 0 beyond it dropped, QoS 1 held back
    frame_max_wait_s: float = 0.5  # per-channel topics: step a sample with missing channels after this
    max_open_frames: int = 10_000  # per-channel topics: samples being assembled at once
    # Scale-out: `partitions` daemons read the same topics, each steps the devices of its own
    # `partition` (0-based; by a hash of the device id) and acknowledges the others unread.
    partitions: int = 1
    partition: int = 0
    # After resuming a session (readings held for us at the broker), readings arriving within this
    # long are stepped in time order: a broker may resend older ones after newer ones.
    reorder_window_s: float = 1.0


@dataclass
class OutputConfig:
    prefix: str = "faultwatch"  # {prefix}/{device}/forecast, {prefix}/{device}/fault, {prefix}/status
    forecasts: bool = True
    forecast_every: int = 1  # publish the forecast of every Nth reading of a device
    forecast_qos: int = 0
    stats_interval_s: float = 30.0  # {prefix}/stats; 0 = off
    outbox_max: int = 10_000  # forecasts kept while the broker is unreachable
    fault_journal_max: int = 10_000  # fault events kept on disk until the broker has them


@dataclass
class EngineConfig:
    max_devices: int = 10_000
    max_batch: int = 1024
    max_latency_ms: float = 5.0  # how long the engine waits to fill a batch
    threads: int = 1  # onnxruntime intra-op threads
    # [engine.detector]: overrides of single fields of the detector the model carries
    # (faultwatch.runtime.engine.detector.DetectorSettings); empty = run the model's own.
    detector: dict = field(default_factory=dict)


@dataclass
class HomeAssistantConfig:
    discovery: bool = True
    prefix: str = "homeassistant"


@dataclass
class MetricsConfig:
    listen: str = "127.0.0.1:9108"  # HOST:PORT of /metrics and /healthz; "" = off
    per_device_max: int = 100  # per-device series only while there are at most this many devices


@dataclass
class ReloadConfig:
    mqtt_command: bool = True  # {prefix}/command/reload reloads the model, as SIGHUP does
    min_interval_s: float = 5.0  # reload requests closer together than this are merged


@dataclass
class Config:
    model: str = ""
    state_dir: str = ""
    snapshot_interval_s: float = 60.0
    log_level: str = "INFO"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    reload: ReloadConfig = field(default_factory=ReloadConfig)

    def password(self) -> str | None:
        """The broker password from the file or environment; never from the config text."""
        if self.broker.password_file:
            try:
                return Path(self.broker.password_file).read_text().splitlines()[0]
            except (OSError, IndexError) as exc:
                raise ConfigError(f"broker.password_file: cannot read: {exc}") from None
        return os.environ.get(self.broker.password_env) or None

    @property
    def topics(self) -> list[str]:
        return [self.input.topic] if isinstance(self.input.topic, str) else list(self.input.topic)


BOUNDS: dict[str, tuple[float, float]] = {
    "snapshot_interval_s": (1, 86_400),
    "broker.port": (1, 65535),
    "broker.keepalive_s": (5, 3600),
    "broker.session_expiry_s": (0, 2**32 - 1),
    "broker.reconnect_min_s": (0.1, 3600),
    "broker.reconnect_max_s": (0.1, 3600),
    "broker.receive_maximum": (1, 65535),
    "input.qos": (0, 1),
    "input.max_payload_bytes": (64, 1 << 20),
    "input.max_queue": (1, 10_000_000),
    "input.frame_max_wait_s": (0, 60),
    "input.max_open_frames": (1, 1_000_000),
    "output.forecast_every": (1, 1_000_000),
    "output.forecast_qos": (0, 1),
    "output.stats_interval_s": (0, 86_400),
    "output.outbox_max": (0, 10_000_000),
    "output.fault_journal_max": (1, 10_000_000),
    "input.reorder_window_s": (0, 60),
    "input.partitions": (1, 1024),
    "input.partition": (0, 1023),
    "engine.max_devices": (1, 1_000_000),
    "engine.max_batch": (1, 65_536),
    "engine.max_latency_ms": (0, 10_000),
    "engine.threads": (1, 64),
    "metrics.per_device_max": (0, 10_000),
    "reload.min_interval_s": (0, 3600),
}
MAX_TOPICS = 16


def _type_ok(kind, value) -> bool:
    if isinstance(kind, types.UnionType):
        return any(_type_ok(k, value) for k in get_args(kind))
    if getattr(kind, "__origin__", None) is list:
        (item,) = get_args(kind)
        return isinstance(value, list) and all(_type_ok(item, v) for v in value)
    return isinstance(value, kind) and isinstance(value, bool) == (kind is bool)


def _type_name(kind) -> str:
    return str(kind) if isinstance(kind, types.UnionType) else kind.__name__


def _fill(obj: Any, raw: dict, path: str) -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in raw.items():
        where = f"{path}{key}"
        if key not in names:
            raise ConfigError(f"unknown key {where!r}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a table")
            _fill(getattr(obj, key), value, f"{where}.")
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(kind, value):
            raise ConfigError(f"{where} must be {_type_name(kind)}, got {type(value).__name__}")
        lo, hi = BOUNDS.get(where, (None, None))
        if lo is not None and not lo <= value <= hi:
            raise ConfigError(f"{where} = {value} is out of range [{lo}, {hi}]")
        setattr(obj, key, value)


def _topic_level_prefix(value: str, where: str) -> None:
    if not value or value.startswith("/") or value.endswith("/") or any(c in value for c in "+#\0"):
        raise ConfigError(f"{where} = {value!r}: needs a topic prefix without wildcards or outer '/'")


def validate(config: Config) -> Config:
    """Checks across keys, after every key was checked alone; returns ``config``."""
    topics = config.topics
    if not 1 <= len(topics) <= MAX_TOPICS:
        raise ConfigError(f"input.topic: give 1 to {MAX_TOPICS} templates")
    try:
        TopicMatcher(topics)
    except TopicError as exc:
        raise ConfigError(f"input.topic: {exc}") from None
    _topic_level_prefix(config.output.prefix, "output.prefix")
    _topic_level_prefix(config.homeassistant.prefix, "homeassistant.prefix")
    if config.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {config.log_level!r}")
    try:  # names, types and ranges; the model's own settings are only known once it is loaded
        DetectorSettings().with_overrides(config.engine.detector)
    except DetectorSettingsError as exc:
        raise ConfigError(f"engine.{exc}") from None
    if config.input.partition >= config.input.partitions:
        raise ConfigError(f"input.partition = {config.input.partition} must be below "
                          f"input.partitions = {config.input.partitions} (partitions are numbered from 0)")
    if config.broker.reconnect_min_s > config.broker.reconnect_max_s:
        raise ConfigError("broker.reconnect_min_s must be <= broker.reconnect_max_s")
    if config.metrics.listen:
        listen_address(config.metrics.listen)
    if bool(config.broker.tls_cert_file) != bool(config.broker.tls_key_file):
        raise ConfigError("broker.tls_cert_file and broker.tls_key_file go together")
    if config.broker.tls_cert_file and not config.broker.tls_ca_file:
        raise ConfigError("broker.tls_cert_file needs broker.tls_ca_file")
    return config


def listen_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"metrics.listen = {text!r}: expected HOST:PORT (port 0 = any free one) or \"\"")
    return host.strip("[]"), int(port)


def parse_config(text: str, source: str = "config") -> Config:
    """A Config from TOML text: defaults, then the keys given (each checked); no cross-key checks."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    config = Config()
    _fill(config, raw, "")
    return config


def load_config(path: str | None, args: Any = None) -> Config:
    """Defaults ← TOML file ← command-line flags (``--model``, ``--broker``, ``--state-dir``)."""
    config = Config()
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        config = parse_config(text, path)
    if args is not None:
        if getattr(args, "model", None):
            config.model = args.model
        if getattr(args, "broker", None):
            config.broker.host, config.broker.port = args.broker
        if getattr(args, "state_dir", None):
            config.state_dir = args.state_dir
    validate(config)
    if not config.model:
        raise ConfigError("no model: give --model or model = \"...\" in the config")
    return config


def example_config() -> str:
    """A documented config with every option at its default (``faultwatch run --example-config``)."""
    return (Path(__file__).with_name("example-config.toml")).read_text()
