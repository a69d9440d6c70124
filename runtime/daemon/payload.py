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
faultwatch.runtime.daemon.payload.PayloadError: bad_value: channel 'a' is not a number

On a per-channel topic (``sensors/{device}/{channel}``) the payload is one
value: a plain number, or an object with ``value`` and an optional ``ts``:

>>> parse_value(b"2.5", now=7.0), parse_value(b'{"value": 2.5, "ts": 9}', now=7.0)
((7.0, 2.5), (9.0, 2.5))
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
from faultwatch.runtime.engine.engine import FaultEvent, Output

MAX_PAYLOAD_BYTES = 16_384
MAX_ABS_VALUE = 1e12  # beyond any physical sensor; larger is a bad payload, not a fault
MAX_DEPTH = 32  # JSON nesting; a reading is one flat object

#: Every reason a reading can be rejected for, as counted (a fixed set: bounded metric labels).
REASONS = ("too_large", "not_utf8", "not_json", "not_object", "bad_value", "bad_ts", "no_channels")
#: The daemon's counter (stats topic) for a message rejected for ``reason``: rejected_not_json, ...
REJECTED = "rejected_"


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
        try:
            ts = float(raw)
        except OverflowError:  # a huge JSON integer
            raise PayloadError("bad_ts", "ts out of range") from None
    elif isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw[:64])
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


def _too_deep(payload: bytes | bytearray) -> bool:
    """Brackets nested deeper than MAX_DEPTH (counting those inside strings too: a reading has none).

    json.loads would fail on deep nesting with a RecursionError only near the interpreter's
    recursion limit, at a depth that depends on the calling thread's stack; this makes the
    answer the same everywhere, in O(n) numpy.
    """
    if payload.count(b"[") + payload.count(b"{") <= MAX_DEPTH:
        return False
    a = np.frombuffer(payload, dtype=np.uint8)
    step = ((a == 0x5B) | (a == 0x7B)).astype(np.int32) - ((a == 0x5D) | (a == 0x7D))
    return bool(np.cumsum(step).max() > MAX_DEPTH)


