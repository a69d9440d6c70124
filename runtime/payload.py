"""The MQTT wire format: the one place that parses readings and encodes forecasts and faults.

A reading is a JSON object of channel → number with an optional ``ts``
(epoch seconds, or ISO 8601 text; the receive time when absent)::

    {"ts": 1700000000.0, "current": 2.01, "pressure": 0.61, ...}

A missing channel or ``null`` is a missing value (imputed from the
forecast); anything else that is not a finite number rejects the reading
with a reason that the daemon counts.

>>> ts, values = parse_reading(b'{"ts": 10, "a": 1.5, "b": null}', ("a", "b"), now=0.0)
>>> ts, values.tolist()
(10.0, [1.5, nan])
>>> parse_reading(b'{"a": "hot"}', ("a",), now=0.0)
Traceback (most recent call last):
...
faultwatch.runtime.payload.PayloadError: bad_value: channel 'a' is not a number
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

from .engine import FaultEvent, Output

MAX_PAYLOAD_BYTES = 16_384
MAX_ABS_VALUE = 1e12  # beyond any physical sensor; larger is a bad payload, not a fault


class PayloadError(ValueError):
    """A reading that can't be used. ``reason`` is a short counter label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _timestamp(raw, now: float) -> float:
    if raw is None:
        return now
    if isinstance(raw, bool):
        raise PayloadError("bad_ts", "ts must be epoch seconds or ISO 8601 text")
    if isinstance(raw, int | float):
        ts = float(raw)
    elif isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            raise PayloadError("bad_ts", "ts is not ISO 8601") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        ts = parsed.timestamp()
    else:
        raise PayloadError("bad_ts", "ts must be epoch seconds or ISO 8601 text")
    if not math.isfinite(ts) or not 0 <= ts < 1e11:
        raise PayloadError("bad_ts", "ts out of range")
    return ts


def parse_reading(
    payload: bytes,
    features: Sequence[str],
    now: float,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> tuple[float, np.ndarray]:
    """payload → (ts, values [F] in ``features`` order, NaN = missing). Raises PayloadError."""
    if len(payload) > max_bytes:
        raise PayloadError("too_large", f"{len(payload)} bytes > {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("not_utf8", "payload is not UTF-8") from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise PayloadError("not_json", "payload is not JSON") from None
    if not isinstance(body, dict):
        raise PayloadError("not_object", "payload must be a JSON object of channel: value")
    values = np.full(len(features), np.nan)
    present = 0
    for i, name in enumerate(features):
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise PayloadError("bad_value", f"channel {name!r} is not a number")
        v = float(v)  # a huge JSON integer becomes inf here
        if not math.isfinite(v) or abs(v) > MAX_ABS_VALUE:
            raise PayloadError("bad_value", f"channel {name!r} is not a finite sensor value")
        values[i] = v
        present += 1
    if present == 0:
        raise PayloadError("no_channels", "none of the model's channels is present")
    return _timestamp(body.get("ts"), now), values


def encode_reading(ts: float, channels: dict[str, float]) -> bytes:
    return json.dumps({"ts": round(ts, 3), **{k: float(v) for k, v in channels.items()}}).encode()


def forecast_message(out: Output, targets: Sequence[str], threshold: float) -> bytes:
    return json.dumps({
        "ts": out.ts,
        "forecast": {name: round(float(v), 6) for name, v in zip(targets, out.forecast, strict=True)},
        "score": round(out.score, 6),
        "threshold": round(threshold, 6),
        "anomalous": out.anomalous,
        "fault": out.fault_active,
        "imputed": list(out.imputed),
    }).encode()


def fault_message(event: FaultEvent) -> bytes:
    return json.dumps({
        "device": event.device,
        "state": event.state,
        "ts": event.ts,
        "started_ts": event.started_ts,
        "peak_score": round(event.peak_score, 6),
        "threshold": round(event.threshold, 6),
        "top_channels": list(event.top_channels),
    }).encode()
