"""Every option of ``faultwatch train`` in one dataclass, with the reference recipe as defaults.

A config file (``faultwatch train --config best.json``, as ``faultwatch tune``
writes it; JSON or TOML) holds any subset of these keys; flags given on the
command line override it. Unknown keys and out-of-range values are rejected
with the key's name. This module does not import torch.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


class OptionsError(ValueError):
    """A training option is unknown or out of range; the message names it."""


@dataclass(frozen=True)
class TrainOptions:
    # The network: LSTM(128) → Dropout(0.3) → LSTM(64) → Dropout(0.3) → Dense(32, ReLU) → Dense(n).
    hidden: tuple[int, ...] = (128, 64)
    dense: int = 32
    dropout: float = 0.3
    cell: str = "lstm"
    peephole: bool = False
    bidirectional: bool = False
    recurrent_dropout: float = 0.0
    zoneout: float = 0.0
    max_norm: float = 0.0
    # The loop: Adam, MSE, batch 32, ≤ 100 epochs, early stop after 10, LR × 0.1 after 5 flat.
    mode: str = "stateful"
    look_back: int = 60
    batch_size: int = 32
    epochs: int = 100
    lr: float = 1e-3
    patience: int = 10
    lr_patience: int = 5
    seed: int = 0
    threads: int = 1  # torch intra-op threads, 0 = torch's default
    # The data.
    features: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    target: tuple[str, ...] | None = None
    val_fraction: float = 0.2
    scaler: str = "minmax"

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
        for key, allowed in (("cell", ("lstm", "gru")), ("mode", ("stateful", "windowed")),
                             ("scaler", ("minmax", "standard"))):
            if getattr(self, key) not in allowed:
                raise bad(key, "must be one of " + ", ".join(allowed))
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
        types = {f.name: f.type for f in fields(cls)}
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