def _json(payload: bytes | bytearray, max_bytes: int):
    if len(payload) > max_bytes:
        raise PayloadError("too_large", f"{len(payload)} bytes > {max_bytes}")
    if _too_deep(payload):
        raise PayloadError("not_json", f"nested deeper than {MAX_DEPTH}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("not_utf8", "payload is not UTF-8") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise PayloadError("not_json", "payload is not JSON") from None


def _number(v, name: str) -> float:
    if v.__class__ is not float and (isinstance(v, bool) or not isinstance(v, int | float)):
        raise PayloadError("bad_value", f"channel {name!r} is not a number")
    try:
        v = float(v)
    except OverflowError:  # a JSON integer too large for a float
        raise PayloadError("bad_value", f"channel {name!r} is not a finite sensor value") from None
    if not -MAX_ABS_VALUE <= v <= MAX_ABS_VALUE:  # also false for NaN
        raise PayloadError("bad_value", f"channel {name!r} is not a finite sensor value")
    return v


def parse_reading(
    payload: bytes | bytearray,
    features: Sequence[str],
    now: float,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> tuple[float, np.ndarray]:
    """payload → (ts, values [F] in ``features`` order, NaN = missing). Raises PayloadError."""
    body = _json(payload, max_bytes)
    if not isinstance(body, dict):
        raise PayloadError("not_object", "payload must be a JSON object of channel: value")
    values = [math.nan] * len(features)
    present = 0
    get = body.get
    for i, name in enumerate(features):
        v = get(name)
        if v is None:
            continue
        values[i] = _number(v, name)
        present += 1
    if present == 0:
        raise PayloadError("no_channels", "none of the model's channels is present")
    return _timestamp(get("ts"), now), np.array(values)


def parse_value(payload: bytes | bytearray, now: float,
                max_bytes: int = MAX_PAYLOAD_BYTES) -> tuple[float, float]:
    """One channel's payload → (ts, value): a plain number, or ``{"value": v, "ts": t}``."""
    body = _json(payload, max_bytes)
    if isinstance(body, dict):
        value = body.get("value")
        if value is None:
            raise PayloadError("no_channels", "object without a 'value'")
        return _timestamp(body.get("ts"), now), _number(value, "value")
    if body is None:
        raise PayloadError("no_channels", "null is no value")
    return now, _number(body, "value")


def encode_reading(ts: float, channels: dict[str, float]) -> bytes:
    return json.dumps({"ts": round(ts, 3), **{k: float(v) for k, v in channels.items()}}).encode()


def _num(v: float) -> str:
    """A float as JSON (what json.dumps writes), null when not finite."""
    return repr(v) if math.isfinite(v) else "null"


class ForecastEncoder:
    """Forecast messages, as :func:`forecast_message` writes them, without a dict per message.

    The channel names are escaped once; each message is a few string joins (the
    daemon writes thousands a second).
    """

    def __init__(self, targets: Sequence[str]):
        self.keys = [json.dumps(t) + ": " for t in targets]
        # %r of a float is its repr, as json.dumps writes it; the '%' escaped in the names.
        forecast = ", ".join(k.replace("%", "%%") + "%r" for k in self.keys)
        self.template = ('{"ts": %r, "forecast": {' + forecast + '}, "score": %r, "threshold": %r, '
                         '"anomalous": %s, "fault": %s, "imputed": %s}')

    def encode_batch(self, outputs: Sequence[Output], threshold: float) -> list[bytes]:
        """The messages of many outputs at once (the same bytes as :meth:`encode` for finite values)."""
        if not outputs:
            return []
        forecast = np.round(np.array([o.forecast for o in outputs], dtype=np.float64), 6)  # [B, K]
        finite: list[bool] = np.isfinite(forecast).all(axis=1).tolist()  # type: ignore[assignment]  # [B]
        template, messages = self.template, []
        for out, row, ok in zip(outputs, forecast.tolist(), finite, strict=True):
            thr = out.threshold if math.isfinite(out.threshold) else threshold
            if not (ok and math.isfinite(out.score) and math.isfinite(thr) and math.isfinite(out.ts)):
                messages.append(self.encode(out, threshold))  # null for what is not a number
                continue
            messages.append((template % (
                out.ts, *row, round(out.score, 6), round(thr, 6),
                "true" if out.anomalous else "false", "true" if out.fault_active else "false",
                json.dumps(list(out.imputed)) if out.imputed else "[]")).encode())
        return messages

    def encode(self, out: Output, threshold: float) -> bytes:
        if math.isfinite(out.threshold):
            threshold = out.threshold
        forecast = ", ".join(k + _num(round(v, 6)) for k, v in zip(self.keys, out.forecast.tolist(),
                                                                    strict=True))
        imputed = json.dumps(list(out.imputed)) if out.imputed else "[]"
        return (f'{{"ts": {_num(out.ts)}, "forecast": {{{forecast}}}, '
                f'"score": {_num(round(out.score, 6))}, "threshold": {_num(round(threshold, 6))}, '
                f'"anomalous": {"true" if out.anomalous else "false"}, '
                f'"fault": {"true" if out.fault_active else "false"}, "imputed": {imputed}}}').encode()


def forecast_message(out: Output, targets: Sequence[str], threshold: float) -> bytes:
    """``{"ts", "forecast": {channel: value}, "score", "threshold", "anomalous", "fault", "imputed"}``.

    ``threshold`` is used when the output carries none of its own.
    """
    return ForecastEncoder(targets).encode(out, threshold)


def fault_message(event: FaultEvent) -> bytes:
    reason = {"reason": event.reason} if event.reason else {}  # "evicted": not cleared by calm readings
    return json.dumps({
        "device": event.device,
        "state": event.state,
        "ts": event.ts,
        "started_ts": event.started_ts,
        "peak_score": round(event.peak_score, 6),
        "threshold": round(event.threshold, 6),
        "top_channels": list(event.top_channels),
    } | reason).encode()
