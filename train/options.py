"""Every option of ``faultwatch train`` in one dataclass, with the reference recipe as defaults.

A config file (``faultwatch train --config best.json``, as ``faultwatch tune``
writes it; JSON or TOML) holds any subset of these keys; flags given on the
command line override it. Unknown keys and out-of-range values are rejected
with the key's name. This module does not import torch.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class OptionsError(ValueError):
    """A training option is unknown or out of range; the message names it."""


#: ``--device``: ``auto`` (CUDA when torch sees it), ``cpu``, ``cuda`` or ``cuda:N``.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
PRECISIONS = ("fp32", "bf16")


def _opt(default: Any, text: str, **extra: Any) -> Any:
    """A field with the help text its ``faultwatch train`` flag shows (the default is added there)."""
    return field(default=default, metadata={"help": text, **extra})


@dataclass(frozen=True)
class TrainOptions:
    """The one place each option's default and meaning live: the CLI builds its flags and help
    from these fields, and TrainConfig, ForecasterConfig's callers and BenchSpec read the defaults.

    Metadata: ``help`` (the flag's help), ``choices``, ``default_text`` (how a None default reads).
    """

    # The network: LSTM(128) → Dropout(0.3) → LSTM(64) → Dropout(0.3) → Dense(32, ReLU) → Dense(n).
    hidden: tuple[int, ...] = _opt((128, 64), "recurrent layer sizes, comma-separated")
    dense: int = _opt(32, "hidden dense layer before the output, 0 = none")
    dropout: float = _opt(0.3, "after each recurrent layer")
    cell: str = _opt("lstm", "recurrent cell", choices=("lstm", "gru"))
    peephole: bool = _opt(False, "LSTM gates also see the cell state")
    bidirectional: bool = _opt(False, "BiLSTM/BiGRU for offline scoring; implies --windowed; "
                                      "cannot be exported to stream")
    recurrent_dropout: float = _opt(0.0, "variational dropout on h between steps")
    zoneout: float = _opt(0.0, "probability a unit keeps its previous state")
    max_norm: float = _opt(0.0, "cap on each weight row's L2 norm, 0 = off")
    # The loop: Adam, MSE, batch 32, ≤ 100 epochs, early stop after 10, LR × 0.1 after 5 flat.
    mode: str = _opt("stateful", "stateful: truncated BPTT carrying the state across chunks; "
                                 "windowed: the recipe's independent look-back windows",
                     choices=("stateful", "windowed"))
    look_back: int = _opt(60, "window or chunk length")
    batch_size: int = _opt(32, "windowed: windows per batch. Stateful: the stream count, the number of "
                               "contiguous pieces the series are cut into and trained side by side; more "
                               "streams keep a GPU busy (1,024+) but make each stream shorter, so an epoch "
                               "has fewer optimiser steps and carries the state over fewer chunks")
    epochs: int = _opt(100, "at most")
    lr: float = _opt(1e-3, "Adam learning rate")
    patience: int = _opt(10, "early stopping, epochs without improvement")
    lr_patience: int = _opt(5, "flat epochs before the LR drops tenfold")
    seed: int = _opt(0, "same seed, same device → same weights (CUDA: see the README)")
    threads: int = _opt(1, "torch CPU threads while training, 0 = torch's default")
    device: str = _opt("auto", "auto (CUDA when torch sees one, else the CPU), cpu, cuda or cuda:N")
    precision: str = _opt("fp32", "bf16: autocast on CUDA (refused on the CPU)", choices=PRECISIONS)
    # The data.
    features: tuple[str, ...] | None = _opt(None, "input columns", default_text="all numeric but labels")
    exclude: tuple[str, ...] = _opt((), "columns never used as inputs", default_text="none")
    target: tuple[str, ...] | None = _opt(None, "forecast these channels", default_text="all features")
    val_fraction: float = _opt(0.2, "last part of each device validates")
    scaler: str = _opt("minmax", "fitted on the training part", choices=("minmax", "standard"))

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> OptionsError:
            return OptionsError(f"{key.replace('_', '-')}: {why}, got {getattr(self, key)!r}")

        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise bad("hidden", "needs positive layer sizes")
        for key in ("dropout", "recurrent_dropout", "zoneout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise bad(key, "must be in [0, 1)")
        for key, low in (("dense", 0), ("look_back", 2), ("batch_size", 1), ("epochs", 1),
                         ("patience", 1), ("lr_patience", 1), ("threads", 0)):
            if getattr(self, key) < low:
                raise bad(key, f"must be at least {low}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "must be positive")
        if not (self.max_norm >= 0 and math.isfinite(self.max_norm)):
            raise bad("max_norm", "must be 0 (off) or positive")
        if not 0.0 < self.val_fraction < 1.0:
            raise bad("val_fraction", "must be in (0, 1)")
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise bad(f.name, "must be one of " + ", ".join(allowed))
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise bad("device", "must be auto, cpu, cuda or cuda:N")
        if self.peephole and self.cell != "lstm":
            raise OptionsError("peephole: peepholes are an LSTM variant, not available with --cell gru")
        if self.bidirectional and self.mode == "stateful":
            raise OptionsError("bidirectional: needs --windowed training (a state carried across chunks "
                               "would need the backward pass to see future readings)")

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = "") -> TrainOptions:
        """Build from plain data (a config file, CLI flags); names the offending key on error.

        ``bidirectional`` without a ``mode`` implies windowed training, the only kind it has.
        """
        prefix = f"{source}: " if source else ""
        types = {f.name: str(f.type) for f in fields(cls)}
        changes = {}
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in types:
                raise OptionsError(f"{prefix}unknown option {key!r} (known: {', '.join(types)})")
            changes[key] = _coerce(key, types[key], value, prefix)
        if changes.get("bidirectional") and "mode" not in changes:
            changes["mode"] = "windowed"
        try:
            return cls(**changes)
        except OptionsError as exc:
            raise OptionsError(f"{prefix}{exc}") from None

    @classmethod
    def default_text(cls, name: str, default: Any = None) -> str:
        """How a flag's help shows its default: ``128,64``, ``0.001``, ``off``; ``default``
        overrides the field's (tune trains fewer epochs per trial)."""
        f = cls.__dataclass_fields__[name]
        value = f.default if default is None else default
        if value is None or (value == () and "default_text" in f.metadata):
            return str(f.metadata["default_text"])
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON; None (= all columns) is left out."""
        out = {}
        for key, value in asdict(self).items():
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


def _coerce(key: str, kind: str, value: Any, prefix: str) -> Any:
    """Check one value against the field's annotation (a string: ``from __future__ import annotations``)."""
    def wrong(expected: str) -> OptionsError:
        return OptionsError(f"{prefix}{key} must be {expected}, got {value!r}")

    if kind.startswith("tuple[int"):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        try:
            if isinstance(value, bool) or not all(str(int(v)) == str(v).strip() for v in value):
                raise ValueError
            return tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise wrong("a list of integers") from None
    if kind.startswith("tuple[str"):
        if value is None and "None" in kind:
            return None
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of column names")
        return tuple(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if not isinstance(value, str):
        raise wrong("a string")
    return value


def load_config(path: str | Path) -> dict[str, Any]:
    """A JSON (``.json``) or TOML config file as a flat dict of options."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise OptionsError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise OptionsError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise OptionsError(f"{path}: expected an object of training options")
    return data
