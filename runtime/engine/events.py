"""What goes into the engine and what comes out: readings, per-reading outputs and fault events."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Reading(NamedTuple):
    """One sample of one device: ``values`` [F] in raw units, in the model's feature order; NaN = missing.

    A NamedTuple rather than a frozen dataclass: the daemon builds one per MQTT reading, and a
    tuple is built ~5× faster (a frozen dataclass sets each field through ``object.__setattr__``).
    """

    device: str
    ts: float  # epoch seconds
    values: np.ndarray


@dataclass(frozen=True)
class FaultEvent:
    device: str
    state: str  # "raised" or "cleared"
    ts: float  # when it was raised or cleared
    started_ts: float
    peak_score: float
    threshold: float
    # The channels that drove the score at the raising reading, largest first:
    # {"channel", "reading", "forecast", "share"} with share = that channel's part of the score.
    top_channels: tuple[dict, ...] = ()
    reason: str = ""  # why a fault was cleared other than by calm readings: "evicted"


class Output(NamedTuple):
    """What the engine made of one reading. A NamedTuple, like :class:`Reading`: one is built per
    reading, and at a batch of 1,024 a frozen dataclass cost more than the model step."""

    device: str
    ts: float
    forecast: np.ndarray  # [K] raw units: the forecast of this device's next reading
    score: float  # smoothed anomaly score (0 while there is no earlier forecast to compare)
    anomalous: bool  # score above threshold, outside warm-up
    fault_active: bool
    event: FaultEvent | None = None
    imputed: tuple[str, ...] = ()  # channels that were missing and filled from the forecast
    threshold: float = float("nan")  # what the score was compared with (per device when dynamic)


def top_channels(contrib: np.ndarray, reading: np.ndarray, forecast: np.ndarray, targets: Sequence[str],
                 n: int) -> tuple[dict, ...]:
    """The ``n`` channels with the largest part of the score, largest first, for a raised event.

    ``contrib`` [K] each target channel's part of score² (0 where not measured), ``reading`` and
    ``forecast`` [K] in raw units. Channels with no part are left out.

    >>> top = top_channels(np.array([1.0, 3.0, 0.0]), np.array([5.0, 7.0, 9.0]),
    ...                    np.array([5.5, 6.0, 9.0]), ["a", "b", "c"], 2)
    >>> [(c["channel"], c["reading"], c["forecast"], c["share"]) for c in top]
    [('b', 7.0, 6.0, 0.75), ('a', 5.0, 5.5, 0.25)]
    """
    total = contrib.sum() or 1.0
    return tuple(
        {"channel": targets[k], "reading": float(reading[k]), "forecast": float(forecast[k]),
         "share": round(float(contrib[k] / total), 4)}
        for k in np.argsort(-contrib)[:n] if contrib[k] > 0
    )


__all__ = ["FaultEvent", "Output", "Reading", "top_channels"]
