"""Daemon configuration: TOML, validated at start, unknown keys rejected with their path.

Every option has a default, so ``faultwatch run --model M --broker H:P`` needs
no file; ``example-config.toml`` documents each one at its default (a test
keeps the two equal). Secrets never live in the config text: the broker
password comes from an environment variable or a file named here.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from faultwatch.runtime.daemon.config_checks import cross_key_problems, listen_problem


class ConfigError(ValueError):
    """The configuration is wrong: one line per problem, each naming its key."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


DEFAULT_CLIENT_ID = "faultwatch-{hostname}"
#: Keys that were renamed: an old config is refused with a pointer to the new key.
MOVED = {"reload.mqtt_command": "commands.enabled, off by default"}


@dataclass
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    # Names the persistent session at the broker: stable across restarts, unique per daemon.
    # {hostname} is this machine's name; a partitioned daemon's default id ends in -p{partition}.
    client_id: str = DEFAULT_CLIENT_ID
    client: str = "fast"  # MQTT client: "fast" (paho, per-message costs cut) or "paho" (paho as shipped)
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
    # A reading whose ts is further ahead of its receive time is rejected (rejected_future_ts).
    max_future_s: float = 300.0
    # A ts this much older than its device's last stepped one means the device's clock was set
    # back: the device restarts (with warm-up). 0 = engine.max_gap_periods sample periods.
    clock_step_tolerance_s: float = 0.0


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
    max_devices: int = 1000  # devices announced at most (kept in the state dir); later ones are not
    announce_per_s: float = 10.0  # announcements a second at most (the rest wait their turn)


@dataclass
class MetricsConfig:
    listen: str = "127.0.0.1:9108"  # HOST:PORT of /metrics and /healthz; "" = off
    per_device_max: int = 100  # per-device series only while there are at most this many devices


@dataclass
class CommandsConfig:
    # {prefix}/command/reload (reloads the model, as SIGHUP does) and {prefix}/command/forget
    # (payload: a device id; withdraws it from Home Assistant). Off: anyone who may publish
    # there could make the daemon act; enable it with a broker ACL that limits who may.
    enabled: bool = False


@dataclass
class ReloadConfig:
    min_interval_s: float = 5.0  # reload requests closer together than this are merged


@dataclass
class LogConfig:
    # auto: journald's level prefixes when stderr goes to the journal, else plain text.
    format: str = "auto"


@dataclass
class Config:
    model: str = ""
    state_dir: str = ""
    snapshot_interval_s: float = 60.0
    log_level: str = "INFO"
    log: LogConfig = field(default_factory=LogConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    reload: ReloadConfig = field(default_factory=ReloadConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)

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
    "input.max_future_s": (0, 366 * 86_400),
    "input.clock_step_tolerance_s": (0, 366 * 86_400),
    "homeassistant.max_devices": (0, 1_000_000),
    "homeassistant.announce_per_s": (0.01, 10_000),
    "input.partitions": (1, 1024),
    "input.partition": (0, 1023),
    "engine.max_devices": (1, 1_000_000),
    "engine.max_batch": (1, 65_536),
    "engine.max_latency_ms": (0, 10_000),
    "engine.threads": (1, 64),
    "metrics.per_device_max": (0, 10_000),
    "reload.min_interval_s": (0, 3600),
}


def _type_ok(kind, value) -> bool:
    if isinstance(kind, types.UnionType):
        return any(_type_ok(k, value) for k in get_args(kind))
    if getattr(kind, "__origin__", None) is list:
        (item,) = get_args(kind)
        return isinstance(value, list) and all(_type_ok(item, v) for v in value)
    return isinstance(value, kind) and isinstance(value, bool) == (kind is bool)


def _type_name(kind) -> str:
    return str(kind) if isinstance(kind, types.UnionType) else kind.__name__


def _fill(obj: Any, raw: dict, path: str, problems: list[str]) -> None:
    """Set each key of ``raw`` on ``obj``, checked alone; every problem is appended, none raised."""
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in raw.items():
        where = f"{path}{key}"
        if key not in names:
            moved = MOVED.get(where)
            problems.append(f"unknown key {where!r}" + (f" (now {moved})" if moved else ""))
            continue
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                problems.append(f"{where} must be a table")
            else:
                _fill(getattr(obj, key), value, f"{where}.", problems)
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(kind, value):
            problems.append(f"{where} must be {_type_name(kind)}, got {type(value).__name__}")
            continue
        lo, hi = BOUNDS.get(where, (None, None))
        if lo is not None and not lo <= value <= hi:
            problems.append(f"{where} = {value} is out of range [{lo}, {hi}]")
            continue
        setattr(obj, key, value)


def validate(config: Config) -> Config:
    """Checks across keys, after every key was checked alone; returns ``config``.

    Raises one :class:`ConfigError` listing every problem found.
    """
    problems = cross_key_problems(config)
    if problems:
        raise ConfigError(problems)
    return config


def resolve_client_id(config: Config, hostname: str | None = None) -> str:
    """``broker.client_id`` with ``{hostname}`` filled in; the default also names the partition.

    Two daemons with one id take the session from each other in turn, so the default is
    unique per host (and per partition on it).

    >>> c = Config()
    >>> resolve_client_id(c, "edge-7")
    'faultwatch-edge-7'
    >>> c.input.partitions, c.input.partition = 3, 2
    >>> resolve_client_id(c, "edge-7")
    'faultwatch-edge-7-p2'
    """
    template = config.broker.client_id
    client_id = template.replace("{hostname}", hostname or socket.gethostname() or "localhost")
    if template == DEFAULT_CLIENT_ID and config.input.partitions > 1:
        client_id += f"-p{config.input.partition}"
    return client_id


def listen_address(text: str) -> tuple[str, int]:
    problem = listen_problem(text)
    if problem:
        raise ConfigError(problem)
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def parse_config(text: str, source: str = "config") -> Config:
    """A Config from TOML text: defaults, then the keys given (each checked); no cross-key checks."""
    problems: list[str] = []
    config = _parse(text, source, problems)
    if problems:
        raise ConfigError(problems)
    return config


def _parse(text: str, source: str, problems: list[str]) -> Config:
    config = Config()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{source}: not valid TOML: {exc}")
        return config
    _fill(config, raw, "", problems)
    return config


def load_config(path: str | None, args: Any = None) -> Config:
    """Defaults ← TOML file ← command-line flags (``--model``, ``--broker``, ``--state-dir``).

    Every problem is reported at once (one :class:`ConfigError`, a line each); the returned
    config has ``broker.client_id`` resolved (:func:`resolve_client_id`).
    """
    problems: list[str] = []
    config = Config()
    if path:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {getattr(exc, 'strerror', None) or exc}") from None
        config = _parse(text, path, problems)
    if args is not None:
        if getattr(args, "model", None):
            config.model = args.model
        if getattr(args, "broker", None):
            config.broker.host, config.broker.port = args.broker
        if getattr(args, "state_dir", None):
            config.state_dir = args.state_dir
    problems += cross_key_problems(config)
    if not config.model:
        problems.append("no model: give --model or model = \"...\" in the config")
    if problems:
        raise ConfigError(problems)
    config.broker.client_id = resolve_client_id(config)
    return config


def example_config() -> str:
    """A documented config with every option at its default (``faultwatch run --example-config``)."""
    return (Path(__file__).with_name("example-config.toml")).read_text()
