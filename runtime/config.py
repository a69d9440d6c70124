"""Daemon configuration: TOML, validated at start, unknown keys rejected with their path.

Every option has a default, so ``faultwatch run --model M --broker H:P`` needs
no file. Secrets never live in the config text: the broker password comes
from an environment variable or a file named here.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


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
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""


@dataclass
class InputConfig:
    topic: str = "sensors/{device}"  # {device} matches one topic level
    qos: int = 1
    max_payload_bytes: int = 16_384
    max_queue: int = 100_000  # readings waiting for the engine; QoS 0 beyond this are dropped


@dataclass
class OutputConfig:
    prefix: str = "faultwatch"  # {prefix}/{device}/forecast, {prefix}/{device}/fault, {prefix}/status
    forecasts: bool = True
    forecast_qos: int = 0
    stats_interval_s: float = 30.0  # {prefix}/stats; 0 = off


@dataclass
class EngineConfig:
    max_devices: int = 10_000
    max_batch: int = 1024
    max_latency_ms: float = 5.0  # how long the engine waits to fill a batch
    threads: int = 1  # onnxruntime intra-op threads
    threshold: float = 0.0  # 0 = the model's calibrated threshold
    warmup: int = -1  # -1 = the model's
    raise_k: int = 3
    window_n: int = 5
    clear_m: int = 30


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

    def password(self) -> str | None:
        """The broker password from the file or environment; never from the config text."""
        if self.broker.password_file:
            try:
                return Path(self.broker.password_file).read_text().splitlines()[0]
            except (OSError, IndexError) as exc:
                raise ConfigError(f"broker.password_file: cannot read: {exc}") from None
        return os.environ.get(self.broker.password_env) or None


BOUNDS: dict[str, tuple[float, float]] = {
    "snapshot_interval_s": (1, 86_400),
    "broker.port": (1, 65535),
    "broker.keepalive_s": (5, 3600),
    "broker.session_expiry_s": (0, 2**32 - 1),
    "input.qos": (0, 1),
    "input.max_payload_bytes": (64, 1 << 20),
    "input.max_queue": (1, 10_000_000),
    "output.forecast_qos": (0, 1),
    "output.stats_interval_s": (0, 86_400),
    "engine.max_devices": (1, 1_000_000),
    "engine.max_batch": (1, 65_536),
    "engine.max_latency_ms": (0, 10_000),
    "engine.threads": (1, 64),
    "engine.threshold": (0, 1e9),
    "engine.warmup": (-1, 1_000_000),
    "engine.raise_k": (1, 62),
    "engine.window_n": (1, 62),
    "engine.clear_m": (1, 1_000_000),
}


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
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise ConfigError(f"{where} must be {kind.__name__}, got {type(value).__name__}")
        lo, hi = BOUNDS.get(where, (None, None))
        if lo is not None and not lo <= value <= hi:
            raise ConfigError(f"{where} = {value} is out of range [{lo}, {hi}]")
        setattr(obj, key, value)


def load_config(path: str | None, args: Any = None) -> Config:
    """Defaults ← TOML file ← command-line flags (``--model``, ``--broker``, ``--state-dir``)."""
    config = Config()
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        _fill(config, raw, "")
    if args is not None:
        if getattr(args, "model", None):
            config.model = args.model
        if getattr(args, "broker", None):
            config.broker.host, config.broker.port = args.broker
        if getattr(args, "state_dir", None):
            config.state_dir = args.state_dir
    if "{device}" not in config.input.topic or config.input.topic.count("{device}") != 1:
        raise ConfigError("input.topic must contain {device} exactly once")
    if config.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {config.log_level!r}")
    if config.engine.raise_k > config.engine.window_n:
        raise ConfigError("engine.raise_k must be <= engine.window_n")
    if not config.model:
        raise ConfigError("no model: give --model or model = \"...\" in the config")
    return config


def example_config() -> str:
    """A documented config with every option at its default (``faultwatch run --example-config``)."""
    return (Path(__file__).with_name("example-config.toml")).read_text()
